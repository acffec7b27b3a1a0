"""Child processes with log files, readiness polling and a clean stop that leaves no process of theirs behind.

A child starts in a session (and process group) of its own, so a stop signals the whole group: its
own children (Triton's Python-backend stubs) go with it. ``reap_group_on_exit`` also kills what is
left of the group the moment the child dies on its own (a crash, the OOM killer, a SIGKILL from
outside); ``reap_stale`` finds processes a previous run left behind (by their command line).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from embedstream.errors import RuntimeStartError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class ChildProcess:
    """One server process: started in its own process group, logging to a file, stopped for sure."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        reap_group_on_exit: bool = False,
    ) -> None:
        """``reap_group_on_exit``: SIGKILL the child's process group as soon as the child exits, however."""
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.reap_group_on_exit = reap_group_on_exit
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        except OSError as exc:
            raise RuntimeStartError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        finally:
            log.close()
        if self.reap_group_on_exit:
            proc = self._proc
            threading.Thread(target=self._reap_when_gone, args=(proc,), name=f"reap {self.name}", daemon=True).start()

    @classmethod
    def _reap_when_gone(cls, proc: subprocess.Popen[bytes]) -> None:
        # Polled, not a blocking wait(): a thread blocked in waitpid would hold Popen's lock and make
        # poll() elsewhere report the process alive.
        while proc.poll() is None:
            time.sleep(0.1)
        cls._signal_group(proc, signal.SIGKILL)  # what the child left: e.g. stubs that ignore SIGTERM

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (negative: killed by that signal); None while it runs."""
        return self._proc.poll() if self._proc is not None else None

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeStartError(
                    f"{self.name} exited with code {self._proc.returncode if self._proc else '?'} before {what}; "
                    f"last log lines of {self.log_path}:\n{self.tail()}"
                )
            try:
                if ready():
                    return
            except Exception:  # not ready yet; the server is still coming up
                pass
            time.sleep(0.2)
        raise RuntimeStartError(f"{self.name} not {what} after {timeout_s:.0f}s; see {self.log_path}:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL it after ``timeout_s``; either way nothing of the group is left."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs of SIGTERM: killing its process group", self.name, timeout_s)
        # The leader is gone (or going); members that outlive it (or ignore SIGTERM) are killed too.
        self._signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=5)

    def kill(self) -> None:
        if self._proc is not None:
            self._signal_group(self._proc, signal.SIGKILL)  # even with the leader dead: its group may live on
            self._proc.wait(timeout=5)
        self._proc = None

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group id is the child's pid (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass


def command_lines() -> dict[int, list[str]]:
    """Every process's argv this user can read (Linux /proc; empty elsewhere)."""
    out: dict[int, list[str]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if raw:
            out[int(entry.name)] = raw.rstrip(b"\0").decode(errors="replace").split("\0")
    return out


def reap_stale(match: Callable[[list[str]], bool], what: str) -> list[int]:
    """SIGKILL every process whose argv ``match`` accepts (never this one); returns their pids."""
    killed = []
    for pid, argv in command_lines().items():
        if pid == os.getpid() or not match(argv):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
        killed.append(pid)
    if killed:
        log.warning("killed %d %s left by an earlier run: pids %s", len(killed), what, killed)
        _wait_gone(killed, 5.0)
    return killed


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() and not is_zombie(pid) for pid in pids):
            return
        time.sleep(0.05)


def is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"
