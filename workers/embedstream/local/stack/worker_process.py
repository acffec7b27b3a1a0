"""A worker as a child process (``embedstream worker --config FILE``), as a deployment runs it."""

from __future__ import annotations

import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from embedstream.config import Settings, dump_toml
from embedstream.local.stack.process import ChildProcess, free_port


class WorkerProcess:
    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        name: str = "worker-0",
        python: str = sys.executable,
        pythonpath: str | None = None,
    ) -> None:
        """``python``/``pythonpath``: run the worker with another interpreter or code tree (start-up comparisons)."""
        self.name = name
        workdir = Path(workdir)
        self.config_path = workdir / f"{name}.toml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.health_port = free_port()
        local = settings.model_copy(
            update={"worker_id": name, "health_host": "127.0.0.1", "health_port": self.health_port}
        )
        self.config_path.write_text(dump_toml(local))
        self.config_path.chmod(0o600)  # may carry SASL secrets
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSTREAM_")}
        env["PYTHONUNBUFFERED"] = "1"
        if pythonpath is not None:
            env["PYTHONPATH"] = pythonpath
        self._proc = ChildProcess(
            f"embedstream {name}",
            [python, "-m", "embedstream", "worker", "--config", str(self.config_path)],
            workdir / "logs" / f"{name}.log",
            env=env,
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        return self._proc.log_path

    def cpu_seconds(self) -> float | None:
        """CPU time the worker process has used, all its threads (Linux /proc; None elsewhere or once gone)."""
        pid = self._proc.pid
        try:
            stat = Path(f"/proc/{pid}/stat").read_text() if pid is not None else ""
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2 :].split() if ")" in stat else []
        if len(fields) < 13:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def start(self) -> WorkerProcess:
        self._proc.start()
        return self

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=1) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return orjson.loads(exc.read())
        except OSError:
            return None

    def wait_ready(self, timeout_s: float = 120.0) -> WorkerProcess:
        """Block until the worker has joined its group (so nothing produced now waits on a join)."""
        self._proc.wait_until(lambda: bool((self.status() or {}).get("ready")), timeout_s, "ready")
        return self

    def alive(self) -> bool:
        return self._proc.alive()

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def terminate(self, timeout_s: float = 30.0) -> None:
        self._proc.stop(timeout_s=timeout_s)

    def kill(self) -> None:
        self._proc.kill()

    def signal(self, sig: signal.Signals) -> None:
        pid = self._proc.pid
        if pid is not None:
            os.kill(pid, sig)

    def tail(self) -> str:
        return self._proc.tail()
