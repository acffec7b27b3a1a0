"""Runs a doc's blocks as a user pastes them: in order, in one fresh working directory per doc.

The working directory looks like a fresh clone's root to the commands (its top-level entries and the
installed ``.venv`` are linked in), so ``.venv/bin/embedstream`` and ``deploy/config/...`` resolve as
written, while every file a block writes (``weights/``, ``model_repository/``, ``labels.csv``) lands
in the fresh directory and is there for the doc's later blocks. ``.embedstream`` is the running
stack's work directory where the doc needs one, as it is after ``embedstream up`` in the clone.
PATH starts with the venv's ``bin``, as after ``source .venv/bin/activate``, which the docs say.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .blocks import ROOT, Block

VENV_BIN = Path(sys.executable).parent
RUN_ID = "DOCS_RUN_ID"
# Tracked top-level entries a command may name; build outputs and caches are not linked.
_LINKED = (
    "Makefile",
    "README.md",
    "deploy",
    "docs",
    "examples",
    "schemas",
    "tests",
    "workers",
    "pyproject.toml",
    "docker-compose.yml",
    "docker-compose.cpu.yml",
    ".ci",
)


@dataclass
class Outcome:
    block: Block
    rc: int
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def report(self) -> str:
        tail = "\n".join(self.output.strip().splitlines()[-40:])
        return f"{self.block.where} ({self.block.need().kind}) exit {self.rc} after {self.seconds:.1f} s:\n{tail}"


@dataclass
class Workspace:
    """One doc's fresh working directory and the environment its blocks run with."""

    path: Path
    stack_workdir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # Every process a block starts inherits it, so what a doc left running (a worker `rollout start
    # --spawn` launched, detached) is found and stopped when the doc is done.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def prepare(self) -> Workspace:
        self.path.mkdir(parents=True, exist_ok=True)
        for name in _LINKED:
            if (ROOT / name).exists() and not (self.path / name).exists():
                (self.path / name).symlink_to(ROOT / name)
        if not (self.path / ".venv").exists():
            (self.path / ".venv").symlink_to(VENV_BIN.parent)
        if self.stack_workdir is not None and not (self.path / ".embedstream").exists():
            (self.path / ".embedstream").symlink_to(self.stack_workdir)
        return self

    def env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("EMBEDSTREAM_") or k == "EMBEDSTREAM_EXPORT_CACHE"
        }
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
        env["PYTHONUNBUFFERED"] = "1"
        # What the docs start listens on loopback only (a sink's health endpoint defaults to 0.0.0.0).
        env["EMBEDSTREAM_HEALTH_HOST"] = "127.0.0.1"
        env[RUN_ID] = self.run_id
        env.update(self.extra_env)
        return env

    @property
    def state(self) -> Path:
        return self.path.parent / f"{self.path.name}.shell-state"

    def argv(self, block: Block) -> list[str]:
        """bash with the doc's shell state: the variables earlier blocks exported and the directory they
        left, as in one terminal where the blocks are pasted in order."""
        self.state.mkdir(exist_ok=True)
        env, cwd = self.state / "env", self.state / "cwd"
        body = f'exec {VENV_BIN / "python"} -c "$DOCS_RUN_PYTHON"' if block.lang == "python" else block.text
        script = (
            f'[ -f "{env}" ] && . "{env}"\n'
            f'[ -f "{cwd}" ] && cd "$(cat "{cwd}")"\n'
            f'trap \'export -p > "{env}"; pwd > "{cwd}"\' EXIT\n'
            # -e and pipefail: a failing command fails the block, where an interactive shell would go on.
            "set -e -o pipefail\n"
            f"{body}\n"
        )
        return ["bash", "-c", script]

    def _env(self, block: Block) -> dict[str, str]:
        env = self.env()
        if block.lang == "python":
            env["DOCS_RUN_PYTHON"] = block.text
        return env

    def _process(self, block: Block) -> dict[str, Any]:
        """How a block's bash starts, run to the end or in the background: output merged, in its own session."""
        return {
            "args": self.argv(block),
            "cwd": self.path,
            "env": self._env(block),
            "stdout": subprocess.PIPE,
            "stderr": subprocess.STDOUT,
            "text": True,
            "start_new_session": True,
        }

    def run(self, block: Block, timeout_s: float) -> Outcome:
        started = time.monotonic()
        try:
            done = subprocess.run(**self._process(block), timeout=timeout_s)
            return Outcome(block, done.returncode, done.stdout, time.monotonic() - started)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return Outcome(block, 124, out + f"\n(timed out after {timeout_s:.0f} s)", time.monotonic() - started)

    def start(self, block: Block) -> Running:
        return Running(block, subprocess.Popen(**self._process(block)), time.monotonic())


