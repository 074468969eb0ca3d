"""A real two-node Slurm cluster on this machine for the launcher tests (``pytest -m slurm``).

Slurm 22.05 from the Debian packages (``slurmctld slurmd slurm-client``), run as root without
systemd, cgroups or munge: ``auth/none`` + ``cred/none``, ``proctrack/linuxproc``,
``task/none``, no accounting, every file (config, state, spool, logs, pid files) in one
temporary folder. Two ``slurmd`` processes on this host play two nodes, named after this
machine (``$(hostname -s)``) and ``$(hostname -s)-n2``, on ports 17001 and 17002 (or free ones
when those are taken); both reach the controller through 127.0.0.1. The first node carries the
machine's own name because ``launchers/slurm.sbatch`` makes the allocation's first node name the
torchrun rendezvous host, which must resolve to this machine (on a real cluster every node name
resolves); it also sorts first in a node list.

The nodes declare what the launch scripts ask for (64 CPUs and 8 GPUs each: a ``gpu``
GRES whose eight device files are links to ``/dev/null``) with
``SlurmdParameters=config_overrides``, so the scripts' own ``#SBATCH`` lines are honoured as
they are; the tests set ``GPUS_PER_NODE=1`` (one CPU process per node).

Timings made short for tests: the scheduler runs every 2 s, and a requeued job may start again
after 5 s (``cred_expire=5``) instead of ~120 s.

:func:`running_cluster` installs the packages when they are missing (root + apt-get only),
starts the daemons each in its own session with their PIDs recorded, and at the end cancels
this cluster's jobs and stops exactly those daemons.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client")
TOOLS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
_HOST = socket.gethostname().split(".")[0]
NODES = (_HOST, f"{_HOST}-n2")  # the first sorts first in a node list
SLURMD_PORTS = (17001, 17002)
_SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"
# Job states after which nothing more happens (a requeued job goes back to PENDING instead).
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here (the reason is the message)."""


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=f"{os.environ.get('PATH', '')}:{_SBIN}")


def ensure_installed(timeout_s: float = 300) -> None:
    """Install the Slurm packages with apt-get when a tool is missing. Raise
    :class:`SlurmUnavailable` saying why where the cluster cannot run (not root, or Slurm
    missing and no apt-get), RuntimeError when the install failed."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster runs slurmctld and slurmd as root (and installs "
                               f"them with apt-get when missing); this is uid {os.geteuid()}")
    missing = [t for t in TOOLS if _which(t) is None]
    if not missing:
        return
    apt = _which("apt-get")
    if apt is None:
        raise SlurmUnavailable(f"Slurm is not installed ({', '.join(missing)} missing) and there "
                               "is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=timeout_s)
    if done.returncode != 0:  # stale package lists: update once and try again
        subprocess.run([apt, "update", "-qq"], capture_output=True, env=env, timeout=timeout_s)
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=timeout_s)
    still = [t for t in TOOLS if _which(t) is None]
    if done.returncode != 0 or still:
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed (exit {done.returncode}; "
                           f"missing {still}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, ctld_port: int, node_ports: tuple[int, int]) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeAddr=127.0.0.1 Port={port} CPUs=64 "
        "Gres=gpu:8 RealMemory=1000 State=UNKNOWN" for name, port in zip(NODES, node_ports))
    return f"""\
ClusterName=sodatest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmdParameters=config_overrides
GresTypes=gpu
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
InactiveLimit=0
KillWait=30
MinJobAge=600
MessageTimeout=30
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
{nodes}
PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


