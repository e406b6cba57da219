"""A real NVIDIA Triton Inference Server for the peer benchmark: installed on demand, started on loopback.

The `nvidia-pytriton` wheel ships a Triton 2.51 server binary with the python backend only (no ONNX
Runtime backend), its own shared libraries and a python-backend stub per Python version. Its Python
dependencies pin numpy < 2, which the project's environment does not allow, and the bench needs none of
them: so the wheel is installed with `--no-deps` into its own directory (`.venv/triton/`, ~150 MB
unpacked), never into the serve or dev extras that `make test` installs. The stub itself does need
numpy < 2 (it was built against numpy 1's C API: with numpy 2 it misreads every BYTES tensor), so a
numpy 1.26 goes beside it (`.venv/triton/numpy1/`) and first on the stub's path; ONNX Runtime and the
rest come from the project's environment.

The python backend runs each model instance in a stub process that embeds this interpreter's libpython
(found through LD_LIBRARY_PATH) and imports bench/triton_lm.py, numpy and onnxruntime from this
repository and its virtual environment (CELLGATE_PEER_PATH, read by bench/triton/lm/1/lm.py), so the
peer runs the very same Runner as cellgate.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.procs import free_port

PYTRITON = "nvidia-pytriton==0.7.0"  # Triton Inference Server 2.51
STUB_NUMPY = "numpy>=1.26,<2"
INSTALL_DIR = Path(sys.prefix) / "triton"
REPOSITORY = Path(__file__).parent / "triton"
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TritonTuning:
    """The knobs a fair comparison tunes (docs/serving_peers.md)."""

    preferred_batch_sizes: tuple[int, ...] = (64,)
    max_queue_delay_us: int = 500
    instances: int = 1
    http_threads: int = 8
    max_batch_size: int = 64

    def label(self) -> str:
        sizes = "/".join(str(s) for s in self.preferred_batch_sizes) or "none"
        return (
            f"preferred={sizes} delay={self.max_queue_delay_us}us instances={self.instances} "
            f"http_threads={self.http_threads} max_batch={self.max_batch_size}"
        )


def parse_tuning(text: str) -> TritonTuning:
    """`preferred=32/64,delay=500,instances=2,http_threads=4,max_batch=64` -> TritonTuning (omitted = default)."""
    values: dict[str, object] = {}
    names = {
        "preferred": "preferred_batch_sizes",
        "delay": "max_queue_delay_us",
        "instances": "instances",
        "http_threads": "http_threads",
        "max_batch": "max_batch_size",
    }
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in names:
            raise ValueError(f"unknown Triton setting {key!r} (known: {', '.join(names)})")
        if key == "preferred":
            values[names[key]] = tuple(int(v) for v in value.split("/") if v)
        else:
            values[names[key]] = int(value)
    return TritonTuning(**values)  # type: ignore[arg-type]


def ensure_installed(directory: Path = INSTALL_DIR) -> Path:
    """The unpacked pytriton tree (pip install --no-deps --target) with tritonserver in it; installs if absent."""
    server = directory / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if server.exists() and (directory / "numpy1" / "numpy").is_dir():
        return directory
    print(
        f"bench.peer: installing {PYTRITON} (a 55 MB wheel with the Triton 2.51 server binary) and {STUB_NUMPY} "
        f"for its python-backend stub into {directory} with --no-deps; they are in no extra because pytriton "
        "pins numpy < 2 and the project does not",
        file=sys.stderr,
    )
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target"]
    subprocess.run([*pip, str(directory), PYTRITON], check=True)
    subprocess.run([*pip, str(directory / "numpy1"), STUB_NUMPY], check=True)
    if not server.exists():
        raise RuntimeError(f"{PYTRITON} installed, but {server} is not in it")
    return directory


def _config_text(tuning: TritonTuning) -> str:
    """bench/triton/lm/config.pbtxt with the tuned fields replaced."""
    text = (REPOSITORY / "lm" / "config.pbtxt").read_text()
    sizes = ", ".join(str(s) for s in tuning.preferred_batch_sizes)
    replacements = {
        r"preferred_batch_size: \[[^\]]*\]": f"preferred_batch_size: [ {sizes} ]" if sizes else "",
        r"max_queue_delay_microseconds: \d+": f"max_queue_delay_microseconds: {tuning.max_queue_delay_us}",
        r"count: \d+": f"count: {tuning.instances}",
        r"max_batch_size: \d+": f"max_batch_size: {tuning.max_batch_size}",
    }
    for pattern, replacement in replacements.items():
        text, found = re.subn(pattern, replacement, text)
        if found != 1:
            raise RuntimeError(f"config.pbtxt: expected one {pattern!r}")
    return text


@dataclass
class TritonProcess:
    process: subprocess.Popen[str]
    url: str
    workdir: Path
    log_path: Path
    tuning: TritonTuning = field(default_factory=TritonTuning)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log without its start-up tables (which are most of it)."""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join([line for line in text if not line.startswith(("|", "+"))][-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start(bundle: Path, tuning: TritonTuning, install: Path | None = None, timeout: float = 180.0) -> TritonProcess:
    """tritonserver on a free loopback port serving bench/triton (model `lm`) for `bundle`; waits until ready."""
    tree = ensure_installed(install or INSTALL_DIR)
    triton = tree / "pytriton" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"pytriton has no python-backend stub for Python {version}")
    workdir = Path(tempfile.mkdtemp(prefix="cellgate-triton-"))
    backend = workdir / "backends" / "python"
    backend.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(triton / "backends" / "python" / name, backend / name)
    shutil.copy2(stub, backend / "triton_python_backend_stub")
    repository = workdir / "models"
    shutil.copytree(REPOSITORY, repository, ignore=shutil.ignore_patterns("__pycache__"))
    (repository / "lm" / "config.pbtxt").write_text(_config_text(tuning))
    port = free_port()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    packages = site.getsitepackages()  # this virtual environment's, not the base interpreter's
    env = {
        **os.environ,
        "CELLGATE_BUNDLE": str(bundle.resolve()),
        "CELLGATE_PEER_PATH": os.pathsep.join(
            [str(tree / "numpy1"), str(ROOT), *packages]
        ),  # read by bench/triton/lm/1/lm.py
        # The copied stub no longer finds the wheel's bundled libraries through its relative RPATH.
        "LD_LIBRARY_PATH": os.pathsep.join(
            filter(None, [libdir, str(tree / "nvidia_pytriton.libs"), os.environ.get("LD_LIBRARY_PATH", "")])
        ),
    }
    command = [
        str(triton / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={workdir / 'backends'}",
        f"--http-port={port}",
        "--http-address=127.0.0.1",
        f"--http-thread-count={tuning.http_threads}",
        "--allow-grpc=false",
        "--allow-metrics=false",
        "--allow-gpu-metrics=false",
        "--exit-on-error=true",
        "--log-verbose=0",
    ]
    log_path = workdir / "tritonserver.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    server = TritonProcess(process, f"http://127.0.0.1:{port}", workdir, log_path, tuning)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = server.log_tail()
            server.stop()
            raise RuntimeError(f"tritonserver exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{server.url}/v2/models/lm/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    tail = server.log_tail()
    server.stop()
    raise RuntimeError(f"tritonserver was not ready in {timeout:.0f} s:\n{tail}")
