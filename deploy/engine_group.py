"""The sharded engine: one group of ranks, started by mlx.launch, living and dying as one.

mlx.launch starts every rank (a host named 127.0.0.1 as its own child, any other through an
`ssh -tt` client) and relays their output. Measured: when a rank exits non-zero it SIGTERMs
the others and exits 0, so its exit code means nothing but its exit means the group is gone;
a rank that ignores SIGTERM keeps it waiting forever. Hence the group runs in a session of
its own, and it is dead when mlx.launch exits, when one of its children (a local rank, or the
ssh client of a remote one) exits, when rank 0 stops answering status queries, or when the
handshake after a start fails; then the whole session is SIGKILLed. Watching the children
matters: the ranks left wait inside a collective for the lost one until rank 0's own bound
(engine/group.py) ends them, and a rank blocked there cannot act on mlx.launch's SIGTERM. A
remote rank dies with its ssh client: killing the client hangs up the remote pty (SIGHUP).
mlx.launch itself runs inside deploy.group_launch, which kills the session if mlx-server dies.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec
import psutil
import zmq

from deploy.hostfile import read_hostfile
from ipc import codec, runtime
from ipc.messages import EngineStatus, StatusQuery
from ipc.sockets import connect_dealer

log = logging.getLogger("mlx-server")

LAUNCHER = "mlx.launch"  # mlx's console script; there is no `python -m mlx.launch`
# The ring's listening ports are picked afresh at every start, below the ephemeral ranges
# (Linux 32768+, macOS 49152+), so several instances on one machine and a restart while the
# old ports sit in TIME_WAIT never collide.
RING_PORTS = range(20000, 32000)
PORT_PICK_ATTEMPTS = 64
# Rank 0 stops a group whose follower hangs by itself (a collective that never returns) within
# seconds; this catches rank 0 itself wedged. Like the HTTP workers' silence limit, it must
# exceed any single engine step (a first-request kernel compile, a long prefill chunk).
GROUP_SILENCE_LIMIT_S = 120.0
STATUS_PROBE_INTERVAL_S = 1.0
# The seconds between SIGTERM's checks that every process of the session is gone.
STOP_POLL_S = 0.1


def launcher_path(python: str = sys.executable) -> str:
    """The mlx.launch script of this interpreter's environment (else on PATH)."""
    beside = Path(python).parent / LAUNCHER  # no resolve(): keep the venv's bin
    if beside.is_file():
        return str(beside)
    found = shutil.which(LAUNCHER)
    if found is None:
        raise OSError(f"cannot find {LAUNCHER} next to {python} or on PATH: install mlx")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))  # every interface: a rank may listen on any of this host's IPs
        except OSError:
            return False
    return True


def free_port_range(count: int, rng: random.Random | None = None) -> int:
    """The first of `count` consecutive ports that are free here (remote hosts: unchecked)."""
    rng = rng or random.Random()
    for _ in range(PORT_PICK_ATTEMPTS):
        first = rng.randrange(RING_PORTS.start, RING_PORTS.stop - count)
        if all(_port_free(port) for port in range(first, first + count)):
            return first
    raise OSError(errno.EADDRINUSE, f"no {count} consecutive free ports in {RING_PORTS.start}-{RING_PORTS.stop}")


def ports_needed(group: runtime.DistributedConfig) -> int:
    if group.backend in ("jaccl", "nccl"):
        return 1  # the coordinator (jaccl) or rendezvous (nccl), at rank 0's first IP
    if group.hostfile is None:
        return group.ranks  # mlx.launch -n: one 127.0.0.1 port per rank
    return read_hostfile(Path(group.hostfile)).ring_ports()


def remote_config(config: runtime.RuntimeConfig) -> str | None:
    """The config for ranks reached over ssh (they do not inherit our environment), or None.

    It travels on mlx.launch's and ssh's command lines, which other users can see (ps), so
    the API keys stay out: no rank serves HTTP."""
    group = config.distributed
    if group is None or group.hostfile is None or read_hostfile(Path(group.hostfile)).all_local:
        return None
    web = msgspec.structs.replace(config.web, api_keys=())
    return runtime.encode(msgspec.structs.replace(config, web=web))


def port_flag(backend: str) -> str:
    """mlx.launch's flag for a group's first port: nccl's rendezvous, or the ring's (and jaccl's) ports."""
    return "--nccl-port" if backend == "nccl" else "--starting-port"


def launch_command(
    group: runtime.DistributedConfig, starting_port: int, restarts: int, config_for_remote: str | None
) -> list[str]:
    """mlx.launch running `python -m engine` on every rank (the config comes from the environment),
    through deploy.group_launch: the group dies with mlx-server even if it is SIGKILLed."""
    command = [sys.executable, "-m", "deploy.group_launch", launcher_path(), "--backend", group.backend]
    command += ["--hostfile", group.hostfile] if group.hostfile else ["-n", str(group.ranks)]
    # --python: every host runs the engine with this interpreter's path (the same venv path on each Mac).
    command += [port_flag(group.backend), str(starting_port), "--python", sys.executable]
    if config_for_remote is not None:
        command += ["--env", f"{runtime.CONFIG_ENV}={config_for_remote}"]
    return [*command, "--", "-m", "engine", "--restarts", str(restarts)]


