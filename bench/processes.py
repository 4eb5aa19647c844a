"""The bench's child processes: the servers it measures (:class:`Service`, each in a session
of its own, stopped as a group) and the short-lived tools it runs with asyncio (curl, openssl,
wrk, py-spy), every one killed by pid on the way out, errors and Ctrl-C included."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common import USER_AGENT

# Every child started with asyncio (curl, openssl, wrk, py-spy): killed by pid on the way out.
CHILDREN: set[int] = set()


class Service:
    """A server subprocess in its own session, its output in ``log_path``."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, *, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, f"{self.name} not started"
        return self._proc.pid

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=self.cwd,
                start_new_session=True,
            )

    def exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def wait_ready(self, url: str, timeout: float = 20.0) -> None:
        """Until ``GET url`` answers 200 (or 401), or fail with the log's tail."""
        parts = urlsplit(url)
        deadline = time.monotonic() + timeout
        while True:
            code = self.exit_code()
            if code is not None:
                raise RuntimeError(f"{self.name} exited with {code}:\n{self.log_tail()}")
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=2)
            try:
                conn.request("GET", parts.path, headers={"User-Agent": f"{USER_AGENT}-ready"})
                if conn.getresponse().status in (200, 401):
                    return
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, grace: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the group is its pid
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _proc_text(self, name: str) -> str | None:
        """``/proc/<pid>/<name>``, None once gone."""
        if self._proc is None:
            return None
        try:
            return Path(f"/proc/{self._proc.pid}/{name}").read_text()
        except OSError:
            return None

    def status_kib(self, key: str) -> int | None:
        """A ``/proc/<pid>/status`` field in KiB (VmRSS, VmHWM), None once gone."""
        text = self._proc_text("status")
        match = None if text is None else re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        return int(match[1]) if match else None

    def _stat_fields(self) -> list[str] | None:
        """``/proc/<pid>/stat`` after the command's name (which may hold spaces), from the
        state on; None once gone."""
        stat = self._proc_text("stat")
        return None if stat is None else stat.rsplit(")", 1)[1].split()

    def cpu_seconds(self) -> float | None:
        """The processor time it has used so far, every thread's, user and system (utime +
        stime in ``/proc/<pid>/stat``); None once gone."""
        fields = self._stat_fields()
        if fields is None:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def minor_faults(self) -> int | None:
        """The pages it has faulted in so far (``minflt`` in ``/proc/<pid>/stat``): memory taken
        from the kernel anew rather than reused; None once gone."""
        fields = self._stat_fields()
        return None if fields is None else int(fields[7])

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM (``echo 5 > /proc/<pid>/clear_refs``, Linux >= 4.0)."""
        if self._proc is None:
            return False
        try:
            Path(f"/proc/{self._proc.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def spawn(*argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*argv, **kwargs)
    CHILDREN.add(proc.pid)
    return proc


async def reap(proc: asyncio.subprocess.Process) -> tuple[int, bytes, bytes]:
    try:
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        CHILDREN.discard(proc.pid)
    assert proc.returncode is not None
    return proc.returncode, out or b"", err or b""


def kill_children() -> None:
    for pid in list(CHILDREN):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    CHILDREN.clear()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
