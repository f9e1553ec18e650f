"""Many long-lived WebSockets through one gateway process: round-trip latency while 10,000
sockets are open, what the garbage collector costs, memory per socket and shutdown.

    python bench/many_websockets.py [--connections 10000] [--duration 10]
    python bench/run.py --many-websockets ...      # the same, after the other cases

It starts the echo origin (upstream.py, its collector off) on the load CPU, `sandgate serve` (one process, under
gc_probe.py, which records every collection's pause) on the proxy CPU, and ws_many_client.py on
the load CPU, which opens the sockets (64 handshakes at a time), sends round trips for
`--duration` seconds on random sockets (8 in flight), then waits for the gateway to close them.
This process then sends SIGTERM to the gateway and measures its shutdown: wall time, CPU time
(from wait4) and how many sockets got 1001.

Two series, each on a fresh gateway and origin: `sandgate` as shipped, and `sandgate, GC tuning off`
(SANDGATE_GC_TUNING=off: the collector's thresholds and freezing as before the tuning; the
relay itself is the same code). A gateway holds two sockets per relayed WebSocket, so the
count is capped below half the hard RLIMIT_NOFILE (printed when it is).

Reported per series: open time, round trips/s, p50/p99/max round trip, the longest collector
pause and the number of full collections while opening and while relaying, the gateway's RSS
per open socket (KiB: RSS after opening minus before, over the sockets) and shutdown CPU and
time. Target: p99 round trip <= 10 ms with the tuning on (PASS/FAIL does not change the exit
code, which is 1 only when a series could not be measured or had errors)."""

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cases import routes_yaml, start_sandgate, ws_url
from harness import BENCH_DIR, Bench, CaseError, Cpus, Processes, accepts, free_port, pinned, read_proc, run_main

RESULTS_FILE = BENCH_DIR / "results" / "many_websockets.json"
TARGET_P99_MS = 10.0
FD_RESERVE = 64  # the gateway's own files: listeners, logs, store, event loop
SERIES = (("sandgate", {}), ("sandgate, GC tuning off", {"SANDGATE_GC_TUNING": "off"}))


