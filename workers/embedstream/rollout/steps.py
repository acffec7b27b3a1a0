"""The rollout's steps on the document (``embedstream.aliases``): each reads it, checks, and writes it back once.

``start`` places the new version's consumer group and names it the candidate; ``switch`` makes the
candidate serve and keeps the old version as the one a rollback returns to; ``rollback`` swaps them
back; ``retire`` stops a version's local workers and drops its table once its retention has passed.
Each is one write of the document, so readers move from one version to the other in one step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from embedstream.aliases import Alias, Deployed, ModelRef, Retired, RolloutState, load, save
from embedstream.config import KafkaSettings
from embedstream.errors import ConfigError
from embedstream.rollout import kafka as rk
from embedstream.rollout.local_workers import LocalWorker, Stopped

log = logging.getLogger(__name__)


def _edit(location: str) -> tuple[RolloutState, int]:
    state = load(location)
    return state.model_copy(deep=True), state.revision


def start(
    location: str,
    alias: str,
    new: ModelRef,
    group: str,
    topics: Sequence[str],
    kafka: KafkaSettings,
    *,
    serving: Deployed | None = None,
    start_offset: int | None = None,
    start_time_ms: int | None = None,
    now: float | None = None,
) -> Alias:
    """Name ``new`` the alias's candidate and commit its group's start offsets (unless it has some already).

    Again for the same candidate, it changes nothing that was recorded: the start offsets (the status's
    0 %), the start time and the workers stay, unless ``start_offset`` or ``start_time_ms`` moves the group."""
    state, revision = _edit(location)
    entry = state.aliases.get(alias)
    if entry is None:
        if serving is None:
            raise ConfigError(f"alias {alias!r} is new: name the version serving it now (--serving-config)")
        entry = Alias(serving=serving)
    if new == entry.serving.model:
        raise ConfigError(f"{new} already serves {alias!r}")
    if entry.candidate is not None and entry.candidate.model != new:
        raise ConfigError(f"{entry.candidate.model} is being rolled out for {alias!r}: switch to it or retire it first")
    if group == entry.serving.group_id:
        raise ConfigError(f"{new} needs a consumer group of its own; {group!r} is the serving version's")
    when = time.time() if now is None else now
    moved = start_offset is not None or start_time_ms is not None
    again = entry.candidate is not None and entry.candidate.group_id == group and not moved
    if again and entry.candidate is not None:  # the same rollout: its progress is measured from where it began
        entry.record("start", new, "again: start offsets and progress kept", when)
        state.aliases[alias] = entry
        save(location, state, revision)
        return entry
    placed = rk.committed_offsets(kafka, group, topics)
    if not placed or moved:
        placed = rk.place_group(kafka, group, topics, start_offset=start_offset, start_time_ms=start_time_ms)
    old = entry.candidate
    entry.candidate = Deployed(
        model=new,
        group_id=group,
        topics=list(topics),
        start_offsets=placed,
        workers=old.workers if old is not None else [],
        worker_pids=old.worker_pids if old is not None else [],
        started_at=when,
    )
    entry.record("start", new, f"group {group} from {placed}", when)
    state.aliases[alias] = entry
    save(location, state, revision)
    return entry


def add_workers(
    location: str, alias: str, workers: Sequence[LocalWorker], gone: Callable[[LocalWorker], bool] | None = None
) -> None:
    """Record processes ``rollout start --spawn`` launched for the candidate, so ``retire`` can stop them;
    recorded ones that are gone (``gone``: exited, or their pid is another process now) are dropped."""
    state, revision = _edit(location)
    candidate = state.alias(alias).candidate
    if candidate is None:
        raise ConfigError(f"alias {alias!r} has no rollout under way")
    kept = [w for w in candidate.workers if gone is None or not gone(w)]
    candidate.workers = [*kept, *workers]
    save(location, state, revision)


@dataclass(frozen=True)
class Progress:
    """The candidate's backfill: per-partition lag, what is done, and (from two looks) a rate and an ETA."""

    partitions: list[rk.PartitionLag]
    rate: float | None = None  # input records per second between two looks
    rows: dict[str, int] | None = None  # stored rows per version (LanceDB), where a store was given

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def done(self) -> int:
        return sum(p.done for p in self.partitions)

    @property
    def total(self) -> int:
        return sum(p.total for p in self.partitions)

    @property
    def eta_s(self) -> float | None:
        if self.lag == 0:
            return 0.0
        return self.lag / self.rate if self.rate else None


def progress(
    location: str, alias: str, kafka: KafkaSettings, *, previous: Progress | None = None, elapsed_s: float = 0.0
) -> Progress:
    candidate = _candidate(load(location).alias(alias), alias)
    assert candidate.group_id is not None  # start always sets it
    parts = rk.group_lag(kafka, candidate.group_id, candidate.topics, candidate.start_offsets)
    rate = None
    if previous is not None and elapsed_s > 0:
        rate = max(0.0, (sum(p.done for p in parts) - previous.done) / elapsed_s)
    return Progress(parts, rate)