@dataclass
class SlurmCluster:
    """A running cluster: ``env`` has ``SLURM_CONF`` (and ``PATH`` with sbin) for the clients."""

    root: Path
    env: dict
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *argv: str, timeout: float = 60, check: bool = True,
            cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        """A Slurm client command (``sbatch``, ``scontrol``, ...) against this cluster."""
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, env=self._with_clients(env or dict(os.environ)))
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n"
                                 f"{done.stderr}\n{self.logs()}")
        return done

    def environment(self, base: dict) -> dict:
        """``base`` for a job submission: without the SLURM_* / SBATCH_* / SRUN_* variables of
        an allocation this process may run in, with this cluster's ``SLURM_CONF``."""
        drop = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
        return self._with_clients({k: v for k, v in base.items() if not k.startswith(drop)})

    def _with_clients(self, env: dict) -> dict:
        """``env`` with this cluster's ``SLURM_CONF`` and sbin on the end of its own ``PATH``
        (a job inherits it: a test may put a folder of its own first)."""
        return {**env, **self.env, "PATH": f"{env.get('PATH', '')}:{_SBIN}"}

    def sbatch(self, *argv: str, env: dict, cwd: Path) -> str:
        """Submit with ``sbatch --parsable``; the job id."""
        done = self.run("sbatch", "--parsable", *argv, env=self.environment(env), cwd=cwd)
        return done.stdout.strip().split(";")[0]

    def states(self, job_id: str) -> list[str]:
        """``JobState`` of the job (of every task of an array job)."""
        out = self.run("scontrol", "show", "-o", "job", job_id).stdout.splitlines()
        return [t.split("=", 1)[1] for line in out for t in line.split() if t.startswith("JobState=")]

    def report(self, job_id: str, outputs: Iterable[Path] = ()) -> str:
        """What to read when a job did not do what a test expected: the job record, the tails
        of its output files and of the daemons' logs."""
        record = self.run("scontrol", "show", "job", job_id, check=False).stdout
        parts = [f"--- scontrol show job {job_id}:\n{record}"]
        for path in outputs:
            text = path.read_text(errors="replace") if path.is_file() else "(missing)"
            parts.append(f"--- {path}:\n{text[-6000:]}")
        return "\n".join(parts + [self.logs()])

    def wait(self, job_id: str, timeout_s: float, outputs: Iterable[Path] = ()) -> list[str]:
        """Wait until the job (every task of an array) has ended; its final states. Raises
        AssertionError with :meth:`report` after ``timeout_s``."""
        outputs, states = list(outputs), []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.states(job_id)
            if states and all(s in TERMINAL for s in states):
                return states
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} still not finished after {timeout_s:.0f} s "
                             f"({states}); cancelled\n{self.report(job_id, outputs)}")

    def wait_for_text(self, job_id: str, path: Path, text: str, timeout_s: float) -> None:
        """Wait until ``path`` (the job's output) contains ``text``; AssertionError with
        :meth:`report` when the job ends first or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if path.is_file() and text in path.read_text(errors="replace"):
                return
            states = self.states(job_id)
            if states and all(s in TERMINAL for s in states):
                raise AssertionError(f"job {job_id} ended ({states}) before {path} said {text!r}\n"
                                     f"{self.report(job_id, [path])}")
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"{path} did not say {text!r} within {timeout_s:.0f} s; job {job_id} "
                             f"cancelled\n{self.report(job_id, [path])}")

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ...); the
        first record for an array job."""
        out = self.run("scontrol", "show", "-o", "job", job_id).stdout.splitlines()[0]
        fields = {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields

    def logs(self, tail: int = 4000) -> str:
        """The tails of the daemons' logs, for failure messages."""
        parts = []
        for log in sorted(self.root.glob("slurm*.log")):
            text = log.read_text(errors="replace")
            parts.append(f"--- {log.name}:\n{text[-tail:]}")
        return "\n".join(parts)

    def cancel_all(self, timeout_s: float = 60) -> None:
        """Cancel every job of this cluster and wait (bounded) until none is left running."""
        self.run("scancel", "--user", str(os.getuid()), check=False, timeout=30)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = self.run("squeue", "-h", "-o", "%i %T", check=False, timeout=30).stdout
            if not out.strip():
                return
            time.sleep(1)


def _wait_nodes_idle(cluster: SlurmCluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    out = ""
    while time.monotonic() < deadline:
        for name, proc in cluster.daemons.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} at start-up\n{cluster.logs()}")
        done = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=30)
        out = done.stdout
        states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
        if all(states.get(n) == "idle" for n in NODES):
            return
        time.sleep(0.5)
    raise RuntimeError(f"nodes not idle after {timeout_s:.0f} s: {out!r}\n{cluster.logs()}")


