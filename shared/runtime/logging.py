"""One JSON log format for every service, with personal data masked before it is written.

Phone numbers are masked wherever they appear in a log line, and fields that carry message
text are dropped, so a careless ``log.info("got %s", payload)`` cannot leak them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

# E.164 numbers (also URL-encoded, "%2B1...", as in raw form posts) and common national
# formats (10+ digits with optional separators); a run that starts with an ISO date
# (2026-03-14, "2026-03-14 10:00:00") is an instant, not a phone.
_PHONE = re.compile(r"(?<![\w-])(?!\d{4}-\d{2}-\d{2}\b)(?:\+|%2[Bb])?\d[\d\s().-]{8,}\d(?![\w-])")
# "text": "...", "body": "...", Body=... in serialized payloads or form data.
_TEXT_FIELDS = re.compile(
    r"""(?i)(?P<key>(?<![\w-])["']?(?:text|body|message_text|linked_phone|address|from|to|caller|called)["']?\s*[:=]\s*)"""
    r"""(?P<val>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,&}]+)"""
)
_SENSITIVE_EXTRA = frozenset(
    {"text", "body", "message_text", "address", "phone", "linked_phone", "payload"}
)
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "color_message"}


def mask_personal_data(text: str) -> str:
    """Mask phone numbers and the values of text-bearing fields in a log string."""
    text = _TEXT_FIELDS.sub(lambda m: m.group("key") + '"***"', text)
    return _PHONE.sub("***phone***", text)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": mask_personal_data(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key.startswith("_"):
                continue
            if key in _SENSITIVE_EXTRA:
                entry[key] = "***"
            elif isinstance(value, (str, int, float, bool)) or value is None:
                entry[key] = mask_personal_data(value) if isinstance(value, str) else value
            else:
                entry[key] = mask_personal_data(repr(value))
        if record.exc_info:
            entry["exc"] = mask_personal_data(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route every logger (ours, FastStream's, uvicorn's, aiokafka's) through the JSON format."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "faststream", "faststream.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # aiokafka and pymongo are chatty at INFO about connections; warnings still pass.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("pymongo").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
