"""Many long-lived WebSockets through one gateway: opens `--connections` sockets, then for
`--duration` seconds sends round trips on random ones, then holds them open until the gateway
closes them (its shutdown). Prints two JSON lines: after the round trips (open time, round trips,
p50/p99/max, errors, the gateway's RSS before and after opening, read from /proc/PID), and after
the last socket closed (how many closed with 1001, how long the closes took to arrive).

Between phases it sends SIGUSR1 to the gateway (bench/gc_probe.py writes the collector's pauses
since the previous one to its file), so that the opening and the round trips are told apart."""

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from aiohttp import ClientError, ClientSession, TCPConnector, WSMsgType

from loops import new_event_loop

PAYLOAD = "y" * 64
ECHO_TIMEOUT = 5.0
OPENING_AT_ONCE = 64  # handshakes in flight while opening


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def probe(pid: int, path: str) -> dict:
    """Asks gc_probe.py for the collections since last time, and waits for its answer."""
    Path(path).unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.01)
    return json.loads(Path(path).read_text())


async def open_all(session: ClientSession, url: str, count: int, errors: Counter) -> list:
    sockets: list = []
    gate = asyncio.Semaphore(OPENING_AT_ONCE)

    async def open_one() -> None:
        async with gate:
            try:
                sockets.append(await session.ws_connect(url, autoclose=False, autoping=False))
            except (ClientError, OSError):
                errors["connect"] += 1

    await asyncio.gather(*(open_one() for _ in range(count)))
    return sockets


async def round_trips(mine: list, end: float, latencies: list[float], errors: Counter) -> None:
    """One sender: a random socket of its own share at a time (a socket is never read twice at once)."""
    while mine and time.perf_counter() < end:
        ws = random.choice(mine)
        sent = time.perf_counter()
        try:
            await ws.send_str(PAYLOAD)
            msg = await ws.receive(timeout=ECHO_TIMEOUT)
        except (ClientError, ConnectionError):
            errors["write"] += 1
            mine.remove(ws)
            continue
        except TimeoutError:
            errors["timeout"] += 1
            mine.remove(ws)
            continue
        if msg.type is not WSMsgType.TEXT or msg.data != PAYLOAD:
            errors["read"] += 1
            mine.remove(ws)
            continue
        latencies.append(time.perf_counter() - sent)


async def until_closed(ws) -> int | None:
    msg = await ws.receive()
    if msg.type is WSMsgType.CLOSE:
        await ws.close()
        return msg.data
    return None


async def run(args) -> None:
    errors = Counter(dict.fromkeys(("connect", "write", "read", "timeout"), 0))
    connector = TCPConnector(limit=0, force_close=True)
    async with ClientSession(connector=connector) as session:
        rss_before = rss_kib(args.gateway_pid)
        probe(args.gateway_pid, args.probe_file)
        started = time.perf_counter()
        sockets = await open_all(session, args.url, args.connections, errors)
        open_seconds = time.perf_counter() - started
        await asyncio.sleep(1.0)  # what opening left behind settles
        opening_gc = probe(args.gateway_pid, args.probe_file)
        rss_after = rss_kib(args.gateway_pid)

        latencies: list[float] = []
        end = time.perf_counter() + args.duration
        shares = [sockets[i::args.senders] for i in range(args.senders)]
        await asyncio.gather(*(round_trips(list(share), end, latencies, errors) for share in shares))
        relay_gc = probe(args.gateway_pid, args.probe_file)
        rss_end = rss_kib(args.gateway_pid)
        ordered = sorted(latencies)

        def ms(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3) if ordered else 0.0

        print(json.dumps({
            "connections": len(sockets), "open_seconds": round(open_seconds, 2),
            "requests": len(ordered), "rps": round(len(ordered) / args.duration, 1),
            "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": ms(1.0), "errors": dict(errors),
            "rss_before_kib": rss_before, "rss_open_kib": rss_after, "rss_end_kib": rss_end,
            "gc_opening": opening_gc, "gc_relaying": relay_gc,
        }), flush=True)

        started = time.perf_counter()
        codes = Counter(await asyncio.gather(*(until_closed(ws) for ws in sockets)))
        print(json.dumps({"closed_going_away": codes.get(1001, 0), "closed_otherwise": sum(codes.values()) - codes.get(1001, 0),
                          "closes_arrived_seconds": round(time.perf_counter() - started, 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=8, help="round trips in flight at once")
    parser.add_argument("--gateway-pid", type=int, required=True)
    parser.add_argument("--probe-file", required=True)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(run(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
