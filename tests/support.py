"""What every test harness needs: a free port, and a program under test run in the background.

The registry, containerd, ``detour serve`` and ``detour webhook`` are all started the same
way: output to a log file, a readiness probe polled until a deadline, and a stop that asks
with SIGTERM and kills if asked in vain. :class:`Daemon` does that once, so each harness says
only what is its own (the command line, the probe, how long a stop may take), and a failed
start shows the end of the program's log rather than all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout: deploy/, Dockerfile, README.md
LOG_TAIL_LINES = 60


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a client command (ctr, docker, podman, skopeo) did: its exit code and output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> CommandResult:
        """Raise with the output unless ``returncode`` is 0."""
        if self.returncode != 0:
            raise RuntimeError(
                f"{' '.join(self.argv)} -> {self.returncode}\n{self.stdout}\n{self.stderr}"
            )
        return self


async def run_command(
    *argv: str, limit: float = 120.0, env: Mapping[str, str] | None = None
) -> CommandResult:
    """Run ``argv`` without blocking the loop; killed (exit -9) if it outlives ``limit``."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else dict(env),
    )
    try:
        async with asyncio.timeout(limit):
            out, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        out, err = await proc.communicate()
    code = -9 if proc.returncode is None else proc.returncode
    return CommandResult(argv, code, out.decode(errors="replace"), err.decode(errors="replace"))


def stop_child(proc: subprocess.Popen[bytes], grace: float, sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` (unless it has exited), wait up to ``grace`` seconds, then SIGKILL: the
    exit code. Blocks: from a coroutine, run it with ``asyncio.to_thread``."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ("" if there is none yet)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Daemon:
    """One program under test, in the background, with its output in ``log_path``.

    ``start`` spawns it and returns once ``ready()`` says so; if it exits first or the
    deadline passes, it is stopped and ``RuntimeError`` carries its log's tail. ``stop``
    sends SIGTERM, waits ``grace`` seconds, then kills. ``fresh_log`` truncates the log on each
    start (else restarts append); ``own_session`` puts it in a session of its own, out of the
    reach of a terminal's Ctrl-C.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        grace: float,
        env: Mapping[str, str] | None = None,
        fresh_log: bool = False,
        own_session: bool = True,
        interval: float = 0.02,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.grace = grace
        self.env = env
        self.fresh_log = fresh_log
        self.own_session = own_session
        self.interval = interval
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start it without waiting for it to be ready."""
        with self.log_path.open("wb" if self.fresh_log else "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if self.env is None else dict(self.env),
                start_new_session=self.own_session,
            )
        return self.proc

    def _check(self, deadline: float, limit: float) -> None:
        """Raise (having stopped it) if it exited or the deadline passed."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            code, self.proc = self.proc.returncode, None
            raise RuntimeError(f"{self.name} exited with {code}:\n{self.log_tail()}")
        if time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"{self.name} did not answer in {limit}s:\n{self.log_tail()}")

    def start(self, ready: Callable[[], bool], limit: float) -> None:
        """Spawn, then poll ``ready`` until it is true (blocking)."""
        self.spawn()
        deadline = time.monotonic() + limit
        while True:
            assert self.proc is not None
            if self.proc.poll() is None and ready():
                return
            self._check(deadline, limit)
            time.sleep(self.interval)

    async def start_async(self, ready: Callable[[], Awaitable[bool]], limit: float) -> None:
        """Spawn, then poll ``ready`` until it is true, sleeping with ``asyncio.sleep`` so an
        in-process server in the same loop keeps running."""
        self.spawn()
        deadline = time.monotonic() + limit
        while True:
            assert self.proc is not None
            if self.proc.poll() is None and await ready():
                return
            self._check(deadline, limit)
            await asyncio.sleep(self.interval)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None, f"{self.name} not running"
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop it (see :func:`stop_child`); its exit code, or None if it was not started."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        return stop_child(proc, self.grace, sig)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)