def _stop(proc: subprocess.Popen, timeout_s: float = 15) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextmanager
def running_cluster(root: Path, start_timeout_s: float = 60) -> Iterator[SlurmCluster]:
    """Install Slurm if needed, start slurmctld and two slurmd in ``root``, yield the cluster;
    on exit cancel its jobs and stop the three daemons it started (by their own PIDs)."""
    ensure_installed()
    try:
        socket.gethostbyname(NODES[0])
    except OSError as err:
        raise RuntimeError(f"this machine's name {NODES[0]!r} does not resolve ({err}); the first "
                           "node's name is the torchrun rendezvous host (add it to /etc/hosts)") from err
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", *(f"spool/{n}" for n in NODES)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ports = SLURMD_PORTS if all(map(_port_free, SLURMD_PORTS)) else (_free_port(), _free_port())
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, _free_port(), ports))
    # slurmd drops a GPU without device files: eight links to /dev/null stand in for them.
    (root / "gpus").mkdir(exist_ok=True)
    for i in range(8):
        link = root / "gpus" / f"gpu{i}"
        if not link.is_symlink():
            link.symlink_to("/dev/null")
    (root / "gres.conf").write_text(
        "".join(f"NodeName={n} Name=gpu File={root}/gpus/gpu[0-7]\n" for n in NODES))
    path = f"{os.environ.get('PATH', '')}:{_SBIN}"
    cluster = SlurmCluster(root, {"SLURM_CONF": str(conf), "PATH": path})
    env = {**os.environ, **cluster.env}
    # -D: in the foreground, so the PID recorded is the daemon's own; a session of its own so a
    # signal meant for the test run does not reach it. -i / -c: a fresh state every time.
    commands = {"slurmctld": [_which("slurmctld"), "-D", "-i", "-c", "-f", str(conf)]}
    for name in NODES:
        commands[f"slurmd-{name}"] = [_which("slurmd"), "-D", "-N", name, "-f", str(conf)]
    try:
        for name, argv in commands.items():
            with (root / f"{name}.stdout").open("w") as out:
                cluster.daemons[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                         stdin=subprocess.DEVNULL, env=env,
                                                         start_new_session=True)
            if name == "slurmctld":
                time.sleep(1.0)
        _wait_nodes_idle(cluster, start_timeout_s)
        yield cluster
    finally:
        try:
            if "slurmctld" in cluster.daemons and cluster.daemons["slurmctld"].poll() is None:
                cluster.cancel_all()
        finally:
            for name in reversed(list(cluster.daemons)):
                _stop(cluster.daemons[name])


def main(argv: list[str]) -> int:
    """``sudo python3 tests/slurm_cluster.py DIR``: the same cluster by hand, until Ctrl-C."""
    if len(argv) != 1:
        print("usage: python3 tests/slurm_cluster.py DIR   (as root; Ctrl-C stops the cluster)")
        return 2
    def stop(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # also where a background job ignores SIGINT
        signal.signal(sig, stop)
    try:
        with running_cluster(Path(argv[0]).resolve()) as cluster:
            print(f"Slurm is up: nodes {', '.join(NODES)}; in another shell:\n"
                  f"  export SLURM_CONF={cluster.env['SLURM_CONF']}\n  sinfo\n"
                  "Ctrl-C (or SIGTERM) cancels the jobs and stops the daemons.", flush=True)
            while all(p.poll() is None for p in cluster.daemons.values()):
                time.sleep(1)
            print(f"a daemon exited:\n{cluster.logs()}")
            return 1
    except SlurmUnavailable as err:
        print(f"slurm_cluster: {err}")
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
