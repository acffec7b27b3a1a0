"""Which local processes a rollout may signal: the ``embedstream worker`` processes it launched, and the
workers of a retired version's consumer group on this host; nothing else.

A pid alone names any process once the worker it was has exited, and the alias document may sit on
shared storage that others can write. So a launched worker is recorded with its host, its start time
(``/proc/<pid>/stat``, in clock ticks since boot) and its config, and checked against the live process
before any signal; a process found by group must be an ``embedstream worker`` whose own config (and
environment) names that group. Anything else is refused with the reason.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

PROC = Path("/proc")


class LocalWorker(BaseModel):
    """A worker process as ``rollout start --spawn`` launched it."""

    model_config = ConfigDict(frozen=True)

    pid: int
    host: str
    started: int  # the process's start time, clock ticks after boot (field 22 of /proc/<pid>/stat)
    config: str  # the absolute path of its --config


@dataclass(frozen=True)
class Running:
    pid: int
    started: int
    argv: list[str]
    cwd: Path | None
    env: dict[str, str]

    def config(self) -> Path | None:
        """The --config of an ``embedstream worker`` command line, resolved in its directory; else None."""
        argv = self.argv
        for i, word in enumerate(argv[:-1]):
            rest = argv[i + 1 :]
            if (word == "embedstream" or word.endswith("/embedstream")) and rest[:1] == ["worker"]:
                break
            if word == "-m" and rest[:2] == ["embedstream", "worker"]:
                break
        else:
            return None
        for flag, value in itertools.pairwise(argv):
            if flag == "--config":
                path = Path(value)
                return path if path.is_absolute() or self.cwd is None else self.cwd / path
        return None


def read_process(pid: int, proc: Path = PROC) -> Running | None:
    base = proc / str(pid)
    try:
        stat = (base / "stat").read_text()
        argv = [a for a in (base / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    try:
        cwd: Path | None = Path(os.readlink(base / "cwd"))
    except OSError:
        cwd = None
    try:
        raw = (base / "environ").read_bytes().decode(errors="replace").split("\0")
        env = dict(e.split("=", 1) for e in raw if "=" in e and e.startswith("EMBEDSTREAM_"))
    except OSError:
        env = {}
    return Running(pid, int(fields[19]), argv, cwd, env)


def record(pid: int, config: Path, proc: Path = PROC) -> LocalWorker:
    """What ``rollout start --spawn`` writes down for a process it just launched."""
    running = read_process(pid, proc)
    if running is None:
        raise ProcessLookupError(f"worker {pid} exited at once; see its log")
    return LocalWorker(pid=pid, host=socket.gethostname(), started=running.started, config=str(config.resolve()))


def mismatch(worker: LocalWorker, proc: Path = PROC) -> str | None:
    """None while ``worker`` is the live process it was recorded as; else why it must not be signalled."""
    if worker.host != socket.gethostname():
        return f"recorded on host {worker.host}, not this one ({socket.gethostname()})"
    running = read_process(worker.pid, proc)
    if running is None:
        return "exited"
    if running.started != worker.started:
        return f"pid {worker.pid} is another process now (started at tick {running.started}, not {worker.started})"
    config = running.config()
    if config is None or str(config.resolve()) != worker.config:
        return (
            f"pid {worker.pid} runs `{' '.join(running.argv)[:120]}`, not `embedstream worker --config {worker.config}`"
        )
    return None


def reads_as(running: Running) -> tuple[str, str] | None:
    """(consumer group, bootstrap servers) of an ``embedstream worker`` process: its environment first, then
    its config file, then the settings' defaults; None when it is no worker or its config cannot be read."""
    from embedstream.config import KafkaSettings

    config = running.config()
    if config is None:
        return None
    try:
        kafka = tomllib.loads(config.read_text()).get("kafka", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    fields = KafkaSettings.model_fields
    group = running.env.get("EMBEDSTREAM_KAFKA__GROUP_ID", kafka.get("group_id", fields["group_id"].default))
    servers = running.env.get(
        "EMBEDSTREAM_KAFKA__BOOTSTRAP_SERVERS", kafka.get("bootstrap_servers", fields["bootstrap_servers"].default)
    )
    return str(group), str(servers)


def workers_of_group(group: str, bootstrap_servers: str, proc: Path = PROC) -> Iterator[Running]:
    """The ``embedstream worker`` processes on this host that read as ``group`` from the same brokers (another
    stack's group of the same name is left alone)."""
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        running = read_process(int(entry.name), proc)
        if running is not None and reads_as(running) == (group, bootstrap_servers):
            yield running


@dataclass(frozen=True)
class Stopped:
    signalled: list[int]
    refused: list[tuple[int, str]]  # (pid, why it was not signalled)


def stop_workers(
    recorded: list[LocalWorker],
    pids_only: list[int],
    group: str | None,
    bootstrap_servers: str,
    proc: Path = PROC,
    kill: Callable[[int, int], None] = os.kill,
) -> Stopped:
    """SIGTERM (a worker drains its in-flight batches and exits 0) to the recorded workers that are still
    themselves and to the group's workers on this host; every other pid is refused with the reason."""
    signalled: list[int] = []
    refused: list[tuple[int, str]] = []
    for worker in recorded:
        reason = mismatch(worker, proc)
        if reason is None:
            kill(worker.pid, signal.SIGTERM)
            signalled.append(worker.pid)
        elif reason != "exited":
            refused.append((worker.pid, reason))
    # Documents written before workers were recorded with their identity.
    refused += [(pid, "recorded by pid alone, so it cannot be told from another process") for pid in pids_only]
    if group is not None:
        for running in workers_of_group(group, bootstrap_servers, proc):
            if running.pid not in signalled:
                kill(running.pid, signal.SIGTERM)
                signalled.append(running.pid)
    return Stopped(signalled, refused)
