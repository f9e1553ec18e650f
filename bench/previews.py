"""Preview create-to-first-byte: the time from the create call to the first successful proxied
response through the new preview's host, against the Kubernetes API double.

    python bench/previews.py [--previews 100] [--warmup 5]
    python bench/run.py --preview-latency ...      # the same, after the wrk cases

It starts the origin (the sandbox's app: nginx, else upstream.py), the API double with the
sandbox `sandboxes/bench` whose pod is the origin (kube_double.py), and `sandgate serve` (replica
A) with a PreviewZone and a JWT SecurityPolicy on the preview API (inline JWKS, one RS256
token whose `sub` owns the sandbox). Then, one preview after the other:

    POST /gateway/v1/previews {"namespace","sandbox","port"} to A (201)
    GET / with the new preview's host as `Host` until it answers 200 with the origin's body

first through A ("one replica": A serves the preview it created from its table), then, with a
second replica B started, through B ("two replicas": B has either seen the HTTPRoute's watch
event already or reads the HTTPRoute once on its miss; the API double counts those reads, and
the report shows how many previews B served through one). The double sends watch events before
it answers the write, so B has always seen the event; the third series forces the miss: B is
replaced by a replica C whose watches lag by WATCH_LAG_MS (kube_double.py --watch-delay-ms),
so C finds no new host in its table and reads the HTTPRoute. `create` is the POST's round trip,
`first byte` from its answer to the 200, `total` the two together; each GET opens a new
connection, as a browser does for a new host. The first `--warmup` previews of each series are
not counted. Target: median `total` < 50 ms in every series (a miss prints FAIL but does not
change the exit code, which is 1 only when a preview was not served).

The client (this process) and the API double share the load CPU, the replicas the proxy CPU.
Results go to bench/results/previews.json (standalone) or into latest.json (run.py)."""

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from cases import ORIGIN_BODY, SANDGATE_CLUSTER_READY_TIMEOUT, Sandgate, origin, start_sandgate
from cluster import NAMESPACE, SANDBOX, KubeWorld, kube_api, kube_args, preview_policies_yaml, preview_routes_yaml
from harness import Bench, BearerToken, CaseError, Cpus, Processes, find_tool, http_get, run_main

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "previews.json"
TARGET_MS = 50.0
FIRST_BYTE_TIMEOUT = 10.0  # a preview not served by then counts as failed
RETRY_SECONDS = 0.001  # between GETs that did not answer 200 yet
PAUSE_SECONDS = 0.02  # between previews: each create starts on a quiet system
WATCH_LAG_MS = 500  # the third series: far longer than create-to-GET, so every first GET misses
BEARER = BearerToken()


class PreviewApi:
    """POST /gateway/v1/previews on one keep-alive connection, with BEARER's token."""

    def __init__(self, gateway: Sandgate, port: int):
        parts = urlsplit(gateway.url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        self.body = json.dumps({"namespace": NAMESPACE, "sandbox": SANDBOX, "port": port})
        self.headers = BEARER.headers | {"Content-Type": "application/json"}

    def create(self) -> str:
        """The new preview's host."""
        for attempt in (1, 2):
            try:
                self.conn.request("POST", "/gateway/v1/previews", body=self.body, headers=self.headers)
                response = self.conn.getresponse()
                body = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()  # the server closed an idle keep-alive connection: once more
                if attempt == 2:
                    raise
        if response.status != 201:
            raise CaseError(f"POST /gateway/v1/previews answered {response.status}: {body[:300]!r}")
        return urlsplit(json.loads(body)["url"]).hostname

    def close(self) -> None:
        self.conn.close()


def first_200(gateway: Sandgate, host: str) -> int:
    """GETs through `host` until one answers 200 with the origin's body; how many it took."""
    parts = urlsplit(gateway.url)
    deadline = time.perf_counter() + FIRST_BYTE_TIMEOUT
    attempts = 0
    while True:
        attempts += 1
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=FIRST_BYTE_TIMEOUT)
        try:
            conn.request("GET", "/", headers={"Host": host})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status == 200:
            if body != ORIGIN_BODY:
                raise CaseError("a preview host answered 200, but not with the origin's body")
            return attempts
        if time.perf_counter() > deadline:
            raise CaseError(f"a new preview still answered {response.status} after {FIRST_BYTE_TIMEOUT:.0f} s "
                            f"({attempts} GETs)")
        time.sleep(RETRY_SECONDS)


def lookups(world: KubeWorld) -> int:
    """How many single preview HTTPRoutes the API double has served so far (lookups on a miss)."""
    status, body = http_get(world.lookups_url, timeout=5)
    if status != 200:
        raise CaseError(f"the API double's lookup count answered {status}")
    return json.loads(body)["lookups"]


