"""FastStream's start-up warning that it creates no topics is dropped (each service has
waited for its topics by then); its other lines pass."""

from __future__ import annotations

import logging

import pytest

from shared.runtime.kafka import FASTSTREAM_LOGGER


def test_only_the_auto_create_warning_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=FASTSTREAM_LOGGER.name):
        FASTSTREAM_LOGGER.warning("Auto create topics is disabled. Make sure the topics exist.")
        FASTSTREAM_LOGGER.warning("Topic creation is skipped in consumer-only mode. Make sure the topics exist.")
        FASTSTREAM_LOGGER.error("a consumer failed")
    assert [r.getMessage() for r in caplog.records] == [
        "Topic creation is skipped in consumer-only mode. Make sure the topics exist.",
        "a consumer failed",
    ]
