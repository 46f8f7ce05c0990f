"""A throwaway two-node Slurm cluster on this machine, for tests of the Slurm launcher.

munged, slurmctld and two slurmd daemons (n1, n2) run from a scratch directory that holds every key, socket,
config, spool, pid and log file; nothing under /etc or /run is touched. Clients find the cluster through the
SLURM_CONF variable from `env()`. Both emulated nodes are this host at 127.0.0.1, so NodeAddr (not the node name)
is the address a launcher must connect to.

    python -m tests.slurm_cluster start DIR   # prints `export SLURM_CONF=...`
    python -m tests.slurm_cluster stop DIR
"""
import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NODES = ("n1", "n2")
CPUS_PER_NODE = 2
# A requeued job may start again only after the step credential expires (default 120 s); tests need seconds.
CRED_EXPIRE_S = 5
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
APT_PACKAGES = "slurm-wlm munge"


class SlurmUnavailable(RuntimeError):
    """The cluster could not be set up or did not come up; the message carries the daemons' logs."""


def missing_reason():
    """Why a local cluster cannot run here, or None when it can."""
    absent = [d for d in PROGRAMS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"not installed: {', '.join(absent)} (apt-get install -y {APT_PACKAGES})"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd starts job steps as the submitting user)"
    return None


def _free_ports(count):
    """`count` consecutive free TCP ports on 127.0.0.1 (slurm.conf takes a node port range)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return list(range(base, base + count))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise SlurmUnavailable(f"no {count} consecutive free ports on 127.0.0.1")


def _daemon_path(name):
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """Owns the daemons it starts; `stop()` ends exactly those pids."""

    def __init__(self, root):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs = {}

    def env(self, base=None):
        """Environment for Slurm clients (sbatch, squeue, scontrol ...) talking to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def start(self, timeout_s=60):
        reason = missing_reason()
        if reason:
            raise SlurmUnavailable(reason)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        ctld_port, node_port, _ = _free_ports(3)
        self._start_munge()
        self._write_conf(ctld_port, node_port)
        try:
            self._spawn("slurmctld", [_daemon_path("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for node in NODES:
                self._spawn(f"slurmd-{node}", [_daemon_path("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
            self._wait_nodes_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self):
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(mode=0o700, exist_ok=True)
        key = munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        self._spawn("munged", [
            # --force: a socket left by a killed earlier run in the same directory must not block this one.
            _daemon_path("munged"), "--foreground", "--force",
            f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
            f"--seed-file={munge_dir / 'munged.seed'}",
        ])
        self._wait(lambda: self.munge_socket.exists(), 20, "munged did not create its socket", "munged")

    def _write_conf(self, ctld_port, node_port):
        state = self.root / "state"
        for sub in ("ctld", "spool"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        nodes = f"n[1-{len(NODES)}]"
        self.conf.write_text("\n".join([
            "ClusterName=local",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={state / 'ctld'}",
            f"SlurmdSpoolDir={state / 'spool' / '%n'}",
            f"SlurmctldPidFile={state / 'slurmctld.pid'}",
            f"SlurmdPidFile={state / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            # Bind each task to cores unless srun says otherwise, as many sites do: a launcher with one task per
            # node must still give that task all of the node's CPUs (tests/test_launch_slurm.py checks the workers).
            "TaskPlugin=task/affinity",
            "TaskPluginParam=Cores",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            # The main loop runs every 60 s by default: a requeued job would wait that long after becoming eligible.
            "SchedulerParameters=sched_interval=1",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2",
            "JobRequeue=1",
            # Keep finished jobs visible to scontrol long enough for a test to read their state.
            "MinJobAge=600",
            # Slurm's default: what a stopping job has between SIGTERM and SIGKILL to save its checkpoint.
            "KillWait=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            (f"NodeName={nodes} NodeHostname={host} NodeAddr=127.0.0.1 Port={node_port}-{node_port + len(NODES) - 1} "
             f"CPUs={CPUS_PER_NODE} RealMemory=1000 State=UNKNOWN"),
            f"PartitionName=local Nodes={nodes} Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP",
            "",
        ]))

    def _spawn(self, name, argv):
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        with open(self.root / f"{name}.out", "wb") as log:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True)

    def _wait(self, ready, timeout_s, message, *watched):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            for name in watched:
                if self.procs[name].poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {self.procs[name].returncode}: {self.log_tail(name)}")
            time.sleep(0.2)
        raise SlurmUnavailable(f"{message} within {timeout_s} s: {self.log_tail(*watched)}")

    def _wait_nodes_idle(self, timeout_s):
        def idle():
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), capture_output=True, text=True,
                                 check=False)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            return all(states.get(node) == "idle" for node in NODES)
        self._wait(idle, timeout_s, "the nodes did not become idle", *self.procs)

    def log_tail(self, *names, chars=2000):
        """The end of each named daemon's output and log files, for error messages."""
        parts = []
        for name in names or list(self.procs):
            for path in sorted(self.root.glob(f"{name}.*")) + sorted(self.root.glob(f"munge/{name}.log")):
                if path.suffix in (".out", ".log"):
                    parts.append(f"[{path.name}] {path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def cancel_jobs(self, timeout_s=30):
        """Cancel every job of this cluster and wait for its processes: slurmstepd outlives a stopped slurmd."""
        def jobs():
            out = subprocess.run(["squeue", "-h", "-o", "%A"], env=self.env(), capture_output=True, text=True,
                                 check=False)
            return out.stdout.split()
        pending = jobs()
        if pending:
            subprocess.run(["scancel", *pending], env=self.env(), capture_output=True, check=False)
            self._wait(lambda: not jobs(), timeout_s, "cancelled jobs did not end")

    def stop(self):
        """Cancel the jobs, then stop the daemons this object started (slurmds first, munged last) by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.cancel_jobs()
            except SlurmUnavailable as e:
                print(f"warning: {e}", file=sys.stderr)
        for name in sorted(self.procs, key=lambda n: ("slurmd" not in n, n == "munged")):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _pidfile_stop(root):
    """`stop` from another process: end the daemons whose pids `start` recorded."""
    pids = Path(root) / "daemons.pid"
    if not pids.exists():
        return
    for line in reversed(pids.read_text().split()):
        try:
            os.kill(int(line), signal.SIGTERM)
        except ProcessLookupError:
            pass
    pids.unlink()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("dir", help="scratch directory holding all of the cluster's state")
    args = parser.parse_args(argv)
    if args.action == "stop":
        _pidfile_stop(args.dir)
        return 0
    cluster = LocalSlurm(args.dir)
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        print(f"local Slurm unavailable: {exc}", file=sys.stderr)
        return 1
    (cluster.root / "daemons.pid").write_text("\n".join(str(p.pid) for p in cluster.procs.values()) + "\n")
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
