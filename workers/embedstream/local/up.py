"""``embedstream up``: every modality's pipeline on one embedded stack, until Ctrl-C.

One broker, one Triton serving every modality's model, and per modality its own topics, consumer
group and worker processes, as the demo runs them. What it prints is what a client needs: the
bootstrap, Triton's URLs, every topic, the logs, and a command per modality that sends it something.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from embedstream.config import Settings
from embedstream.local import pipelines
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess

log = logging.getLogger("embedstream")
Out = Callable[[str], None]


def say(line: str) -> None:
    # Flushed line by line: `up` runs for hours behind a pipe or `tee` as often as on a terminal.
    print(line, flush=True)


@dataclass(frozen=True)
class UpOptions:
    modalities: Sequence[str]
    workers: int
    partitions: int
    broker_port: int | None
    workdir: Path
    # The broker's log in a local S3 server under workdir/storage: topics, records and committed
    # offsets outlive the stack, and `up` again on the same workdir carries on where it stopped.
    durable: bool = False


def plan(base: Settings, opts: UpOptions, out: Out = say) -> list[Settings]:
    """Each modality's pipeline settings; trains the time-series autoencoder first where it needs one."""
    if "timeseries" in opts.modalities and pipelines.trains_timeseries(base):
        out(
            "training the time-series autoencoder on the bundled normal data "
            "(a few seconds; set encoder.weights in a time-series config to serve your own)..."
        )
        started = time.monotonic()
        settings = pipelines.modality_settings(base, opts.modalities, opts.workdir)
        out(f"trained in {time.monotonic() - started:.1f} s")
        return settings
    return pipelines.modality_settings(base, opts.modalities, opts.workdir)


def serve(settings: Sequence[Settings], opts: UpOptions, stop: threading.Event, out: Out = say) -> int:
    """Start the stack and the workers, print where everything is, restart a worker that exits, until ``stop``."""
    what = "the storage server, the broker" if opts.durable else "the broker"
    out(f"starting {what}, exporting the models, starting Triton...")
    with LocalStack(
        list(settings),
        workdir=opts.workdir,
        partitions=opts.partitions,
        broker_port=opts.broker_port,
        durable=opts.durable,
    ) as stack:
        local = stack.all_settings
        groups = [
            [WorkerProcess(s, stack.workdir, f"worker-{m}-{i}") for i in range(opts.workers)]
            for m, s in zip(opts.modalities, local, strict=True)
        ]
        workers = [w for group in groups for w in group]
        try:
            for w in workers:
                w.start()
            print_endpoints(stack, opts.modalities, local, out)
            env_file = write_stack_env(stack)
            out(f"addresses         {env_file} (in another shell: . {env_file})")
            for w in workers:
                if stop.is_set():
                    break
                w.wait_ready()
            if not stop.is_set():
                out(f"ready: {len(workers)} worker(s) joined their consumer groups; Ctrl-C stops everything")
                keep_running(workers, stop)
        finally:
            for w in workers:
                w.terminate()
            (stack.workdir / STACK_ENV).unlink(missing_ok=True)
    out("stopped")
    return 0


STACK_ENV = "stack.env"


def write_stack_env(stack: LocalStack) -> Path:
    """The addresses a client needs, as shell ``export`` lines: the docs' commands read them from here
    (``. .embedstream/stack.env``), since ``--broker-port 0`` and Triton's ports are picked at start."""
    triton = stack.triton
    if triton is None:
        raise RuntimeError("the stack's Triton is not running; its addresses cannot be written")
    values = {
        "BOOTSTRAP": stack.broker.bootstrap,
        "TRITON_URL": triton.grpc_url,
        "TRITON_HTTP_URL": triton.http_url,
        "TRITON_METRICS_URL": triton.metrics_url,
        "EMBEDSTREAM_LOGS": str((stack.workdir / "logs").resolve()),
    }
    path = stack.workdir / STACK_ENV
    lines = [f"# written by `embedstream up` (pid {os.getpid()}); removed when it stops"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def keep_running(workers: Sequence[WorkerProcess], stop: threading.Event) -> None:
    """Restart a worker that crashed or was killed; leave one that stopped on request (SIGTERM or Ctrl-C:
    it drains and exits 0, as `rollout retire` stops a retired version's workers) stopped."""
    running = list(workers)
    while not stop.wait(1.0):
        for w in list(running):
            if w.alive():
                continue
            if w.returncode == 0:
                log.warning("%s stopped on request (exit 0); not restarting it", w.name)
                running.remove(w)
            else:
                log.error("%s exited (%s); restarting it. Last log lines:\n%s", w.name, w.returncode, w.tail())
                w.start()


def print_endpoints(stack: LocalStack, modalities: Sequence[str], local: Sequence[Settings], out: Out) -> None:
    from embedstream.service import encoder_spec

    assert stack.triton is not None  # started by LocalStack.start
    bootstrap = stack.broker.bootstrap
    out(f"kafka bootstrap   {bootstrap}")
    if stack.storage is not None:
        storage = stack.storage
        out(f"broker storage    {storage.location.endpoint} bucket {storage.bucket}, data in {storage.data_dir}")
    else:
        out("broker storage    memory (lost when it stops; --durable keeps it)")
    out(f"triton grpc/http  {stack.triton.grpc_url}  {stack.triton.http_url}")
    out(f"triton metrics    {stack.triton.metrics_url}")
    out(f"logs              {stack.workdir / 'logs'}")
    for modality, s in zip(modalities, local, strict=True):
        spec = encoder_spec(s)
        k = s.kafka
        weights = s.encoder.weights or f"packaged ({spec.source})"
        out(f"{modality}")
        out(f"  model           {spec.name}, weights {weights}")
        out(f"  topics          in={k.input_topic} out={k.output_topic} dead-letter={k.dead_letter_topic}")
        out(f"  group           {k.group_id}")
        out(f"  config          {stack.workdir / f'worker-{modality}-0.toml'}")
        out(f"  try:            {try_command(modality, s, bootstrap)}")
        out(f"  read:           embedstream tail {k.output_topic} --bootstrap {bootstrap} --from beginning")


def try_command(modality: str, settings: Settings, bootstrap: str) -> str:
    """A shell command that sends the modality's input topic something it embeds (a kafka-python
    one-liner where no embedstream command produces that modality); it runs in the user's shell."""
    # Python strings in double quotes only, so the single-quoted shell word stays readable.
    topic, servers = json.dumps(settings.kafka.input_topic), json.dumps(bootstrap)
    if modality == "image":
        return f"embedstream produce-samples --bootstrap {bootstrap} --topic {settings.kafka.input_topic} --count 50"
    if modality == "text":
        code = (
            f"from kafka import KafkaProducer as Producer; p = Producer(bootstrap_servers={servers}); "
            f'[p.send({topic}, s.encode()) for s in ("The pump reported a pressure spike.", '
            '"A sensor flagged a cracked lens.")]; p.flush()'
        )
    else:
        from embedstream.service import encoder_spec

        length, channels = encoder_spec(settings).inputs[0].dims
        code = (
            "import json, math; from kafka import KafkaProducer as Producer; "
            f"p = Producer(bootstrap_servers={servers}); "
            f"w = [[math.sin(t / 4 + c) for c in range({channels})] for t in range({length})]; "
            f'p.send({topic}, json.dumps({{"series_id": "pump-1", "values": w}}).encode(), key=b"pump-1"); '
            "p.flush()"
        )
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"
