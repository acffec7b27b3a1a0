"""A rollout's backfill rate against the serving version's, on a running `embedstream up`, same batch.

Usage (in the directory `embedstream up` runs in, with text served):
    .venv/bin/python examples/rollout_backfill_rate.py --count 4000

The same sentences go to a topic of their own; three workers read it from the start, one after the
other, each in a group of its own: v1 (the text config `up` wrote, its served model), v2 exported by
`embedstream export-models` with no flags, and v2 exported as the former default did (TorchScript,
one instance, two threads). Each rate is sentences per second between the group's first and last
commit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from pathlib import Path

from embedstream.config import load_settings
from embedstream.rollout import kafka as rk
from embedstream.rollout import serving

EMBEDSTREAM = str(Path(sys.executable).parent / "embedstream")


def stack_bootstrap(workdir: Path) -> str:
    for line in (workdir / "stack.env").read_text().splitlines():
        if line.startswith("export BOOTSTRAP="):
            return line.split("=", 1)[1].strip("'\"")
    raise SystemExit(f"no BOOTSTRAP in {workdir / 'stack.env'}: is `embedstream up` running here?")


def variant(workdir: Path, run: str, name: str, topic: str, model_name: str | None, export: list[str] | None) -> Path:
    config = (workdir / "worker-text-0.toml").read_text()
    config = config.replace('group_id = "embedstream-text"', f'group_id = "rate-{run}-{name}"')
    config = config.replace('input_topic = "text"', f'input_topic = "{topic}"')
    config = config.replace('output_topic = "embeddings.text"', f'output_topic = "{topic}.out"')
    config = config.replace("health_port = ", "health_port = 0\n# was: health_port = ")
    if model_name:
        config = config.replace("[encoder]\n", f'[encoder]\nmodel_name = "{model_name}"\n', 1)
    path = Path(f"rate-{run}-{name}.toml")
    path.write_text(config)
    if export is not None and model_name:
        subprocess.run(
            [EMBEDSTREAM, "export-models", "--config", str(path), "--repo", str(workdir / "models"), *export],
            check=True,
            capture_output=True,
        )
        serving.load(load_settings(path).triton, model_name)
    return path


def measure(label: str, config: Path, topic: str, timeout_s: float = 600.0) -> float:
    settings = load_settings(config)
    proc = subprocess.Popen(
        [EMBEDSTREAM, "worker", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    began = time.monotonic()
    first: tuple[float, int] | None = None
    done = total = 0
    try:
        while time.monotonic() - began < timeout_s:
            parts = rk.group_lag(settings.kafka, settings.kafka.group_id, [topic], {})
            done, total = sum(p.done for p in parts), sum(p.total for p in parts)
            if done and first is None:
                first = (time.monotonic(), done)
            if total and done >= total:
                break
            time.sleep(0.2)
        ended = time.monotonic()
    finally:
        proc.terminate()
        proc.wait()
    rate = (done - first[1]) / (ended - first[0]) if first is not None and ended > first[0] else float("nan")
    print(f"{label:<30} {done}/{total} in {ended - began:5.1f} s; {rate:7.1f} sentences/s", flush=True)
    return rate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=4000)
    p.add_argument("--workdir", type=Path, default=Path(".embedstream"))
    args = p.parse_args()
    run = uuid.uuid4().hex[:6]
    topic = f"rate-{run}"
    bootstrap = stack_bootstrap(args.workdir)
    subprocess.run(
        [
            EMBEDSTREAM,
            "produce-samples",
            "--bootstrap",
            bootstrap,
            "--modality",
            "text",
            "--topic",
            topic,
            "--count",
            str(args.count),
        ],
        check=True,
    )
    v1 = measure("v1 (up's export)", variant(args.workdir, run, "v1", topic, None, None), topic)
    new = variant(args.workdir, run, "v2", topic, f"text-v2-{run}", [])
    old = variant(
        args.workdir,
        run,
        "v2-former",
        topic,
        f"text-v2-former-{run}",
        ["--artifact", "torchscript", "--instances", "1", "--torch-threads", "2"],
    )
    v2 = measure("v2, export-models default", new, topic)
    former = measure("v2, the former default", old, topic)
    print(f"v2 / v1 = {v2 / v1:.2f}; former default / v1 = {former / v1:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