def cpu_seconds(pid: int) -> float:
    fields = read_proc(Path(f"/proc/{pid}/stat")).rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def capped(connections: int) -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return min(connections, (hard - FD_RESERVE) // 2) if hard != resource.RLIM_INFINITY else connections


def one_series(bench: Bench, name: str, env: dict[str, str], connections: int, duration: float) -> dict:
    slug = "many-ws-" + ("tuned" if not env else "untuned")
    # A fresh origin per series, so that the second does not meet one that already held 10,000
    # sockets; without its own collections, which would stall echoes as the gateway's did.
    echo_port = free_port()
    bench.procs.start_python(f"{slug}-origin", [str(BENCH_DIR / "upstream.py"), f"--port={echo_port}", "--gc-off"],
                             bench.cpus.load)
    bench.procs.wait_ready(f"{slug}-origin", lambda: accepts(echo_port))
    probe_file = str(bench.workdir / f"{slug}.gc.json")
    gateway = start_sandgate(bench, slug, routes_yaml(echo_port, echo_port, 0),
                             launcher=(str(BENCH_DIR / "gc_probe.py"),), env=env | {"GC_PROBE_FILE": probe_file})
    proc = bench.procs._running[slug]
    argv = [sys.executable, str(BENCH_DIR / "ws_many_client.py"), ws_url(gateway.url),
            f"--connections={connections}", f"--duration={duration}",
            f"--gateway-pid={proc.pid}", f"--probe-file={probe_file}"]
    client = subprocess.Popen(pinned(bench.cpus.load, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        line = client.stdout.readline()
        if not line.startswith("{"):
            raise CaseError(f"{name}: the client failed: {client.stderr.read()[-2000:]}")
        relayed = json.loads(line)
        cpu_before, stop_started = cpu_seconds(proc.pid), time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        _, status, usage = os.wait4(proc.pid, 0)
        stop_seconds = time.monotonic() - stop_started
        closed = json.loads(client.stdout.readline() or "{}")
        client.wait(30)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait()
        bench.procs.stop(slug, f"{slug}-origin")
    open_kib = relayed["rss_open_kib"] - relayed["rss_before_kib"]
    return relayed | closed | {
        "series": name,
        "kib_per_connection": round(open_kib / max(1, relayed["connections"]), 1),
        "shutdown_seconds": round(stop_seconds, 2),
        "shutdown_cpu_seconds": round(usage.ru_utime + usage.ru_stime - cpu_before, 2),
        "exit_status": os.waitstatus_to_exitcode(status),
    }


def measure_many(bench: Bench, connections: int, duration: float) -> dict:
    return {name: one_series(bench, name, env, connections, duration) for name, env in SERIES}


def print_many(data: dict) -> None:
    print(f"\nmany WebSockets through one gateway process")
    print(f"  {'':<26} {'sockets':>7} {'open s':>6} {'rt/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'max pause ms':>13} {'full gcs':>9} {'KiB/sock':>8} {'stop s':>6} {'stop cpu s':>10} {'1001s':>6}  errors")
    # max pause: wall / CPU, the collector's longest pause while relaying
    for name, s in data.items():
        opening, relaying = s["gc_opening"], s["gc_relaying"]
        pause = f"{max(relaying.get('max_pause_ms', [0.0])):.0f} / {max(relaying.get('max_pause_cpu_ms', [0.0])):.0f}"
        fulls = f"{opening.get('collections', [0, 0, 0])[2]}+{relaying.get('collections', [0, 0, 0])[2]}"
        errors = sum(s["errors"].values())
        print(f"  {name:<26} {s['connections']:>7} {s['open_seconds']:>6.1f} {s['rps']:>7.0f} {s['p50_ms']:>7.2f} "
              f"{s['p99_ms']:>7.2f} {s['max_ms']:>7.1f} {pause:>13} {fulls:>9} {s['kib_per_connection']:>8.1f} "
              f"{s['shutdown_seconds']:>6.2f} {s['shutdown_cpu_seconds']:>10.2f} {s['closed_going_away']:>6}  {errors}")
    print("  (max pause: the collector's longest pause while relaying, wall / CPU time; full gcs: while opening + "
          "while relaying; KiB/sock: the gateway's RSS growth while opening, per socket)")
    tuned = data[SERIES[0][0]]
    print("\ntargets")
    print(f"  {'PASS' if tuned['p99_ms'] <= TARGET_P99_MS else 'FAIL'}  many-websockets p99 round trip <= "
          f"{TARGET_P99_MS:.0f} ms  ({tuned['p99_ms']:.2f} ms with {tuned['connections']} sockets open)")


def bad(data: dict) -> list[str]:
    return [name for name, s in data.items()
            if sum(s["errors"].values()) or not s["requests"] or s["closed_going_away"] != s["connections"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10_000, help="WebSockets open at once (default 10000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of round trips (default 10)")
    args = parser.parse_args()
    connections = capped(args.connections)
    if connections < args.connections:
        print(f"{connections} sockets, not {args.connections}: the hard RLIMIT_NOFILE allows the gateway "
              f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]} files, two per relayed socket", flush=True)
    cpus = Cpus.pick()
    with tempfile.TemporaryDirectory(prefix="sandgate-bench-") as workdir, Processes(Path(workdir)) as procs:
        bench = Bench(procs, cpus, Path(workdir))
        try:
            data = measure_many(bench, connections, args.duration)
        except CaseError as e:
            print(f"many WebSockets not measured: {e}", file=sys.stderr)
            return 1
    print_many(data)
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(json.dumps({"command": sys.argv, "series": data}, indent=2) + "\n")
    print(f"\nwrote {RESULTS_FILE}")
    failed = bad(data)
    if failed:
        print(f"errors in: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
