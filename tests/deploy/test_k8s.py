"""deploy/k8s: both overlays rendered with kustomize and checked offline.

Every rendered object is validated against the Kubernetes OpenAPI schemas that PyPI's
kubernetes-validate ships (strict: unknown fields fail). Then the objects are compared with
the code: probes and ports against each service's settings, env var names against its
settings fields, HorizontalPodAutoscaler bounds against the partitions of the topics the
service's broker subscribes to, and the production overlay's secrets against Secret refs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shared.contracts.registry import all_topic_partitions
from shared.settings import ServiceSettings
from tests.deploy.support import REPO, ServiceCode, consumed_topics, dockerfile_env, settings_env_names, tool_path

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("local", "production")
# The Kubernetes version the objects must be valid for (a schema kubernetes-validate ships).
KUBERNETES_VERSION = "1.34.0"
# Custom resources: no schema offline; each has its own structural test below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet"}
SECRET_ENV = {"KAFKA_SASL_PASSWORD", "MONGODB_URL"}

Obj = dict[str, Any]


# --------------------------------------------------------------------------- rendering


def render(overlay: str) -> list[Obj]:
    exe = tool_path("kustomize")
    result = subprocess.run(
        [exe, "build", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kustomize build overlays/{overlay} failed:\n{result.stderr}"
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert docs, f"overlays/{overlay} rendered nothing"
    return docs


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, render(request.param)


@pytest.fixture(scope="module")
def production() -> list[Obj]:
    return render("production")


@pytest.fixture(scope="module")
def local() -> list[Obj]:
    return render("local")


def of_kind(docs: list[Obj], kind: str) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Obj], kind: str, name: str) -> Obj:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def containers(workload: Obj) -> list[Obj]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def module_of(container: Obj) -> str | None:
    command = [*container.get("command", []), *container.get("args", [])]
    if command[:2] == ["python", "-m"] and len(command) > 2:
        return command[2]
    return None


def is_hometeam(container: Obj) -> bool:
    return "hometeam" in container["image"].rsplit("/", 1)[-1].split(":")[0]


def hometeam_workloads(docs: list[Obj]) -> list[tuple[Obj, Obj]]:
    """(workload, container) for every container that runs the hometeam image."""
    return [(w, c) for w in docs if w["kind"] in WORKLOAD_KINDS for c in containers(w) if is_hometeam(c)]


def service_deployments(docs: list[Obj], services: dict[str, ServiceCode]) -> dict[str, tuple[Obj, Obj, ServiceCode]]:
    """Deployment name -> (deployment, container, service code) for `python -m services.<pkg>`."""
    out = {}
    for workload, container in hometeam_workloads(docs):
        module = module_of(container)
        if module is None:
            continue
        assert workload["kind"] == "Deployment", f"{workload['metadata']['name']} runs {module} as a {workload['kind']}"
        package = module.removeprefix("services.")
        assert package in services, f"{workload['metadata']['name']} runs {module}, which is not a service"
        out[workload["metadata"]["name"]] = (workload, container, services[package])
    return out


def env_of(container: Obj, docs: list[Obj]) -> dict[str, Obj]:
    """Every variable the container gets: envFrom ConfigMaps/Secrets, then env entries."""
    out: dict[str, Obj] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = named(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
            out.update({k: {"name": k, "value": v, "from": "configMap"} for k, v in data.items()})
        elif "secretRef" in source:
            data = named(docs, "Secret", source["secretRef"]["name"]).get("data", {})
            out.update({k: {"name": k, "from": "secret"} for k in data})
    for entry in container.get("env", []):
        out[entry["name"]] = entry
    return out


def port_number(container: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert numbers, f"container {container['name']} has no port named {port}"
    return numbers[0]


# --------------------------------------------------------------------------- schema validation


def test_every_object_is_valid_for_kubernetes(rendered: tuple[str, list[Obj]]) -> None:
    overlay, docs = rendered
    problems = []
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{doc['kind']}/{doc['metadata'].get('name')}: {exc.message} at {list(exc.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{doc['kind']}/{doc['metadata'].get('name')}: no schema for {key} in Kubernetes {KUBERNETES_VERSION}")
    assert not problems, f"overlays/{overlay}:\n" + "\n".join(problems)


def test_the_validator_rejects_a_bad_object() -> None:
    """kubernetes-validate really checks: an unknown field and a wrong type both fail."""
    good = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": 80}]}}
    kubernetes_validate.validate(good, KUBERNETES_VERSION, strict=True)
    for bad in (
        {**good, "spec": {"ports": [{"port": "eighty"}]}},
        {**good, "spec": {"ports": [{"port": 80}], "selectorr": {}}},
    ):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_references_resolve(rendered: tuple[str, list[Obj]]) -> None:
    """ConfigMaps, Secrets and ServiceAccounts the pods name are rendered too, except the
    production Secrets that the operator creates (documented in the overlay)."""
    overlay, docs = rendered
    external_secrets = {"hometeam-secrets", "hometeam-kafka-tls"} if overlay == "production" else set()
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for workload in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        spec = pod_spec(workload)
        wname = workload["metadata"]["name"]
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names, wname
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, f"{wname}: {volume}"
            if "secret" in volume:
                secret = volume["secret"]["secretName"]
                assert secret in external_secrets or ("Secret", secret) in names, f"{wname}: {volume}"
        for container in containers(workload):
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] not in external_secrets:
                    secret = named(docs, "Secret", ref["name"])
                    data = {**secret.get("data", {}), **secret.get("stringData", {})}
                    assert ref.get("optional") or ref["key"] in data, f"{wname}: Secret {ref['name']} lacks {ref['key']}"
            env_of(container, docs)  # every envFrom ConfigMap exists


# --------------------------------------------------------------------------- services and probes


def test_every_service_is_deployed(rendered: tuple[str, list[Obj]], services: dict[str, ServiceCode]) -> None:
    overlay, docs = rendered
    deployed = sorted(code.package for _, _, code in service_deployments(docs, services).values())
    assert deployed == sorted(services), f"overlays/{overlay} deploys {deployed}; the code has {sorted(services)}"


def test_probes_ports_and_scrape_annotations(rendered: tuple[str, list[Obj]], services: dict[str, ServiceCode]) -> None:
    overlay, docs = rendered
    for name, (deployment, container, code) in service_deployments(docs, services).items():
        where = f"overlays/{overlay} {name}"
        env = env_of(container, docs)
        port = int(env["HTTP_PORT"]["value"])
        assert port == code.http_port, f"{where}: HTTP_PORT {port}, settings default {code.http_port}"
        assert env["HTTP_HOST"]["value"] == "0.0.0.0", f"{where}: HTTP_HOST must be 0.0.0.0"
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = container.get(probe, {}).get("httpGet")
            assert get, f"{where}: no HTTP {probe}"
            assert get["path"] == path, f"{where}: {probe} hits {get['path']}, expected {path}"
            assert port_number(container, get["port"]) == port, f"{where}: {probe} on another port"
        if "startupProbe" in container:
            assert port_number(container, container["startupProbe"]["httpGet"]["port"]) == port
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", where
        assert annotations.get("prometheus.io/port") == str(port), where
        assert annotations.get("prometheus.io/path") == "/metrics", where
        service = named(docs, "Service", name)
        selector = service["spec"]["selector"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{where}: Service selector does not match the pods"
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == port and port_number(container, service_port["targetPort"]) == port


def test_pods_run_non_root_and_restricted(rendered: tuple[str, list[Obj]]) -> None:
    """Pod Security Standard 'restricted' for every pod, plus a read-only root filesystem
    for hometeam's own containers."""
    overlay, docs = rendered
    for workload in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        spec = pod_spec(workload)
        pod = spec.get("securityContext", {})
        where = f"overlays/{overlay} {workload['kind']}/{workload['metadata']['name']}"
        assert spec.get("automountServiceAccountToken") is False, f"{where}: mounts a service account token"
        for container in containers(workload):
            sc = container.get("securityContext", {})
            cwhere = f"{where} container {container['name']}"
            assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, f"{cwhere}: runAsNonRoot"
            assert sc.get("runAsUser", pod.get("runAsUser", 1)) != 0, f"{cwhere}: runs as uid 0"
            seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", f"{cwhere}: seccomp {seccomp}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{cwhere}: allowPrivilegeEscalation"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{cwhere}: capabilities not dropped"
            assert not sc.get("capabilities", {}).get("add"), f"{cwhere}: adds capabilities"
            assert not sc.get("privileged"), f"{cwhere}: privileged"
            if is_hometeam(container):
                assert sc.get("readOnlyRootFilesystem") is True, f"{cwhere}: root filesystem is writable"


