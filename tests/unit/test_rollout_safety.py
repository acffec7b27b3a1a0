"""The rollout's edges a user meets: what `retire` may signal, a second `start`, the way on after a rollback,
a retired version without a table, and Triton's answer when the new model cannot be loaded."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedstream.aliases import Alias, Deployed, ModelRef, RolloutState, load, save
from embedstream.cli import main
from embedstream.config import TritonSettings
from embedstream.errors import ConfigError
from embedstream.rollout import local_workers, steps
from embedstream.rollout import serving as triton_models
from embedstream.rollout.local_workers import LocalWorker, Stopped

V1 = ModelRef(model_name="enc", model_version="1")
V2 = ModelRef(model_name="enc-r2", model_version="2")


def _document(location: str, **candidate: object) -> None:
    alias = Alias(serving=Deployed(model=V1, group_id="g1", topics=["in"]))
    if candidate:
        alias.candidate = Deployed(model=V2, group_id="g2", topics=["in"], **candidate)
    save(location, RolloutState(aliases={"a": alias}), 0)


@pytest.fixture
def sleeper():
    """A live process of the test's own: what a tampered document could name."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_retire_refuses_a_process_it_did_not_start_and_that_process_survives(tmp_path, sleeper):
    location = str(tmp_path / "rollout.json")
    config = tmp_path / "v2.toml"
    config.write_text('[kafka]\ngroup_id = "g2"\n')
    me = local_workers.record(sleeper.pid, config)  # its real start time, but not an embedstream worker
    forged = LocalWorker(pid=sleeper.pid, host=me.host, started=me.started + 1, config=me.config)
    _document(location, workers=[me, forged], worker_pids=[sleeper.pid])
    killed: list[tuple[int, int]] = []

    def stop(target: Deployed) -> Stopped:
        return local_workers.stop_workers(
            target.workers, target.worker_pids, target.group_id, "127.0.0.1:1", kill=lambda p, s: killed.append((p, s))
        )

    done = steps.retire(location, "a", which="candidate", retention_s=0, drop_table=lambda m: False, stop=stop)
    assert killed == [] and done.stopped.signalled == []
    reasons = dict.fromkeys([p for p, _ in done.stopped.refused])
    assert list(reasons) == [sleeper.pid]
    text = " | ".join(why for _, why in done.stopped.refused)
    assert "not `embedstream worker --config" in text  # the pid runs something else
    assert "is another process now" in text  # the recorded start time does not match
    assert "recorded by pid alone" in text  # an older document's bare pid
    time.sleep(0.2)
    assert sleeper.poll() is None  # still alive: nothing was sent to it
    assert done.missing == [V2] and done.dropped == []


def test_retire_stops_a_worker_it_launched_and_the_groups_workers_here_only(tmp_path):
    config = tmp_path / "v2.toml"
    config.write_text('[kafka]\ngroup_id = "g2"\nbootstrap_servers = "127.0.0.1:1"\n')
    other = tmp_path / "other.toml"
    other.write_text('[kafka]\ngroup_id = "g2"\nbootstrap_servers = "127.0.0.1:2"\n')  # the same group, another stack
    # Processes whose command line reads as `embedstream worker --config ...` (they only sleep).
    code = "import sys, time; time.sleep(60)"
    mine = subprocess.Popen([sys.executable, "-c", code, "-m", "embedstream", "worker", "--config", str(config)])
    theirs = subprocess.Popen([sys.executable, "-c", code, "-m", "embedstream", "worker", "--config", str(other)])
    try:
        worker = local_workers.record(mine.pid, config)
        assert local_workers.mismatch(worker) is None
        stopped = local_workers.stop_workers([worker], [], "g2", "127.0.0.1:1")
        assert stopped.signalled == [mine.pid] and stopped.refused == []
        assert mine.wait(timeout=10) == -signal.SIGTERM
        assert theirs.poll() is None  # another stack's group of the same name is left alone
        assert local_workers.mismatch(worker) == "exited"
    finally:
        for p in (mine, theirs):
            p.kill()
            p.wait()


def test_a_second_start_keeps_the_start_offsets_and_progress(tmp_path, monkeypatch):
    location = str(tmp_path / "rollout.json")
    placed = {"in/0": 0, "in/1": 0}
    committed: dict[str, int] = {}
    monkeypatch.setattr(steps.rk, "committed_offsets", lambda kafka, group, topics: dict(committed))
    monkeypatch.setattr(steps.rk, "place_group", lambda kafka, group, topics, **kw: dict(placed))
    serving = Deployed(model=V1, group_id="g1", topics=["in"])
    first = steps.start(location, "a", V2, "g2", ["in"], None, serving=serving, now=10.0)  # type: ignore[arg-type]
    assert first.candidate is not None and first.candidate.start_offsets == placed
    committed.update({"in/0": 288, "in/1": 1792})  # the backfill has moved on
    again = steps.start(location, "a", V2, "g2", ["in"], None, now=20.0)  # type: ignore[arg-type]
    assert again.candidate is not None
    assert again.candidate.start_offsets == placed and again.candidate.started_at == 10.0
    assert [e.detail for e in load(location).alias("a").history][-1] == "again: start offsets and progress kept"


def test_switch_after_a_rollback_names_the_way_on(tmp_path):
    location = str(tmp_path / "rollout.json")
    _document(location)
    state = load(location)
    state.aliases["a"].previous = Deployed(model=V2, group_id="g2", topics=["in"])
    save(location, state, state.revision)
    with pytest.raises(ConfigError, match=r"enc:1 serves and enc-r2:2 is kept; `embedstream rollout rollback`"):
        steps.switch(location, "a")


def test_upkeep_refuses_a_location_with_no_tables(tmp_path, caplog):
    typo = tmp_path / "lancdb"
    assert main(["upkeep", "--lancedb-uri", str(typo)]) == 2
    assert "no LanceDB location" in caplog.text
    assert not typo.exists()  # not created by the check
    typo.mkdir()
    assert main(["upkeep", "--lancedb-uri", str(typo)]) == 2
    assert "no LanceDB tables at" in caplog.text


class _Refusing:
    def load_model(self, name: str) -> None:
        from tritonclient.utils import InferenceServerException

        raise InferenceServerException(msg=f"failed to load '{name}', failed to poll from model repository")

    def close(self) -> None:
        pass


def test_start_says_what_triton_answered_when_the_model_cannot_be_loaded() -> None:
    with pytest.raises(ConfigError, match=r"did not load model 'ts-v2': failed to load 'ts-v2'.*export-models"):
        triton_models.load(TritonSettings(url="127.0.0.1:1"), "ts-v2", client_of=lambda t: _Refusing())


def test_unload_reports_rather_than_fails() -> None:
    answer = triton_models.unload(TritonSettings(url="127.0.0.1:9"), "ts-v1", client_of=lambda t: _Refusing())
    assert answer.startswith("Triton at 127.0.0.1:9 did not unload ts-v1")


def test_a_launched_worker_is_recorded_with_its_identity(tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        w = local_workers.record(proc.pid, Path(tmp_path / "c.toml"))
        assert w.pid == proc.pid and w.started > 0 and w.config == str((tmp_path / "c.toml").resolve())
    finally:
        proc.kill()
        proc.wait()