@dataclass
class Running:
    """A ``background`` or ``serve`` block: a process group the runner stops with Ctrl-C's signal."""

    block: Block
    proc: subprocess.Popen[str]
    started: float
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(re.search(pattern, line) for line in list(self.lines)):
                return True
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the pump may still hold the last lines
                return any(re.search(pattern, line) for line in list(self.lines))
            time.sleep(0.2)
        return False

    def interrupt(self, timeout_s: float = 60.0) -> Outcome:
        """Ctrl-C: SIGINT to the block's process group. An exit before it counts as a failure."""
        early = self.proc.poll()
        if early is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                self.lines.append(f"(still running {timeout_s:.0f} s after SIGINT; killed)")
                return Outcome(self.block, 124, self.output, time.monotonic() - self.started)
        else:
            self.lines.append(f"(exited {early} before it was stopped)")
            return Outcome(self.block, early or 1, self.output, time.monotonic() - self.started)
        rc = self.proc.returncode
        return Outcome(
            self.block, 0 if rc in (0, 130, -signal.SIGINT) else rc, self.output, time.monotonic() - self.started
        )

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


READY = r"^ready:"
# How long a background block may take to print what the doc waits for (`up`: export and start).
WAIT_S = 300.0


def _wait_patterns(reason: str) -> list[str]:
    """``wait A and B``: lines matching each of A and B, in any order."""
    return [p.strip() for p in reason.split("wait", 1)[1].split(" and ")] if reason.startswith("wait") else []


def run_doc(blocks: Sequence[Block], space: Workspace, timeout_s: float = 600.0, reap: bool = True) -> list[Outcome]:
    """Every runnable block of one doc, in order; background blocks stopped after the last one, and (``reap``)
    whatever else the doc's blocks left running."""
    outcomes: list[Outcome] = []
    background: list[Running] = []
    try:
        for block in blocks:
            need = block.need()
            if need.kind in ("fresh", "stack"):
                outcomes.append(space.run(block, timeout_s))
            elif need.kind in ("background", "up"):
                running = space.start(block)
                background.append(running)
                patterns = [READY] if need.kind == "up" else _wait_patterns(need.reason)
                if not patterns:
                    time.sleep(3.0)  # a user starts it, then types the next command
                elif missing := [p for p in patterns if not running.wait_for(p, WAIT_S)]:
                    running.lines.append(f"(no line matching {missing} within {WAIT_S:.0f} s)")
                    background.remove(running)
                    stopped = running.interrupt()
                    outcomes.append(Outcome(block, stopped.rc or 1, stopped.output, stopped.seconds))
                    break  # what follows needs it
    finally:
        for running in reversed(background):
            outcomes.append(running.interrupt())
        if reap:
            stop_leftovers(space.run_id)
    return outcomes


def stop_leftovers(run_id: str, grace_s: float = 15.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace_s``, to every process that still carries the doc's run id."""
    marker = f"{RUN_ID}={run_id}".encode()

    def carriers() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    left = carriers()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while (alive := carriers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not alive:
            break
    return left