def test_every_container_has_requests_and_limits(rendered: tuple[str, list[Obj]]) -> None:
    overlay, docs = rendered
    for workload in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        for container in containers(workload):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(kind, {}), (
                        f"overlays/{overlay} {workload['metadata']['name']}/{container['name']}: no {resource} {kind}"
                    )


def test_env_var_names_are_settings_fields(rendered: tuple[str, list[Obj]], services: dict[str, ServiceCode]) -> None:
    overlay, docs = rendered
    by_container = {id(c): code for _, c, code in service_deployments(docs, services).values()}
    problems = []
    for workload, container in hometeam_workloads(docs):
        code = by_container.get(id(container))
        known = code.env_names if code else settings_env_names(ServiceSettings)
        unknown = sorted(set(env_of(container, docs)) - known)
        if unknown:
            owner = code.settings.__name__ if code else "ServiceSettings"
            problems.append(f"{workload['metadata']['name']}: {unknown} are not fields of {owner}")
    assert not problems, f"overlays/{overlay}:\n" + "\n".join(problems)


def test_env_values_are_valid_settings(rendered: tuple[str, list[Obj]], services: dict[str, ServiceCode]) -> None:
    """Plain values parse with the settings class (secret refs get a placeholder)."""
    overlay, docs = rendered
    for name, (_, container, code) in service_deployments(docs, services).items():
        values = {}
        for key, entry in env_of(container, docs).items():
            values[key.lower()] = entry["value"] if "value" in entry else "placeholder-from-secret"
        code.settings(**values)


