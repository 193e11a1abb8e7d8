from __future__ import annotations

import pytest

from tests.deploy.support import ServiceCode, discover_services


@pytest.fixture(scope="session")
def services() -> dict[str, ServiceCode]:
    """Every service in the code, by package name, with its settings class."""
    return discover_services()
