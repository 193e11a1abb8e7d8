"""Compact documents: a service's private state stored as one compressed BSON blob.

A document that its service only ever reads by ``_id`` (never queried or indexed by its
fields) is stored as ``{_id, <kept fields>, format, blob}``. FerretDB 1.24 on SQLite converts
every field of a document to its JSON form on every insert, read and replace, and evaluates
each index expression over that JSON: measured on a 2 KB state document, an insert costs it
0.145 ms of CPU as fields and 0.05 ms as a blob, a replace 0.73 ms and 0.45 ms
(``docs/benchmarks.md``). MongoDB stores the blob as well as the fields, in fewer bytes.

Reading accepts both forms, so documents stored as fields before stay readable.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from datetime import UTC
from typing import Any

import bson
from bson import Binary
from bson.codec_options import CodecOptions

COMPACT_FORMAT = "bson-zlib/1"
_CODEC = CodecOptions(tz_aware=True, tzinfo=UTC)


def pack(contents: Mapping[str, Any]) -> Binary:
    """Fields as one compressed BSON blob (level 1: these documents are small; speed wins)."""
    return Binary(zlib.compress(bson.encode(contents), 1))


def unpack(blob: bytes) -> dict[str, Any]:
    return bson.decode(zlib.decompress(blob), codec_options=_CODEC)


def compact_document(doc: Mapping[str, Any], keep: Iterable[str] = ()) -> dict[str, Any]:
    """The stored form of ``doc``: ``_id`` and the ``keep`` fields as they are, the rest packed."""
    kept = {"_id", *keep}
    return {
        **{k: doc[k] for k in kept if k in doc},
        "format": COMPACT_FORMAT,
        "blob": pack({k: v for k, v in doc.items() if k not in kept}),
    }


def expand_document(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The document a compact one stands for (a document stored as fields is returned as is)."""
    fmt = stored.get("format")
    if fmt is None:
        return dict(stored)
    if fmt != COMPACT_FORMAT:
        raise ValueError(f"document {stored.get('_id')!r}: unknown format {fmt!r}")
    return {**unpack(stored["blob"]), **{k: v for k, v in stored.items() if k not in ("format", "blob")}}
