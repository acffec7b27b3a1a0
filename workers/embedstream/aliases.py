"""Which model version readers use: the rollout document, one per deployment, replaced whole on every change.

An alias (``ts``, ``images``) names what readers ask for; the document says which version serves it,
which one it replaced (kept for a rollback), and which one is being backfilled. The switch is one
replacement of the document: ``os.replace`` locally, a single PUT on object storage (both atomic), so a
reader sees the old document or the new one, never half of each. Readers resolve the alias once per
request and read one version's table or feature rows for the whole request: no result mixes versions.

The document lives beside the data it points to (default ``<lancedb_uri>/_rollout.json``), so the
sinks, ``search`` and a Feast reader that share a store share the pointer too.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import orjson
from pydantic import BaseModel, ConfigDict, Field

from embedstream.errors import ConfigError
from embedstream.rollout.local_workers import LocalWorker

STATE_FILE = "_rollout.json"


class ModelRef(BaseModel):
    """One model version: the (model_name, model_version) every stored row carries."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    model_version: str

    @property
    def table(self) -> str:
        """The LanceDB table of this version's rows (the sink's naming rule)."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.model_name}-v{self.model_version}")

    def __str__(self) -> str:
        return f"{self.model_name}:{self.model_version}"

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, sep, version = text.rpartition(":")
        if not sep or not name or not version:
            raise ConfigError(f"a model version is NAME:VERSION (e.g. ts-autoencoder-w32c3:2), not {text!r}")
        return cls(model_name=name, model_version=version)


class Deployed(BaseModel):
    """A version and the workers that embed for it: their consumer group, input topics, local processes."""

    model: ModelRef
    group_id: str | None = None
    topics: list[str] = Field(default_factory=list)
    # Where its group started reading (partition -> offset) when the rollout placed it; the status's 0 %.
    start_offsets: dict[str, int] = Field(default_factory=dict)
    # Workers `rollout start --spawn` launched, with what identifies each beyond its pid; `retire` stops
    # the ones that are still those processes.
    workers: list[LocalWorker] = Field(default_factory=list)
    # Documents written before the identity was recorded; `retire` refuses to signal these.
    worker_pids: list[int] = Field(default_factory=list)
    started_at: float | None = None


class Retired(BaseModel):
    model: ModelRef
    retired_at: float
    drop_after: float  # epoch seconds: its table is dropped by the first `retire` or upkeep after this
    dropped: bool = False


class Event(BaseModel):
    at: float
    action: str
    model: ModelRef
    detail: str = ""


class Alias(BaseModel):
    serving: Deployed
    previous: Deployed | None = None  # what a rollback returns to
    candidate: Deployed | None = None  # being backfilled
    retired: list[Retired] = Field(default_factory=list)
    history: list[Event] = Field(default_factory=list)

    def record(self, action: str, model: ModelRef, detail: str = "", now: float | None = None) -> None:
        self.history.append(Event(at=time.time() if now is None else now, action=action, model=model, detail=detail))


class RolloutState(BaseModel):
    revision: int = 0
    aliases: dict[str, Alias] = Field(default_factory=dict)

    def alias(self, name: str) -> Alias:
        if name not in self.aliases:
            known = ", ".join(sorted(self.aliases)) or "(none)"
            raise ConfigError(f"no rollout alias {name!r}; aliases: {known}")
        return self.aliases[name]


def state_location(lancedb_uri: str, explicit: str | None = None) -> str:
    """The document's path or URI: the explicit one, else ``_rollout.json`` inside the LanceDB location."""
    if explicit:
        return explicit
    return lancedb_uri.rstrip("/") + "/" + STATE_FILE


def _filesystem(location: str) -> tuple[object, str] | None:
    """(pyarrow filesystem, path) for a URI such as s3://; None for a local path."""
    if "://" not in location or location.startswith("file://"):
        return None
    from pyarrow import fs

    return fs.FileSystem.from_uri(location)


def _local(location: str) -> Path:
    return Path(location.removeprefix("file://"))


def read_bytes(location: str) -> bytes | None:
    remote = _filesystem(location)
    if remote is None:
        try:
            return _local(location).read_bytes()
        except FileNotFoundError:
            return None
    filesystem, path = remote
    try:
        with filesystem.open_input_stream(path) as f:  # type: ignore[attr-defined]
            return bytes(f.read())
    except FileNotFoundError:
        return None


def write_bytes(location: str, data: bytes) -> None:
    """Replace the document whole: a temporary file renamed over it, or one object PUT."""
    remote = _filesystem(location)
    if remote is not None:
        filesystem, path = remote
        with filesystem.open_output_stream(path) as f:  # type: ignore[attr-defined]
            f.write(data)
        return
    target = _local(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".rollout-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(location: str) -> RolloutState:
    raw = read_bytes(location)
    if raw is None:
        return RolloutState()
    try:
        return RolloutState.model_validate(orjson.loads(raw))
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise ConfigError(f"the rollout document {location} is not readable: {exc}") from exc


def save(location: str, state: RolloutState, expected_revision: int) -> RolloutState:
    """Write ``state`` as the next revision; ConfigError when someone else changed it since it was read.

    The check narrows, not closes, the window between two operators' commands: rollout steps are
    run by hand, one at a time, and a lost race shows up as this error on the next step.
    """
    current = load(location).revision
    if current != expected_revision:
        raise ConfigError(f"the rollout document changed under this command (revision {current}); run it again")
    updated = state.model_copy(update={"revision": expected_revision + 1})
    write_bytes(location, orjson.dumps(updated.model_dump(mode="json"), option=orjson.OPT_INDENT_2))
    return updated


def resolve(location: str, alias: str) -> ModelRef:
    """The version serving ``alias`` now: what a reader reads for one whole request."""
    return load(location).alias(alias).serving.model