def _describe(child: psutil.Process) -> str:
    """ "rank N (process P)" for a local rank (mlx.launch exports MLX_RANK before exec), else
    the ssh client of a remote one."""
    try:
        rank = child.environ().get("MLX_RANK")
    except psutil.Error:  # macOS may refuse another process's environment
        rank = None
    return f"rank {rank} (process {child.pid})" if rank else f"the ssh client of a remote rank (process {child.pid})"


class RankZeroWatch:
    """Asks rank 0 for its status every STATUS_PROBE_INTERVAL_S, without ever blocking;
    `silent_s()` is how long it has not answered."""

    def __init__(self, address: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ctx = zmq.Context()
        self._sock = connect_dealer(self._ctx, address, f"supervisor-watch-{os.getpid()}".encode())
        self._answered_at = clock()
        self._asked_at = float("-inf")
        self._queries = 0

    def silent_s(self) -> float:
        now = self._clock()
        while self._sock.poll(0):
            if isinstance(codec.decode_engine_message(self._sock.recv()), EngineStatus):
                self._answered_at = now
        if now - self._asked_at >= STATUS_PROBE_INTERVAL_S:
            self._queries += 1
            self._sock.send(codec.encode(StatusQuery(f"watch-{self._queries}")), zmq.NOBLOCK)
            self._asked_at = now
        return now - self._answered_at

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()


LaunchCommand = Callable[[runtime.DistributedConfig, int, int, "str | None"], list[str]]


class EngineGroup:
    """The ranks of one sharded engine: start, tell death, kill, stop; always as a whole."""

    def __init__(
        self, config: runtime.RuntimeConfig, environment: Mapping[str, str], launch: LaunchCommand = launch_command
    ) -> None:
        assert config.distributed is not None
        self._launch = launch
        self.group = config.distributed
        self.address = config.ipc_address
        self.environment = dict(environment)
        self.config_for_remote = remote_config(config)
        self.proc: subprocess.Popen | None = None
        self._watch: RankZeroWatch | None = None
        # mlx.launch's children once the group is up, each with how to name it in a log line.
        self._ranks: list[tuple[psutil.Process, str]] = []

    def start(self, restarts: int) -> subprocess.Popen:
        port = free_port_range(ports_needed(self.group))
        command = self._launch(self.group, port, restarts, self.config_for_remote)
        log.info(
            "starting the engine group: %d ranks, %s mode, %s backend, ports from %d",
            self.group.ranks, self.group.mode, self.group.backend, port,
        )  # fmt: skip
        # stdin: a pipe kept open and never written. mlx.launch relays its stdin to every rank
        # and makes it non-blocking (a terminal's would be ours too); at EOF (/dev/null) its
        # select() would return at once, forever.
        self.proc = subprocess.Popen(command, env=self.environment, stdin=subprocess.PIPE, start_new_session=True)
        return self.proc

    def watch(self) -> None:
        """Start watching the ranks and asking rank 0 for its status (after the handshake:
        rank 0 answers only once every rank has joined the group)."""
        assert self.proc is not None
        self._close_watch()
        self._watch = RankZeroWatch(self.address)
        try:
            self._ranks = [(child, _describe(child)) for child in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            self._ranks = []  # mlx.launch is gone already: dead() says so next

    def _lost_rank(self) -> str | None:
        """Which rank process (or remote rank's ssh client) exited, if one did."""
        for child, name in self._ranks:
            try:
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                    continue
            except psutil.NoSuchProcess:
                pass
            return name
        return None

    def dead(self) -> str | None:
        """Why the group is gone, having killed what was left of it; None while it serves."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            reason = "mlx.launch exited (a rank of the engine group stopped)"
        elif (lost := self._lost_rank()) is not None:
            reason = f"{lost} of the engine group exited"
        elif self._watch is not None and (silent := self._watch.silent_s()) > GROUP_SILENCE_LIMIT_S:
            reason = f"rank 0 of the engine group did not answer for {silent:.0f} s"
        else:
            return None
        self.kill()
        return reason

    def kill(self) -> None:
        """SIGKILL every process of the session at once: nothing of the group outlives this."""
        self._close_watch()
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait()
        self._close_stdin()

    def stop(self, timeout_s: float) -> None:
        """SIGTERM every rank; SIGKILL whatever is left of the session after timeout_s."""
        self._close_watch()
        if self.proc is None:
            return
        self._terminate_ranks()
        deadline = time.monotonic() + timeout_s
        while self._session_alive() and time.monotonic() < deadline:
            time.sleep(STOP_POLL_S)
        if self._session_alive():
            log.warning("the engine group did not stop within %.0f s; killing it", timeout_s)
        self.kill()

    def _terminate_ranks(self) -> None:
        # The ranks, not mlx.launch: it relays their last log lines and exits after them (a
        # SIGTERMed mlx.launch dies at once, and those lines with it). Without it, everyone.
        assert self.proc is not None
        try:
            children = psutil.Process(self.proc.pid).children() if self.proc.poll() is None else []
        except psutil.NoSuchProcess:
            children = []
        if not children:
            self._signal(signal.SIGTERM)
        for child in children:
            try:
                child.terminate()
            except psutil.NoSuchProcess:
                pass

    def _session_alive(self) -> bool:
        assert self.proc is not None
        self.proc.poll()  # reap mlx.launch: a zombie would count as alive below
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _signal(self, signum: int) -> None:
        assert self.proc is not None
        try:
            # The session's id is mlx.launch's pid, also its process group's; the ranks and ssh
            # clients are its children in that group.
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass  # every process of the session is gone already

    def _close_watch(self) -> None:
        self._ranks = []
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def _close_stdin(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
