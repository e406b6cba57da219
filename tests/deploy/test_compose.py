"""docker-compose.yml: validated by docker-compose itself (offline `config`) for the default and each profile,
and held to the deployment rules: hardening, loopback ports, healthchecks, ordering, no secrets."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

from service.config import Settings
from tests.deploy.tools import DEPLOY, ROOT, require, run

PROFILES = (None, "scale", "gpu")
CELLGATE_IMAGE = re.compile(r"^cellgate:")


def compose(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, files: tuple[str, ...] = ("docker-compose.yml",)
) -> tuple[int, str, str]:
    """`docker-compose ... config` with a clean environment and an empty env file (a developer's .env stays out)."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    command = [require("docker-compose", "docker-compose"), "--env-file", str(env_file)]
    for name in files:
        command += ["-f", name]
    result = run([*command, *args], cwd=ROOT, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **(env or {})})
    return result.returncode, result.stdout, result.stderr


def resolved(tmp_path: Path, profile: str | None, **env: str) -> dict[str, Any]:
    """The configuration docker-compose resolves (interpolated, merged, validated) for a profile."""
    code, out, err = compose(tmp_path, *(["--profile", profile] if profile else []), "config", env=env)
    assert code == 0, err
    config: dict[str, Any] = yaml.safe_load(out)
    return config


def active(config: dict[str, Any], profile: str | None) -> dict[str, dict[str, Any]]:
    """The services `docker compose [--profile P] up` starts: those without profiles, and those of P."""
    return {
        name: service
        for name, service in config["services"].items()
        if not service.get("profiles") or profile in service["profiles"]
    }


def drain_timeout(stage: str) -> float:
    """CELLGATE_DRAIN_TIMEOUT_SECONDS as the Dockerfile stage sets it."""
    current = None
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if command.cmd == "FROM":
            current = command.value[-1]
        elif command.cmd == "ENV" and current == stage:
            values = dict(zip(command.value[::2], command.value[1::2], strict=True))
            if "CELLGATE_DRAIN_TIMEOUT_SECONDS" in values:
                return float(values["CELLGATE_DRAIN_TIMEOUT_SECONDS"])
    raise AssertionError(f"stage {stage} sets no drain timeout")


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_file_validates_and_follows_the_rules(tmp_path: Path, profile: str | None) -> None:
    config = resolved(tmp_path, profile)
    services = active(config, profile)
    expected = {None: {"cellgate", "prometheus", "grafana"}, "scale": {"redis", "cellgate-replica", "lb"}}
    assert expected[None] <= set(services)
    assert expected.get(profile, {"cellgate-gpu"}) <= set(services)
    for name, service in services.items():
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on {dependency}, which {profile or 'default'} lacks"
            assert condition == {"condition": "service_healthy"}, (name, dependency)
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            assert source.startswith("/") or source in config["volumes"], f"{name}: undeclared volume {source}"
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|API_KEYS", key):
                assert not value, f"{name}: {key} has a value in the compose file"
        if CELLGATE_IMAGE.match(service["image"]):
            target = service["build"]["target"]
            # SIGKILL must come after the service's own drain has had its time.
            assert seconds(service["stop_grace_period"]) > drain_timeout(target), name
            assert "/tmp" in service["tmpfs"], name
            assert set(service["environment"]) <= {f"CELLGATE_{f.upper()}" for f in Settings.model_fields}, name


def test_bind_address_is_configurable(tmp_path: Path) -> None:
    config = resolved(tmp_path, None, CELLGATE_BIND="0.0.0.0")
    assert config["services"]["cellgate"]["ports"][0].startswith("0.0.0.0:8000:8000")


def test_scale_profile_shares_one_redis_behind_nginx(tmp_path: Path) -> None:
    services = active(resolved(tmp_path, "scale"), "scale")
    redis_args = services["redis"]["command"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert any(str(v).endswith(":/data:rw") or str(v).endswith(":/data") for v in services["redis"]["volumes"])
    replica = services["cellgate-replica"]
    assert replica["environment"]["CELLGATE_SESSION_STORE"] == "redis://redis:6379/0"
    assert replica["deploy"]["replicas"] >= 2
    assert "ports" not in replica  # reached through the load balancer only
    lb = services["lb"]
    assert any(str(v).startswith(f"{ROOT}/deploy/nginx/nginx.conf:/etc/nginx/nginx.conf") for v in lb["volumes"])
    assert "server cellgate-replica:8000 " in (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert lb["ports"][0].endswith(":8080/tcp")
    assert "listen 8080;" in (DEPLOY / "nginx" / "nginx.conf").read_text()


def test_gpu_profile_reserves_a_gpu_and_uses_the_cuda_image(tmp_path: Path) -> None:
    gpu = active(resolved(tmp_path, "gpu"), "gpu")["cellgate-gpu"]
    assert gpu["build"]["target"] == "gpu"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert device["driver"] == "nvidia"


def test_prometheus_in_compose_scrapes_every_cellgate_service(tmp_path: Path) -> None:
    services = resolved(tmp_path, "scale")["services"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = [job for job in prometheus["scrape_configs"] if job["job_name"] == "cellgate"]
    names = set(job["dns_sd_configs"][0]["names"])
    cellgate_services = {name for name, service in services.items() if CELLGATE_IMAGE.match(service["image"])}
    assert names == cellgate_services
    assert any(
        str(v).startswith(f"{ROOT}/deploy/prometheus:/etc/prometheus") for v in services["prometheus"]["volumes"]
    )


def test_own_bundle_is_one_override_file(tmp_path: Path) -> None:
    files = ("docker-compose.yml", "deploy/compose/bundle.yml")
    code, _, err = compose(tmp_path, "config", files=files)
    assert code != 0
    assert "CELLGATE_BUNDLE_DIR" in err
    code, out, err = compose(
        tmp_path, "--profile", "scale", "config", files=files, env={"CELLGATE_BUNDLE_DIR": "./bundles/mine"}
    )
    assert code == 0, err
    services = yaml.safe_load(out)["services"]
    for name in ("cellgate", "cellgate-replica", "cellgate-gpu"):
        assert services[name]["environment"]["CELLGATE_BUNDLE"] == "/bundle", name
        assert f"{ROOT}/bundles/mine:/bundle:ro" in services[name]["volumes"], name
    assert services["cellgate-replica"]["environment"]["CELLGATE_SESSION_STORE"] == "redis://redis:6379/0"
