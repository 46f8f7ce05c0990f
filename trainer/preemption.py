"""Signals only set a flag; the loop acts on it at a step boundary once every rank agrees."""
import ctypes
import os
import signal
import sys

# SIGUSR1: Slurm's warning before preemption or the time limit; the launcher requeues, so exit 0 after saving.
# SIGTERM: scancel or a shutdown; save and exit with the conventional 128 + 15.
EXIT_CODES = {signal.SIGUSR1: 0, signal.SIGTERM: 128 + signal.SIGTERM}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def follow_agent() -> None:
    """Under torchrun on Linux, has the kernel send this worker SIGTERM when its parent, the torchrun agent, dies,
    however it dies; then the ranks agree on a step, save, release run.dir and exit 143 (StopFlag). torchrun starts
    every worker in a session of its own, so a SIGKILL of the agent (the OOM killer's pick, a kill by hand, of its
    process group too) reaches no worker, and they trained on as orphans, holding run.dir and the GPUs.

    Called first thing, before the imports that take seconds, since an agent that dies before the parent is read
    here goes unnoticed: the worker then fails to join the process group within distributed.init_timeout_s where
    that agent hosted the rendezvous store (torchrun's default), and trains on elsewhere. The kernel signals when
    the thread that started the worker ends: torchrun starts its workers from its main thread.
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    agent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:  # a sandbox may forbid it: train on without
        print(f"warning: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}): this worker will not "
              f"stop if its torchrun agent is killed", file=sys.stderr, flush=True)
        return
    if os.getppid() != agent:  # the agent died before prctl: this worker has another parent already
        os.kill(os.getpid(), signal.SIGTERM)


class StopFlag:
    def __init__(self):
        self.signum = None
        self._previous = {}

    def install(self) -> "StopFlag":
        for signum in EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Puts back the handlers install() replaced: once training is over, SIGTERM ends the process again."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def exit_code(self) -> int:
        """The exit code for the signal this rank saw; a rank stopped only by agreement exits like a preemption."""
        return EXIT_CODES.get(self.signum, 0)
