"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

``docker-compose config`` (Debian's docker-compose, installed by scripts/tools.sh) parses and
validates the file and resolves anchors, interpolation and relative paths; the tests then
compare what it prints with the code: the services' modules, settings classes and ports,
the topics, and the files the image and the containers are given.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from shared.contracts.registry import all_topic_partitions
from shared.settings import ServiceSettings
from tests.deploy.support import REPO, ServiceCode, dockerfile_env, settings_env_names, tool_path

COMPOSE_FILE = REPO / "docker-compose.yml"
ALLOWED_CONDITIONS = {"service_healthy", "service_completed_successfully"}
# Images with neither a shell nor an HTTP client: compose cannot health-check them, and no
# service waits for them.
NO_HEALTHCHECK_POSSIBLE = {"otel-collector"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    exe = tool_path("docker-compose")
    # Only PATH and HOME from the caller: interpolation defaults in the file are what is tested.
    env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    result = subprocess.run(
        [exe, "-f", str(COMPOSE_FILE), "config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict) and config.get("services"), "docker-compose config printed no services"
    return config


def _is_hometeam_image(svc: dict[str, Any]) -> bool:
    return str(svc.get("image", "")).startswith("hometeam:")


@pytest.fixture(scope="module")
def hometeam(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Compose services that run the hometeam image."""
    out = {name: svc for name, svc in compose["services"].items() if _is_hometeam_image(svc)}
    assert out, "no compose service runs the hometeam image"
    return out


def _module_of(svc: dict[str, Any]) -> str | None:
    command = svc.get("command") or []
    if isinstance(command, str):
        command = command.split()
    if len(command) >= 3 and command[0] == "python" and command[1] == "-m":
        return command[2]
    return None


@pytest.fixture(scope="module")
def service_runs(hometeam: dict[str, dict[str, Any]], services: dict[str, ServiceCode]) -> dict[str, ServiceCode]:
    """Compose service name -> the service code it runs (for `python -m services.<pkg>`)."""
    out = {}
    for name, svc in hometeam.items():
        module = _module_of(svc)
        if module is None:
            continue
        assert module.startswith("services."), f"{name}: runs {module}, not a hometeam service"
        package = module.removeprefix("services.")
        assert (REPO / "services" / package / "__main__.py").is_file(), (
            f"{name}: command module {module} has no services/{package}/__main__.py"
        )
        out[name] = services[package]
    return out


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _published(svc: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) pairs, from short or long syntax."""
    out = []
    for port in svc.get("ports") or []:
        if isinstance(port, dict):
            out.append((int(port["published"]), int(port["target"])))
            continue
        spec = str(port).split("/")[0]
        parts = spec.split(":")
        out.append((int(parts[-2]), int(parts[-1])))
    return out


def _healthcheck_text(svc: dict[str, Any]) -> str:
    test = (svc.get("healthcheck") or {}).get("test") or []
    return " ".join(test) if isinstance(test, list) else str(test)


def _bind_mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of bind mounts (named volumes excluded)."""
    out = []
    for volume in svc.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                out.append((volume["source"], volume["target"]))
            continue
        parts = str(volume).split(":")
        if len(parts) >= 2 and parts[0].startswith(("/", ".")):
            out.append((parts[0], parts[1]))
    return out


# --------------------------------------------------------------------------- services


def test_every_service_in_the_code_runs_in_compose(
    service_runs: dict[str, ServiceCode], services: dict[str, ServiceCode]
) -> None:
    run = sorted(code.package for code in service_runs.values())
    assert run == sorted(services), f"compose runs {run}; the code has {sorted(services)}"
    assert len(set(run)) == len(run), "a service runs twice in compose"


def test_env_vars_are_settings_fields(
    hometeam: dict[str, dict[str, Any]], service_runs: dict[str, ServiceCode]
) -> None:
    problems = []
    for name, svc in hometeam.items():
        code = service_runs.get(name)
        known = code.env_names if code else settings_env_names(ServiceSettings)
        unknown = sorted(set(_env(svc)) - known)
        if unknown:
            owner = code.settings.__name__ if code else "ServiceSettings"
            problems.append(f"{name}: {unknown} are not fields of {owner}")
    assert not problems, "\n".join(problems)


def test_env_values_are_valid_settings(service_runs: dict[str, ServiceCode], hometeam: dict[str, dict[str, Any]]) -> None:
    """The values parse: e.g. a port is a number, a security protocol one of the choices."""
    for name, code in service_runs.items():
        values = {k.lower(): v for k, v in _env(hometeam[name]).items()}
        code.settings(**values)


def test_http_port_matches_published_port_default_and_healthcheck(
    hometeam: dict[str, dict[str, Any]], service_runs: dict[str, ServiceCode]
) -> None:
    for name, code in service_runs.items():
        svc = hometeam[name]
        env = _env(svc)
        assert "HTTP_PORT" in env, f"{name}: set HTTP_PORT (the image's HEALTHCHECK reads it)"
        port = int(env["HTTP_PORT"])
        assert port == code.http_port, f"{name}: HTTP_PORT {port}, but {code.settings.__name__} defaults to {code.http_port}"
        assert (port, port) in _published(svc), f"{name}: publishes {_published(svc)}, expected {port}:{port}"
        assert env.get("HTTP_HOST") == "0.0.0.0", f"{name}: HTTP_HOST must be 0.0.0.0 in a container"
        check = _healthcheck_text(svc)
        assert f"127.0.0.1:{port}/readyz" in check, f"{name}: healthcheck does not hit /readyz on {port}: {check}"


def test_published_ports_are_unique_and_local(compose: dict[str, Any]) -> None:
    seen: dict[int, str] = {}
    for name, svc in compose["services"].items():
        for port in svc.get("ports") or []:
            text = str(port) if not isinstance(port, dict) else f"{port.get('host_ip', '')}:{port['published']}"
            assert text.startswith("127.0.0.1:"), f"{name}: {text} listens beyond localhost"
        for host, _ in _published(svc):
            assert host not in seen, f"host port {host} is published by {seen[host]} and {name}"
            seen[host] = name


def test_depends_on_waits_for_health_or_completion(compose: dict[str, Any], hometeam: dict[str, dict[str, Any]]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        depends = svc.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions, not a plain list"
        for target, spec in depends.items():
            condition = (spec or {}).get("condition")
            assert condition in ALLOWED_CONDITIONS, f"{name} -> {target}: condition {condition!r}"
            assert target in services, f"{name} depends on unknown service {target}"
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), f"{name} waits for {target}'s health, which has no healthcheck"
            else:
                assert str(services[target].get("restart", "no")) == "no", f"{target} is one-shot: restart must be 'no'"
    one_shot = {n for n, s in hometeam.items() if _module_of(s) is None}
    for name, svc in hometeam.items():
        if name in one_shot:
            continue
        depends = svc.get("depends_on") or {}
        for infra in ("kafka", "mongo"):
            assert depends.get(infra, {}).get("condition") == "service_healthy", f"{name} must wait for healthy {infra}"
        for init in one_shot:
            assert depends.get(init, {}).get("condition") == "service_completed_successfully", (
                f"{name} must wait for {init} to complete"
            )


def test_healthchecks_exist(compose: dict[str, Any]) -> None:
    missing = [
        name
        for name, svc in compose["services"].items()
        if name not in NO_HEALTHCHECK_POSSIBLE
        and str(svc.get("restart", "no")) != "no"
        and not (svc.get("healthcheck") or {}).get("test")
    ]
    assert not missing, f"services without a healthcheck: {missing}"


# Prometheus and Grafana configuration, written in a separate change: checked for the right
# kind (file or folder) once present. Delete this table when they are in the repository, so
# that the test below requires them like every other mounted path.
def test_mounted_host_paths_exist(compose: dict[str, Any]) -> None:
    problems = []
    for name, svc in compose["services"].items():
        for host, _ in _bind_mounts(svc):
            path = Path(host) if Path(host).is_absolute() else REPO / host
            if not path.exists():
                problems.append(f"{name}: {host} does not exist")
    assert not problems, "bind mounts:\n" + "\n".join(problems)


def test_team_directory_is_mounted_where_the_services_read_it(
    hometeam: dict[str, dict[str, Any]], service_runs: dict[str, ServiceCode]
) -> None:
    image_default = dockerfile_env()["TEAMS_CONFIG"]
    for name, code in service_runs.items():
        if not code.has_field("teams_config"):
            continue
        path = _env(hometeam[name]).get("TEAMS_CONFIG", image_default)
        mounts = {target: Path(host) for host, target in _bind_mounts(hometeam[name])}
        assert path in mounts, f"{name}: TEAMS_CONFIG={path} is not a mounted file (mounts: {sorted(mounts)})"
        assert mounts[path].resolve() == (REPO / "deploy" / "teams.yaml").resolve()


def test_infrastructure_addresses_match(compose: dict[str, Any], service_runs: dict[str, ServiceCode]) -> None:
    services = compose["services"]
    kafka_env = _env(services["kafka"])
    advertised = {urlsplit(u).netloc for u in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    assert services["kafka"]["image"] == "apache/kafka:4.3.1"
    assert services["mongo"]["image"] == "mongo:8.0"
    for name in service_runs:
        env = _env(services[name])
        for server in env["KAFKA_BOOTSTRAP_SERVERS"].split(","):
            assert server in advertised, f"{name}: bootstrap {server} is not an advertised listener {advertised}"
        assert urlsplit(env["MONGODB_URL"]).hostname == "mongo"
        endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname in services, f"{name}: OTLP endpoint host {endpoint.hostname} is no compose service"


def test_topic_init_runs_a_command_that_is_in_the_image(compose: dict[str, Any]) -> None:
    svc = compose["services"]["topic-init"]
    assert _is_hometeam_image(svc)
    command = svc["command"]
    script = Path(command[1])
    assert command[0] == "python" and (REPO / script).is_file(), command
    assert f"COPY {script} " in (REPO / "Dockerfile").read_text(), f"the Dockerfile does not copy {script}"
    assert command[2] == "create-topics"
    bootstrap = command[command.index("--bootstrap") + 1]
    assert bootstrap == _env(compose["services"]["kafka"])["KAFKA_ADVERTISED_LISTENERS"].split(",")[0].split("://")[1]


def test_topic_init_command_creates_every_topic(compose: dict[str, Any], infra: Any) -> None:
    """The compose command itself, against the real test broker (only the address differs)."""
    command = list(compose["services"]["topic-init"]["command"])
    command[command.index("--bootstrap") + 1] = infra.kafka
    command[0] = sys.executable
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for topic, partitions in all_topic_partitions().items():
        assert re.search(rf"^\w+\s+{re.escape(topic)} partitions(=| \d+ -> ){partitions}$", result.stdout, re.M), (
            f"{topic} not reported with {partitions} partitions:\n{result.stdout}"
        )


# --------------------------------------------------------------------------- OpenTelemetry collector


def test_collector_config_is_mounted_and_wired(compose: dict[str, Any], service_runs: dict[str, ServiceCode]) -> None:
    services = compose["services"]
    collector = services["otel-collector"]
    mounts = {target: Path(host) for host, target in _bind_mounts(collector)}
    config_arg = next(a for a in collector["command"] if a.startswith("--config="))
    config_path = config_arg.split("=", 1)[1]
    assert mounts.get(config_path, Path()).resolve() == (REPO / "deploy" / "otel" / "collector.yaml").resolve()
    config = yaml.safe_load((REPO / "deploy" / "otel" / "collector.yaml").read_text())

    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"pipeline uses undefined {kind[:-1]} {component}"
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]

    http = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    for name in service_runs:
        endpoint = urlsplit(_env(services[name])["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname == "otel-collector" and endpoint.port == int(http.rsplit(":", 1)[1])
    traces = config["service"]["pipelines"]["traces"]
    targets = {config["exporters"][e]["endpoint"].split("://")[-1].split(":")[0] for e in traces["exporters"]}
    assert targets == {"jaeger"}, targets
    assert "jaeger" in services and (16686, 16686) in _published(services["jaeger"])


# --------------------------------------------------------------------------- image


def _dockerignore_patterns() -> list[tuple[bool, str]]:
    out = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        out.append((negate, line.lstrip("!").strip("/")))
    return out


def _glob_match(pattern: str, path: str) -> bool:
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
    return re.fullmatch(regex.replace(r"\?", "[^/]"), path) is not None


def _in_context(rel: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, pattern in _dockerignore_patterns():
        if any(_glob_match(pattern, c) for c in candidates):
            included = negate
    return included


def _copy_sources() -> list[str]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    sources = []
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources.extend(w for w in words[1:-1] if not w.startswith("--"))
    return sources


def test_dockerfile_copies_exist_and_are_in_the_build_context() -> None:
    sources = _copy_sources()
    assert {"shared/", "services/", "deploy/teams.yaml", "pyproject.toml", "uv.lock"} <= set(sources), sources
    for source in sources:
        path = REPO / source
        assert path.exists(), f"Dockerfile copies {source}, which does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        for file in files:
            rel = file.relative_to(REPO).as_posix()
            assert _in_context(rel), f".dockerignore leaves {rel} out of the build context"
    for heavy in (".stack/bin/kustomize", ".venv/bin/python", ".git/HEAD", "tests/conftest.py"):
        assert not _in_context(heavy), f"{heavy} would be sent to the Docker build context"


def test_image_defaults() -> None:
    env = dockerfile_env()
    assert env["HTTP_HOST"] == "0.0.0.0"
    assert Path(env["TEAMS_CONFIG"]).is_absolute()
    text = (REPO / "Dockerfile").read_text()
    assert re.search(rf"COPY deploy/teams.yaml {re.escape(env['TEAMS_CONFIG'])}\n", text)
    assert re.search(r"(?m)^USER (?!0\b|root\b)\S+", text), "the runtime stage must run as a non-root user"
    assert "HEALTHCHECK" in text and "/healthz" in text


def test_image_environment_runs_every_service(tmp_path: Path, services: dict[str, ServiceCode]) -> None:
    """The Dockerfile's own `uv sync` (locked, without dev dependencies) into a scratch venv,
    then every service module and the topic script import from it: no runtime code depends
    on a dev-only package."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    sync = re.search(r"(?m)^RUN (uv sync [^\n]*)$", text)
    assert sync, "the Dockerfile has no `RUN uv sync ...`"
    args = sync.group(1).split()
    assert "--frozen" in args and "--no-dev" in args, args
    venv = tmp_path / "venv"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))},
        "UV_PROJECT_ENVIRONMENT": str(venv),
        "UV_PYTHON": getattr(sys, "_base_executable", sys.executable),
        "UV_PYTHON_DOWNLOADS": "never",
    }
    result = subprocess.run(
        ["python3", "-m", *args, "--quiet"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stderr[-3000:]}"
    python = venv / "bin" / "python"
    run_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)}
    imports = "; ".join(f"import {code.module}.app" for code in services.values())
    check = subprocess.run([str(python), "-c", imports], cwd=tmp_path, env=run_env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-3000:]
    probe = subprocess.run(
        [str(python), str(REPO / "scripts" / "stack_probe.py"), "create-topics", "--help"],
        cwd=tmp_path, env=run_env, capture_output=True, text=True,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    dev_only = subprocess.run([str(python), "-c", "import pytest"], capture_output=True, env=run_env)
    assert dev_only.returncode != 0, "the image environment contains dev dependencies (pytest)"


def test_glob_matcher_follows_docker_rules() -> None:
    assert _glob_match("*", "shared") and not _glob_match("*", "shared/x.py")
    assert _glob_match("**/__pycache__", "services/ingest/__pycache__")
    assert _glob_match("**/__pycache__", "__pycache__")
    assert not _glob_match("shared", "services")