def series(api: PreviewApi, through: Sandgate, world: KubeWorld, count: int, warmup: int) -> dict:
    samples, looked_up = [], 0
    for i in range(warmup + count):
        time.sleep(PAUSE_SECONDS)
        before = lookups(world)
        start = time.perf_counter()
        host = api.create()
        created = time.perf_counter()
        attempts = first_200(through, host)
        served = time.perf_counter()
        if i >= warmup:
            samples.append(((created - start) * 1e3, (served - created) * 1e3, (served - start) * 1e3, attempts))
            looked_up += lookups(world) > before
    return summarise(samples) | {"served_after_a_lookup": looked_up}


def summarise(samples: list[tuple[float, float, float, int]]) -> dict:
    def stats(values: list[float]) -> dict:
        ordered = sorted(values)
        return {"median": round(statistics.median(ordered), 2),
                "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 2),
                "max": round(ordered[-1], 2)}

    create, first_byte, total, attempts = (list(column) for column in zip(*samples))
    median_total = statistics.median(total)
    return {
        "previews": len(samples),
        "create_ms": stats(create),
        "first_byte_ms": stats(first_byte),
        "total_ms": stats(total),
        "gets_per_preview": {"max": max(attempts), "previews_needing_more_than_one": sum(a > 1 for a in attempts)},
        "target_ms": TARGET_MS,
        "pass": median_total < TARGET_MS,
    }


def measure_latency(bench: Bench, count: int, warmup: int) -> dict:
    """Both series; the calling process runs on the load CPU meanwhile."""
    origin_port = urlsplit(origin(bench)).port
    world = kube_api(bench, previews=0, origin_port=origin_port, key="kube-api-latency", watch_delay_ms=WATCH_LAG_MS)

    def replica(name: str, lagging: bool = False) -> Sandgate:
        return start_sandgate(bench, name, preview_routes_yaml(), preview_policies_yaml(BEARER),
                              args=kube_args(world, lagging=lagging),
                              ready_timeout=SANDGATE_CLUSTER_READY_TIMEOUT)

    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {bench.cpus.load})
    try:
        a = replica("sandgate-replica-a")
        api = PreviewApi(a, origin_port)
        try:
            one = series(api, a, world, count, warmup)
            b = replica("sandgate-replica-b")
            two = series(api, b, world, count, warmup)
            bench.procs.stop("sandgate-replica-b")
            c = replica("sandgate-replica-c", lagging=True)
            lagging = series(api, c, world, count, warmup)
        finally:
            api.close()
    finally:
        os.sched_setaffinity(0, affinity)
    return {"one replica (create on A, GET through A)": one,
            "two replicas (create on A, GET through B)": two,
            f"two, watch {WATCH_LAG_MS} ms late (A, GET through C)": lagging}


def print_latency(data: dict) -> None:
    print("\npreview create-to-first-byte (ms; median / p90 / max)")
    print(f"  {'':<44} {'create':>20} {'first byte':>20} {'total':>20}  GETs>1  lookups")
    for name, s in data.items():
        cells = [f"{s[k]['median']:.1f} / {s[k]['p90']:.1f} / {s[k]['max']:.1f}"
                 for k in ("create_ms", "first_byte_ms", "total_ms")]
        print(f"  {name:<44} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20}  "
              f"{s['gets_per_preview']['previews_needing_more_than_one']:>6}  {s['served_after_a_lookup']:>7}")
    print("  (GETs>1: previews whose first GET was not a 200; lookups: previews for which a gateway "
          "read the HTTPRoute on a miss)")
    print("\ntargets")
    for name, s in data.items():
        print(f"  {'PASS' if s['pass'] else 'FAIL'}  {name}: median total < {s['target_ms']:.0f} ms  "
              f"({s['total_ms']['median']:.1f} ms over {s['previews']} previews)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--previews", type=int, default=100, help="previews measured per series (default 100)")
    parser.add_argument("--warmup", type=int, default=5, help="previews made first and not counted (default 5)")
    args = parser.parse_args()
    cpus = Cpus.pick()
    print(f"{args.previews} previews per series (+{args.warmup} not counted); client and API double on cpu "
          f"{cpus.load}, gateways on cpu {cpus.proxy}; origin: {'nginx' if find_tool('nginx') else 'upstream.py'}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="sandgate-bench-") as workdir, Processes(Path(workdir)) as procs:
        bench = Bench(procs, cpus, Path(workdir))
        try:
            data = measure_latency(bench, args.previews, args.warmup)
        except CaseError as e:
            print(f"preview latency not measured: {e}", file=sys.stderr)
            return 1
    print_latency(data)
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(json.dumps({"command": sys.argv, "previews": args.previews, "warmup": args.warmup,
                                        "series": data}, indent=2) + "\n")
    print(f"\nwrote {RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    run_main(main)
