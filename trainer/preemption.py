"""Signals only set a flag; the loop acts on it at a step boundary once every rank agrees."""
import signal

# SIGUSR1: Slurm's warning before preemption or the time limit; the launcher requeues, so exit 0 after saving.
# SIGTERM: scancel or a shutdown; save and exit with the conventional 128 + 15.
EXIT_CODES = {signal.SIGUSR1: 0, signal.SIGTERM: 128 + signal.SIGTERM}


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
