"""The emulator's own capacity: charges per second it answers with no added latency.

A featherweight asyncio HTTP/1.1 client (keep-alive, prebuilt requests) so that the client's
CPU takes as little as possible from the emulator on a small machine.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

import requests


async def _worker(host: str, port: int, token: str, customer_uid: str, uids: list[str]) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    ok = 0
    try:
        for uid in uids:
            body = json.dumps(
                {"customer_uid": customer_uid, "merchant_uid": uid, "amount": 1000, "name": "cap"}
            ).encode()
            head = (
                f"POST /subscribe/payments/again HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            writer.write(head + body)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            ok += status_line.split(b" ", 2)[1] == b"200"
    finally:
        writer.close()
    return ok


async def _hammer(url: str, token: str, customer_uid: str, total: int, concurrency: int) -> int:
    parts = urlsplit(url)
    stamp = time.time_ns()
    uids = [f"cap-{stamp}-{i}" for i in range(total)]
    shares = [uids[i::concurrency] for i in range(concurrency)]
    results = await asyncio.gather(
        *(
            _worker(parts.hostname or "127.0.0.1", parts.port or 80, token, customer_uid, s)
            for s in shares
        )
    )
    return sum(results)


def measure_capacity(
    url: str, imp_key: str, imp_secret: str, customer_uid: str, *, total: int, concurrency: int
) -> dict[str, Any]:
    """Send ``total`` charges over ``concurrency`` connections (set the latency to 0 first)."""
    token = requests.post(
        f"{url}/users/getToken", json={"imp_key": imp_key, "imp_secret": imp_secret}, timeout=30
    ).json()["response"]["access_token"]
    started = time.perf_counter()
    ok = asyncio.run(_hammer(url, token, customer_uid, total, concurrency))
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": total,
        "ok": ok,
        "wall_s": round(wall, 3),
        "requests_per_s": round(total / wall, 1),
    }
