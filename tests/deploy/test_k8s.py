"""deploy/k8s: every manifest validates against the Kubernetes schemas, and the pieces fit together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from tests.deploy.tools import DEPLOY

K8S = DEPLOY / "k8s"
# The oldest Kubernetes still commonly run, and the newest the package ships schemas for.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def _resources() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (K8S / name, doc)
        for name in _kustomization()["resources"]
        for doc in yaml.safe_load_all((K8S / name).read_text())
        if doc
    ]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for _, doc in _resources() if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_kustomization()["resources"])
    on_disk = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    kinds = set()
    for path, doc in _resources():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']} is invalid for {version}: {exc}")
        kinds.add(doc["kind"])
    needed = {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "StatefulSet", "PodDisruptionBudget"}
    assert needed <= kinds


def test_deployment_probes_resources_and_graceful_shutdown() -> None:
    deployment = _one("Deployment", "cellgate")
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    config = _one("ConfigMap", "cellgate")["data"]
    drain = float(config["CELLGATE_DRAIN_TIMEOUT_SECONDS"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # The kubelet counts the grace period from the start of preStop: pause + drain must fit inside it.
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain
    port = container["ports"][0]["containerPort"]
    assert str(port) == config["CELLGATE_PORT"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"]
    assert not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"]
    assert container["envFrom"][0]["configMapRef"]["name"] == "cellgate"


def test_selectors_and_references_match() -> None:
    labels = _one("Deployment", "cellgate")["spec"]["template"]["metadata"]["labels"]
    assert _one("Service", "cellgate")["spec"]["selector"].items() <= labels.items()
    assert _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = _one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "cellgate")
    assert _one("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2  # the PDB can then always let one go


def test_redis_statefulset_persists_with_aof_and_is_the_session_store() -> None:
    redis = _one("StatefulSet", "cellgate-redis")
    [container] = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    [claim] = redis["spec"]["volumeClaimTemplates"]
    [mount] = container["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"]
    assert mount["mountPath"] == args[args.index("--dir") + 1]
    assert redis["spec"]["serviceName"] == _one("Service", redis["spec"]["serviceName"])["metadata"]["name"]
    store = _one("ConfigMap", "cellgate")["data"]["CELLGATE_SESSION_STORE"]
    host, port = store.removeprefix("redis://").split("/")[0].split(":")
    service = _one("Service", host)
    assert service["spec"]["ports"][0]["port"] == int(port)
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


def test_configmap_sets_only_real_settings() -> None:
    fields = {f"CELLGATE_{name.upper()}" for name in Settings.model_fields}
    keys = set(_one("ConfigMap", "cellgate")["data"])
    assert keys <= fields, keys - fields
    Settings.model_validate({key.removeprefix("CELLGATE_").lower(): value for key, value in
                             _one("ConfigMap", "cellgate")["data"].items()})  # fmt: skip
