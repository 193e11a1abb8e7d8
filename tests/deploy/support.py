"""What the deploy tests compare the compose and Kubernetes files with, read from the code:
the services (``services/<pkg>/__main__.py``), each one's settings class (the subclass of
``ServiceSettings`` in ``services/<pkg>/app.py``), the topics each one consumes (its broker's
subscribers) and the topic partition counts (``shared/contracts/registry.py``).

The offline validators (docker-compose, kustomize) are installed by ``scripts/tools.sh``, which
``make test`` runs before pytest. A missing tool fails these tests with that instruction; they
never skip.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]
TOOLS_HINT = "run `bash scripts/tools.sh` (make test does) to install it"


@dataclass(frozen=True)
class ServiceCode:
    package: str  # e.g. "team_routing"
    settings: type[ServiceSettings]

    @property
    def module(self) -> str:
        return f"services.{self.package}"

    @property
    def env_names(self) -> set[str]:
        return settings_env_names(self.settings)

    @property
    def http_port(self) -> int:
        return int(self.settings.model_fields["http_port"].default)

    def has_field(self, name: str) -> bool:
        return name in self.settings.model_fields


def settings_env_names(cls: type[ServiceSettings]) -> set[str]:
    """The environment variable names pydantic-settings reads for ``cls``."""
    prefix = cls.model_config.get("env_prefix", "") or ""
    names = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
        names.add((alias or f"{prefix}{name}").upper())
    return names


def _settings_class(package: str) -> type[ServiceSettings]:
    module = importlib.import_module(f"services.{package}.app")
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, ServiceSettings)
        and obj is not ServiceSettings
        and obj.__module__ == module.__name__
    ]
    assert len(found) == 1, f"services/{package}/app.py should define one ServiceSettings subclass, found {found}"
    return found[0]


def discover_services() -> dict[str, ServiceCode]:
    """Every runnable service: a package under services/ with a __main__.py."""
    out = {}
    for main in sorted((REPO / "services").glob("*/__main__.py")):
        package = main.parent.name
        out[package] = ServiceCode(package, _settings_class(package))
    assert out, "no services/<name>/__main__.py found"
    return out


def consumed_topics(package: str) -> set[str]:
    """Topic names the service's broker subscribes to (building a service connects nothing)."""
    module = importlib.import_module(f"services.{package}.app")
    settings_cls = _settings_class(package)
    overrides = {}
    if "teams_config" in settings_cls.model_fields:
        overrides["teams_config"] = REPO / "deploy" / "teams.yaml"
    service = module.create_service(settings_cls(kafka_topic_prefix="", **overrides))
    topics: set[str] = set()
    for subscriber in service.broker.subscribers:
        topics.update(subscriber.topic_names)
    return topics


def dockerfile_env() -> dict[str, str]:
    """ENV values of the Dockerfile's last stage (the runtime image)."""
    text = (REPO / "Dockerfile").read_text()
    last_stage = re.split(r"(?m)^FROM\s", text)[-1]
    joined = re.sub(r"\\\n", " ", last_stage)
    env: dict[str, str] = {}
    for line in joined.splitlines():
        if line.strip().startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S+)", line):
                env[key] = value
    return env


def tool_path(name: str) -> str:
    """A validator installed by scripts/tools.sh: in <state dir>/bin, else on PATH."""
    state = Path(os.environ.get("HOMETEAM_STATE_DIR") or REPO / ".stack")
    if not state.is_absolute():
        state = REPO / state
    candidate = state / "bin" / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"missing tool: {name} ({TOOLS_HINT})", pytrace=False)
    return found
