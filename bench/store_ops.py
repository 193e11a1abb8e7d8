"""What the store costs per operation, as the services use it.

    python -m bench.store_ops [--documents 3000] [--ops 1000]

On a fresh database of its own (dropped at the end): ``insert_many``; point reads by ``_id``
(the first, middle and last document: equal costs mean the ``_id`` lookup is indexed);
concurrent point reads as ``shared.runtime.store.find_by_ids`` sends them; ``ReplaceOne`` in
commands of ``MAX_WRITES_PER_COMMAND`` (sequential, and 4 commands at once); and one
``{_id: {$in: [...]}}`` read, which FerretDB answers by scanning the collection. Prints
operations per second; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Sequence

from pymongo import AsyncMongoClient, ReplaceOne

from bench.pipeline import endpoints
from shared.runtime.store import MAX_WRITES_PER_COMMAND, find_by_ids


async def run(mongodb_url: str, documents: int, ops: int) -> list[tuple[str, float, str]]:
    client: AsyncMongoClient = AsyncMongoClient(mongodb_url, tz_aware=True)
    name = f"hometeam_storeops_{uuid.uuid4().hex[:8]}"
    docs = client[name]["docs"]
    rows: list[tuple[str, float, str]] = []
    try:
        batch = [{"_id": f"cus_{i:08d}", "v": 0, "pad": "x" * 400} for i in range(documents)]
        started = time.perf_counter()
        await docs.insert_many(batch)
        rows.append((f"insert_many of {documents:,} documents (~450 bytes)", documents / (time.perf_counter() - started), "docs/s"))
        await asyncio.sleep(1.5)  # the embedded FerretDB indexes a new collection within 0.5 s

        for label, index in (("first", 0), ("middle", documents // 2), ("last", documents - 1)):
            started = time.perf_counter()
            for _ in range(50):
                await docs.find_one({"_id": f"cus_{index:08d}"})
            rows.append((f"find_one by _id, one at a time ({label} document)", 50 / (time.perf_counter() - started), "reads/s"))

        ids = [f"cus_{i:08d}" for i in range(0, documents, max(1, documents // ops))][:ops]
        started = time.perf_counter()
        await find_by_ids(docs, ids)
        rows.append((f"find_by_ids ({len(ids):,} ids, concurrent point reads)", len(ids) / (time.perf_counter() - started), "reads/s"))

        for concurrent in (1, 4):
            replaces = [ReplaceOne({"_id": i}, {"v": concurrent, "pad": "y" * 400}, upsert=True) for i in ids]
            chunks = [replaces[n : n + MAX_WRITES_PER_COMMAND] for n in range(0, len(replaces), MAX_WRITES_PER_COMMAND)]
            started = time.perf_counter()
            for n in range(0, len(chunks), concurrent):
                await asyncio.gather(*(docs.bulk_write(c, ordered=False) for c in chunks[n : n + concurrent]))
            rows.append(
                (f"ReplaceOne, {MAX_WRITES_PER_COMMAND} per command, {concurrent} command(s) at once", len(ids) / (time.perf_counter() - started), "docs/s")
            )

        started = time.perf_counter()
        found = [d async for d in docs.find({"_id": {"$in": ids[:20]}})]
        assert len(found) == len(ids[:20])
        rows.append((f"find {{_id: {{$in: 20 ids}}}} over {documents:,} documents", 1 / (time.perf_counter() - started), "reads/s"))
    finally:
        await client.drop_database(name)
        await client.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.store_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--documents", type=int, default=3000)
    p.add_argument("--ops", type=int, default=1000)
    args = p.parse_args(argv)
    _, mongodb_url = endpoints()
    rows = asyncio.run(run(mongodb_url, args.documents, args.ops))
    print(f"store operations ({mongodb_url.split('@')[-1].split('/?')[0]})")
    for label, rate, unit in rows:
        print(f"  {label:<62}{rate:>12,.0f} {unit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