def test_team_directory_is_mounted_where_the_services_read_it(
    rendered: tuple[str, list[Obj]], services: dict[str, ServiceCode]
) -> None:
    overlay, docs = rendered
    image_default = dockerfile_env()["TEAMS_CONFIG"]
    teams = (REPO / "deploy" / "teams.yaml").read_text()
    for name, (deployment, container, code) in service_deployments(docs, services).items():
        if not code.has_field("teams_config"):
            continue
        env = env_of(container, docs)
        path = PurePosixPath(env["TEAMS_CONFIG"]["value"] if "TEAMS_CONFIG" in env else image_default)
        volumes = {v["name"]: v for v in pod_spec(deployment).get("volumes", [])}
        found = False
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "configMap" in volume and path.parent == PurePosixPath(mount["mountPath"]):
                data = named(docs, "ConfigMap", volume["configMap"]["name"])["data"]
                assert data.get(path.name) == teams, (
                    f"overlays/{overlay} {name}: the team directory ConfigMap differs from deploy/teams.yaml "
                    "(cp deploy/teams.yaml deploy/k8s/base/teams.yaml)"
                )
                found = True
        assert found, f"overlays/{overlay} {name}: TEAMS_CONFIG={path} is not in a mounted ConfigMap"


def test_base_team_directory_is_deploy_teams_yaml() -> None:
    assert (K8S / "base" / "teams.yaml").read_text() == (REPO / "deploy" / "teams.yaml").read_text(), (
        "deploy/k8s/base/teams.yaml differs from deploy/teams.yaml: cp deploy/teams.yaml deploy/k8s/base/teams.yaml"
    )


# --------------------------------------------------------------------------- scaling