def _candidate(entry: Alias, alias: str) -> Deployed:
    if entry.candidate is None:
        if entry.previous is not None:
            raise ConfigError(
                f"alias {alias!r} has no rollout under way: {entry.serving.model} serves and {entry.previous.model} "
                f"is kept; `embedstream rollout rollback` moves readers to {entry.previous.model}, "
                "`embedstream rollout start` begins a new rollout"
            )
        raise ConfigError(f"alias {alias!r} has no rollout under way (start one with `embedstream rollout start`)")
    return entry.candidate


def switch(
    location: str,
    alias: str,
    *,
    lag: Callable[[Deployed], int] | None = None,
    rows: Callable[[ModelRef], int] | None = None,
    max_lag: int = 0,
    min_coverage: float = 1.0,
    now: float | None = None,
) -> Alias:
    """Make the candidate serve, in one write. Refused while its group lags by more than ``max_lag`` input
    records, or while its stored rows are fewer than ``min_coverage`` of the serving version's (each check
    only where its measure is given: ``lag`` reads Kafka, ``rows`` a store)."""
    state, revision = _edit(location)
    entry = state.alias(alias)
    candidate = _candidate(entry, alias)
    if lag is not None and (behind := lag(candidate)) > max_lag:
        raise ConfigError(f"{candidate.model} is {behind} input records behind (at most {max_lag}): not caught up")
    if rows is not None:
        have, serving_rows = rows(candidate.model), rows(entry.serving.model)
        if have < min_coverage * serving_rows:
            raise ConfigError(
                f"{candidate.model} has {have} stored rows, {entry.serving.model} {serving_rows}: "
                f"below the {min_coverage:.0%} coverage a switch needs"
            )
    when = time.time() if now is None else now
    if entry.previous is not None:
        # Only one version is kept for a rollback: an older one kept until now is retired, its table
        # dropped by the next `retire` (stop its workers, if any still run, yourself).
        entry.retired.append(Retired(model=entry.previous.model, retired_at=when, drop_after=when))
        entry.record("retire", entry.previous.model, "replaced as the rollback version by a switch", when)
    entry.previous, entry.serving, entry.candidate = entry.serving, candidate, None
    entry.record("switch", candidate.model, f"from {entry.previous.model}", when)
    save(location, state, revision)
    return entry


def rollback(location: str, alias: str, now: float | None = None) -> Alias:
    """Back to the version the last switch replaced, in one write, while it is still kept."""
    state, revision = _edit(location)
    entry = state.alias(alias)
    if entry.previous is None:
        raise ConfigError(f"alias {alias!r} has no earlier version kept to roll back to")
    entry.serving, entry.previous = entry.previous, entry.serving
    entry.record("rollback", entry.serving.model, f"from {entry.previous.model}", now)
    save(location, state, revision)
    return entry


@dataclass(frozen=True)
class Retirement:
    retired: ModelRef | None
    stopped: Stopped
    group_id: str | None
    dropped: list[ModelRef]  # tables dropped
    missing: list[ModelRef]  # versions past their retention that had no table to drop


def retire(
    location: str,
    alias: str,
    *,
    which: Literal["previous", "candidate"] = "previous",
    retention_s: float,
    drop_table: Callable[[ModelRef], bool],
    stop: Callable[[Deployed], Stopped],
    now: float | None = None,
) -> Retirement:
    """Retire the kept previous version (or abandon the candidate): stop its local workers, keep its table
    for ``retention_s``; and drop the tables of versions retired earlier whose retention has passed."""
    when = time.time() if now is None else now
    state, revision = _edit(location)
    entry = state.alias(alias)
    target = entry.previous if which == "previous" else entry.candidate
    stopped = Stopped([], [])
    if target is not None:
        stopped = stop(target)
        entry.retired.append(Retired(model=target.model, retired_at=when, drop_after=when + retention_s))
        entry.record("retire", target.model, f"{which}; table kept until {when + retention_s:.0f}", when)
        if which == "previous":
            entry.previous = None
        else:
            entry.candidate = None
    dropped: list[ModelRef] = []
    missing: list[ModelRef] = []
    live = {d.model for d in (entry.serving, entry.previous, entry.candidate) if d is not None}
    for r in entry.retired:
        if not r.dropped and when >= r.drop_after and r.model not in live:
            (dropped if drop_table(r.model) else missing).append(r.model)
            r.dropped = True
            entry.record("drop", r.model, "" if r.model in dropped else "no table", when)
    save(location, state, revision)
    return Retirement(target.model if target else None, stopped, target.group_id if target else None, dropped, missing)


def describe(entry: Alias) -> dict[str, Any]:
    """The alias as one line each: serving, kept for rollback, rolling out."""
    return {
        "serving": str(entry.serving.model),
        "previous": str(entry.previous.model) if entry.previous else None,
        "candidate": str(entry.candidate.model) if entry.candidate else None,
    }
