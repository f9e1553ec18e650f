"""WebSocket echo load: N connections, each sending a message and awaiting its echo back to
back for a fixed time. Prints one JSON line shaped like wrk_report.lua's: round trips per
second, latency p50/p99 and errors (connect, read, write, status = bad handshake or wrong
echo, timeout = no echo within 2 s). A connection that fails stops; the others go on."""

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import ClientError, ClientSession, WSMsgType, WSServerHandshakeError

from loops import new_event_loop

PAYLOAD = "x" * 200
ECHO_TIMEOUT = 2.0  # seconds, wrk's default --timeout


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(
        default_factory=lambda: Counter(dict.fromkeys(("connect", "read", "write", "status", "timeout"), 0)))


async def round_trips(session: ClientSession, url: str, end: float, tally: Tally) -> None:
    try:
        ws = await session.ws_connect(url)
    except WSServerHandshakeError:
        tally.errors["status"] += 1
        return
    except (ClientError, OSError):
        tally.errors["connect"] += 1
        return
    async with ws:
        while (sent := time.perf_counter()) < end:
            try:
                await ws.send_str(PAYLOAD)
            except (ClientError, ConnectionError):
                tally.errors["write"] += 1
                return
            try:
                msg = await ws.receive(timeout=ECHO_TIMEOUT)
            except TimeoutError:
                tally.errors["timeout"] += 1
                return
            if msg.type is not WSMsgType.TEXT:
                tally.errors["read"] += 1
                return
            if msg.data != PAYLOAD:
                tally.errors["status"] += 1
            else:
                tally.latencies.append(time.perf_counter() - sent)


async def load(url: str, connections: int, duration: float) -> Tally:
    tally = Tally()
    end = time.perf_counter() + duration
    async with ClientSession() as session:
        await asyncio.gather(*(round_trips(session, url, end, tally) for _ in range(connections)))
    return tally


def percentile_ms(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url", help="ws://HOST:PORT/PATH of an echo endpoint")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    args = parser.parse_args()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        tally = runner.run(load(args.url, args.connections, args.duration))
    ordered = sorted(tally.latencies)
    print(json.dumps({
        "requests": len(ordered),
        "rps": round(len(ordered) / args.duration, 1),
        "p50_ms": round(percentile_ms(ordered, 0.50), 3),
        "p99_ms": round(percentile_ms(ordered, 0.99), 3),
        "errors": dict(tally.errors),
    }))


if __name__ == "__main__":
    main()