def test_autoscaling_is_bounded_by_partitions(rendered: tuple[str, list[Obj]], services: dict[str, ServiceCode]) -> None:
    overlay, docs = rendered
    partitions = all_topic_partitions()
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(docs, "HorizontalPodAutoscaler")}
    for name, (deployment, _, code) in service_deployments(docs, services).items():
        where = f"overlays/{overlay} {name}"
        topics = consumed_topics(code.package)
        assert topics, f"{where}: the service consumes no topic"
        unknown = topics - partitions.keys()
        assert not unknown, f"{where}: consumes topics missing from the registry: {unknown}"
        bound = min(partitions[t] for t in topics)
        assert name in hpas, f"{where}: no HorizontalPodAutoscaler"
        spec = hpas[name]["spec"]
        assert spec["scaleTargetRef"]["kind"] == "Deployment"
        assert spec["maxReplicas"] <= bound, (
            f"{where}: maxReplicas {spec['maxReplicas']} > {bound}, the partitions of {sorted(topics)}"
        )
        assert 1 <= spec.get("minReplicas", 1) <= spec["maxReplicas"]
        assert "replicas" not in deployment["spec"], f"{where}: the HPA owns replicas; drop spec.replicas"
        pdbs = [
            p for p in of_kind(docs, "PodDisruptionBudget")
            if p["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pdbs) == 1, f"{where}: expected one PodDisruptionBudget, found {len(pdbs)}"


def test_production_keeps_two_replicas(production: list[Obj]) -> None:
    for hpa in of_kind(production, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["minReplicas"] >= 2, hpa["metadata"]["name"]


# --------------------------------------------------------------------------- production


def test_production_takes_secrets_from_secret_refs(production: list[Obj], services: dict[str, ServiceCode]) -> None:
    assert not of_kind(production, "Secret"), "the production overlay must not contain a Secret"
    for cm in of_kind(production, "ConfigMap"):
        leaked = {k for k in cm.get("data", {}) if k in SECRET_ENV or "PASSWORD" in k or "SECRET" in k or "TOKEN" in k}
        assert not leaked, f"ConfigMap {cm['metadata']['name']} holds secrets: {leaked}"
    deployed = service_deployments(production, services)
    for workload, container in hometeam_workloads(production):
        name = workload["metadata"]["name"]
        env = env_of(container, production)
        needed = {"KAFKA_SASL_PASSWORD"} | ({"MONGODB_URL"} if name in deployed else set())
        for key in needed:
            ref = env.get(key, {}).get("valueFrom", {}).get("secretKeyRef")
            assert ref and not ref.get("optional"), f"{name}: {key} must come from a required secretKeyRef"
        for key, entry in env.items():
            if any(word in key for word in ("PASSWORD", "SECRET", "TOKEN")) or key in SECRET_ENV:
                assert "secretKeyRef" in entry.get("valueFrom", {}), f"{name}: {key} is not from a Secret"


def test_production_kafka_security(production: list[Obj]) -> None:
    for workload, container in hometeam_workloads(production):
        name = workload["metadata"]["name"]
        env = {k: v.get("value") for k, v in env_of(container, production).items()}
        assert env["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL", name
        assert env["KAFKA_SASL_MECHANISM"].startswith("SCRAM-SHA-"), name
        assert env.get("KAFKA_SASL_USERNAME"), name
        assert "kafka:9092" not in env["KAFKA_BOOTSTRAP_SERVERS"], f"{name}: production points at the local broker"
        cafile = PurePosixPath(env["KAFKA_SSL_CAFILE"])
        mounts = {PurePosixPath(m["mountPath"]) for m in container.get("volumeMounts", [])}
        assert cafile.parent in mounts, f"{name}: KAFKA_SSL_CAFILE {cafile} is not in a mounted volume"


def test_production_image_is_pinned(production: list[Obj]) -> None:
    images = {c["image"] for _, c in hometeam_workloads(production)}
    assert len(images) == 1, f"one image for every service, found {images}"
    (image,) = images
    name, _, tag = image.rpartition(":")
    assert "@sha256:" in image or (name and "/" in name and tag not in ("", "latest", "dev")), (
        f"production image {image} is not pinned to a release tag or digest"
    )


def test_production_servicemonitor_selects_the_services(production: list[Obj], services: dict[str, ServiceCode]) -> None:
    (monitor,) = [d for d in production if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS]
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = {s["metadata"]["name"] for s in of_kind(production, "Service") if selector.items() <= s["metadata"].get("labels", {}).items()}
    assert selected == set(service_deployments(production, services)), selected
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    for service in of_kind(production, "Service"):
        if service["metadata"]["name"] in selected:
            assert endpoint["port"] in {p.get("name") for p in service["spec"]["ports"]}


# --------------------------------------------------------------------------- topic-init Job


def _topic_job(docs: list[Obj]) -> tuple[Obj, Obj]:
    jobs = [(w, c) for w, c in hometeam_workloads(docs) if w["kind"] == "Job"]
    assert len(jobs) == 1, f"expected one hometeam Job (topic-init), found {len(jobs)}"
    return jobs[0]


def test_topic_init_replication(local: list[Obj], production: list[Obj]) -> None:
    assert _topic_job(local)[1]["args"][0] == "1"
    assert int(_topic_job(production)[1]["args"][0]) >= 3


def test_topic_init_job_creates_every_topic(local: list[Obj], infra: Any) -> None:
    """The Job's own command and arguments, with its ConfigMap environment, against the real
    test broker (the address and a topic prefix are the only changes)."""
    _, container = _topic_job(local)
    command = [sys.executable, *container["command"][1:], *container["args"]]
    env = {k: v["value"] for k, v in env_of(container, local).items() if "value" in v}
    prefix = f"tk8s{uuid.uuid4().hex[:8]}."
    env.update(KAFKA_BOOTSTRAP_SERVERS=infra.kafka, KAFKA_TOPIC_PREFIX=prefix)
    run_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), **env}
    result = subprocess.run(command, cwd=Path("/"), env=run_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for topic, partitions in all_topic_partitions().items():
        assert f"created {prefix}{topic} partitions={partitions}" in result.stdout, result.stdout
