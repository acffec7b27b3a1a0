"""A local CPU Triton Inference Server, from the ``nvidia-pytriton`` wheel, with its Python backend.

The server runs in a process group of its own with its Python-backend stubs (one process per model
instance). The stubs ignore SIGTERM and watch only whether their parent's pid exists, so a server
that dies unreaped, or whose stubs hang, would leave them running: every stop kills the whole group
(SIGKILL after the grace period), the group is killed the moment the server dies on its own, and a
start first kills stubs and servers that an earlier run left under the same work directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import urllib.request
from pathlib import Path

from embedstream.errors import RuntimeStartError
from embedstream.local.stack.process import ChildProcess, command_lines, free_port, is_zombie, reap_stale

log = logging.getLogger(__name__)


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError:
        raise RuntimeStartError(
            "no local Triton: install the 'nvidia-pytriton' package (pip install 'embedstream[local]')"
        ) from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise RuntimeStartError(f"nvidia-pytriton is installed but has no tritonserver binary under {root}")
    return root


def _build_backend_dir(root: Path, dest: Path) -> Path:
    """Triton wants backends/python/{libtriton_python.so, utils, stub}; the wheel keeps stubs per Python."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeStartError(f"nvidia-pytriton ships no Python backend stub for Python {py} ({stub})")
    target = dest / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in (
        root / "backends/python/libtriton_python.so",
        root / "backends/python/triton_python_backend_utils.py",
        stub,
    ):
        shutil.copy2(src, target / src.name)
    return dest


def _server_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    libs = root.parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
    # The backend stub embeds Python and finds its prefix through the `python3` on PATH:
    # put this environment's first so model.py imports this environment's torch and numpy.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # The local server shares its cores with the worker. OpenMP threads that spin for long
    # after a parallel region (GNU default ~300k spins) starve the worker; never spinning
    # (OMP_WAIT_POLICY=PASSIVE) puts a thread wake-up between every two operators and made
    # MobileNet 1.5x and MiniLM 1.3x slower here. A short spin bridges the gaps inside one
    # forward pass and sleeps between requests.
    if "OMP_WAIT_POLICY" not in env:
        env.setdefault("GOMP_SPINCOUNT", "10000")
    return env


class LocalTriton:
    def __init__(
        self,
        workdir: Path,
        model_repository: Path,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.model_repository = Path(model_repository)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        root = _pytriton_root()
        self.backends = self.workdir / "triton-backends"
        self.stub_path = self.backends / "python" / "triton_python_backend_stub"
        self._reap_stale()  # before the stub binary is copied over: a running one may hold it busy
        backends = _build_backend_dir(root, self.backends)
        env = _server_env(root)
        self._proc = ChildProcess(
            "triton server",
            self._command(root, backends),
            self.workdir / "logs" / "triton.log",
            env=env,
            reap_group_on_exit=True,
        )

    def _command(self, root: Path, backends: Path) -> list[str]:
        return [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            # Explicit model control, as compose and Kubernetes run Triton: every model in the repository is
            # loaded at start, and a model exported later (a rollout's new version) is loaded through the
            # repository API by `rollout start`, not by a restart.
            "--model-control-mode=explicit",
            "--load-model=*",
            "--exit-on-error=true",
            # A local server has no clients worth waiting 30 s for at shutdown.
            "--exit-timeout-secs=3",
            "--log-verbose=0",
        ]

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def ours(self, argv: list[str]) -> bool:
        """Whether a command line is this work directory's server or one of its stubs."""
        if not argv:
            return False
        if argv[0] == str(self.stub_path):
            return True
        return Path(argv[0]).name == "tritonserver" and f"--backend-directory={self.backends}" in argv

    def stubs(self) -> list[int]:
        """Pids of running (not zombie) Python-backend stubs of this work directory."""
        return [
            pid
            for pid, argv in command_lines().items()
            if argv and argv[0] == str(self.stub_path) and not is_zombie(pid)
        ]

    def _reap_stale(self) -> list[int]:
        return reap_stale(self.ours, f"Triton processes under {self.workdir}")

    def start(self, timeout_s: float = 180.0) -> LocalTriton:
        if not self._proc.alive():
            self._reap_stale()
        self._proc.start()
        self._proc.wait_until(self.ready, timeout_s, "ready on /v2/health/ready")
        log.info("triton ready: grpc %s, http %s", self.grpc_url, self.http_url)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self._proc.alive()

    def stop(self) -> None:
        self._proc.stop(timeout_s=20)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def kill(self) -> None:
        self._proc.kill()

    def tail(self) -> str:
        return self._proc.tail()
