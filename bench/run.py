"""Sandgate's benchmark: starts every process it needs on loopback, measures each case in
interleaved rounds, prints a table and writes bench/results/latest.json.

    python bench/run.py [--quick] [--duration 10] [--rounds 3] [--cases NAME ...] [--preview-latency]
                        [--many-websockets]

Exits 1 when a case could not be measured or any request failed; a missed target only
prints FAIL."""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cpustat
import loops
import many_websockets
import previews
from cases import CASES, RATIOS, SHOWN, Case, Ratio
from harness import (WARMUP_SECONDS, Bench, CaseError, Cpus, Measurement, Processes, Skip, Target, find_tool, measure,
                     measure_together, run_main)

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "latest.json"
IDLE_BUSY_LIMIT = 0.05
HEAD_TO_HEAD_SECONDS = 3
MEDIANS = ("rps", "p50_ms", "p99_ms", "load_cpu", "proxy_cpu", "other_cpu", "proxy_us_per_request")


@dataclass
class Result:
    case: Case
    status: str = "ok"  # ok | skipped | failed
    note: str = ""
    target: Target = Target("")
    rounds: list[Measurement] = field(default_factory=list)

    def fail(self, note: str) -> None:
        self.status, self.note = "failed", note

    def summary(self) -> dict | None:
        """Medians over the rounds; requests and errors are totals."""
        if not self.rounds:
            return None
        medians = {name: statistics.median(getattr(m, name) for m in self.rounds) for name in MEDIANS}
        return medians | {
            "requests": sum(m.requests for m in self.rounds),
            "errors": {kind: sum(m.errors[kind] for m in self.rounds) for kind in self.rounds[0].errors},
        }

    @property
    def bad(self) -> bool:
        return self.status == "failed" or any(m.error_count or not m.requests for m in self.rounds)


def epilog() -> str:
    lines = ["cases:"] + [f"  {case.name:<22} {case.about}" for case in CASES]
    lines += ["", "targets (judged head to head when measured so, else on the ratio of medians):"]
    lines += [f"  {ratio.name} >= {ratio.target}" for ratio in RATIOS if ratio.target is not None]
    lines += ["", f"--preview-latency: median preview create-to-first-byte < {previews.TARGET_MS:.0f} ms, "
                  "one replica and two (bench/previews.py)"]
    lines += [f"--many-websockets: p99 round trip <= {many_websockets.TARGET_P99_MS:.0f} ms with 10,000 WebSockets "
              "open through one gateway process (bench/many_websockets.py)"]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of 3 s")
    parser.add_argument("--duration", type=int, help="seconds measured per case and round (default 10)")
    parser.add_argument("--rounds", type=int, help="rounds; the report shows medians (default 3)")
    parser.add_argument("--cases", nargs="+", metavar="NAME", choices=[case.name for case in CASES],
                        help="cases to run (default all; listed below)")
    parser.add_argument("--head-to-head", type=int, metavar="N",
                        help=f"after the rounds, N slices of {HEAD_TO_HEAD_SECONDS} s with both cases of each target "
                             "loaded at once (default 10, --quick 3, 0: none)")
    parser.add_argument("--preview-latency", action="store_true",
                        help="after the cases, measure preview create-to-first-byte (bench/previews.py)")
    parser.add_argument("--previews", type=int, default=100, metavar="N",
                        help="previews per series for --preview-latency (default 100)")
    parser.add_argument("--many-websockets", action="store_true",
                        help="after the cases, 10,000 WebSockets through one gateway (bench/many_websockets.py)")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (3 if args.quick else 10)
    if args.head_to_head is None:
        args.head_to_head = 3 if args.quick else 10
    return args


def ensure_tools() -> None:
    """wrk is required, nginx optional (its cases are skipped); both are Debian packages."""
    if find_tool("wrk") and find_tool("nginx"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk and nginx-light ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk", "nginx-light"], check=False)
    if not find_tool("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")


def busy_before_start(cpus: Cpus) -> dict[int, float]:
    """What else keeps the benchmark's CPUs busy: anything but ~0 makes every figure noisy."""
    before = cpustat.read()
    time.sleep(1)
    busy = {cpu: share for cpu, share in cpustat.busy_since(before).items() if cpu in (cpus.load, cpus.proxy)}
    if max(busy.values()) > IDLE_BUSY_LIMIT:
        print("warning: the machine is not idle before the run (" +
              ", ".join(f"cpu {cpu} {share:.0%} busy" for cpu, share in busy.items()) + "); figures will be noisy",
              flush=True)
    return busy


def set_up(case: Case, bench: Bench) -> Result:
    result = Result(case)
    try:
        result.target = Target.of(case.setup(bench))
        case.load.check(result.target)
    except Skip as e:
        result.status, result.note = "skipped", str(e)
    except CaseError as e:
        result.fail(str(e))
    return result


def run_rounds(results: list[Result], rounds: int, duration: int, bench: Bench) -> None:
    """Every case once per round, each round starting one case later, so that drift in the
    machine spreads over all cases instead of favouring the first."""
    ready = [result for result in results if result.status == "ok"]
    for i in range(rounds if ready else 0):
        shift = i % len(ready)
        for result in ready[shift:] + ready[:shift]:
            if result.status != "ok":
                continue
            try:
                m = measure(bench, result.case.load, result.target, duration)
            except CaseError as e:
                result.fail(str(e))
                continue
            result.rounds.append(m)
            print(f"  round {i + 1}/{rounds}  {result.case.name:<20} {m.rps:>10.1f}/s  p99 {m.p99_ms:.2f} ms  "
                  f"proxy cpu {m.proxy_cpu:.0%} (other {m.other_cpu:.0%})  errors {m.error_count}", flush=True)


def run_head_to_head(results: list[Result], slices: int, bench: Bench) -> dict[str, list[float]]:
    """For each target whose two cases were measured: `slices` times, both cases loaded at
    once. Both proxies then share the proxy CPU, so a change in the machine's speed (seen here:
    ±15% within tens of seconds, which separate runs take for differences between cases) hits
    both alike, and the ratio of their requests/s is the inverse ratio of their CPU per request.
    The ratios of each slice, by ratio name."""
    measured = {result.case.name: result for result in results if result.status == "ok" and result.rounds}
    found: dict[str, list[float]] = {}
    for ratio in RATIOS:
        if (ratio.target is None and not ratio.head_to_head) or ratio.metric != "rps" or slices <= 0:
            continue
        a, b = measured.get(ratio.numerator), measured.get(ratio.denominator)
        if a is None or b is None or a.target.url == b.target.url:  # one process can't share with itself
            continue
        ratios = found[ratio.name] = []
        for i in range(slices):
            try:
                ra, rb = measure_together(bench, (a.case.load, a.target), (b.case.load, b.target), HEAD_TO_HEAD_SECONDS)
            except CaseError as e:
                print(f"  head to head {ratio.name}: {e}", flush=True)
                break
            errors = sum(ra["errors"].values()) + sum(rb["errors"].values())
            if errors or not ra["requests"] or not rb["requests"]:
                print(f"  head to head {ratio.name}: {errors} errors, slice not counted", flush=True)
                continue
            ratios.append(ra["rps"] / rb["rps"])
            print(f"  head to head {i + 1}/{slices}  {ratio.numerator} {ra['rps']:.1f}/s  {ratio.denominator} "
                  f"{rb['rps']:.1f}/s  {ratios[-1]:.3f}", flush=True)
    return found


def ratio_value(ratio: Ratio, summaries: dict[str, dict | None]) -> float | None:
    numerator, denominator = summaries.get(ratio.numerator), summaries.get(ratio.denominator)
    if not numerator or not denominator or not numerator[ratio.metric] or not denominator[ratio.metric]:
        return None
    return numerator[ratio.metric] / denominator[ratio.metric]


def report(results: list[Result], args: argparse.Namespace, cpus: Cpus, idle_busy: dict[int, float],
           event_loops: dict[str, str], access_log_lines: dict[str, int], started: datetime,
           head_to_head: dict[str, list[float]], preview_latency: dict | None, many: dict | None = None) -> dict:
    summaries = {result.case.name: result.summary() for result in results}
    ratios = {}
    for ratio in RATIOS:
        value = ratio_value(ratio, summaries)
        slices = head_to_head.get(ratio.name) or []
        together = statistics.median(slices) if slices else None
        judged = together if together is not None else value
        ratios[ratio.name] = {
            "value": value,
            "head_to_head": together,
            "head_to_head_slices": slices,
            "target": ratio.target,
            "pass": None if ratio.target is None or judged is None else judged >= ratio.target,
        }
    return {
        "started": started.isoformat(timespec="seconds"),
        "command": sys.argv,
        "settings": {"rounds": args.rounds, "duration_s": args.duration, "warmup_s": WARMUP_SECONDS,
                     "head_to_head_slices": args.head_to_head, "head_to_head_s": HEAD_TO_HEAD_SECONDS,
                     "cpus": asdict(cpus)},
        "cpu_busy_before_start": idle_busy,
        "event_loops": event_loops,
        "access_log_lines": access_log_lines,
        "cases": {
            result.case.name: {
                "status": result.status, "note": result.note, "url": result.target.url,
                "headers": [name for name, _ in result.target.headers],
                "load": {"kind": type(result.case.load).__name__, **asdict(result.case.load)},
                "median": summaries[result.case.name],
                "rounds": [asdict(m) for m in result.rounds],
            }
            for result in results
        },
        "ratios": ratios,
        "shown": {f"{name} {metric}": (summaries.get(name) or {}).get(metric) for name, metric in SHOWN},
        "preview_latency": preview_latency,
        "many_websockets": many,
    }


def first_line(text: str) -> str:
    return text.partition("\n")[0]


def print_table(data: dict) -> None:
    print(f"\n{'case':<20} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'load cpu':>9} {'proxy cpu':>9} "
          f"{'other cpu':>9} {'proxy µs/req':>12}  errors")
    for name, case in data["cases"].items():
        m = case["median"]
        if m is None:
            print(f"{name:<20} {case['status'].upper():>10}  {first_line(case['note'])}")
            continue
        detail = ", ".join(f"{kind} {n}" for kind, n in m["errors"].items() if n)
        errors = f"{sum(m['errors'].values())}" + (f" ({detail})" if detail else "")
        note = f"  {case['status'].upper()}: {first_line(case['note'])}" if case["status"] != "ok" else ""
        print(f"{name:<20} {m['rps']:>10.1f} {m['p50_ms']:>8.2f} {m['p99_ms']:>8.2f} {m['load_cpu']:>9.0%} "
              f"{m['proxy_cpu']:>9.0%} {m['other_cpu']:>9.0%} {m['proxy_us_per_request']:>12.1f}  {errors}{note}")

    print("\nratios of medians")
    for name, ratio in data["ratios"].items():
        if ratio["value"] is not None:
            print(f"  {name:<64} {ratio['value']:>5.2f}")

    print("\ntargets")
    for name, ratio in data["ratios"].items():
        if ratio["target"] is not None:
            verdict = {True: "PASS", False: "FAIL", None: "n/a "}[ratio["pass"]]
            value = "not measured" if ratio["value"] is None else f"medians {ratio['value']:.2f}"
            if ratio["head_to_head"] is not None:
                slices = ratio["head_to_head_slices"]
                value = (f"head to head {ratio['head_to_head']:.3f}, slices {min(slices):.2f}-{max(slices):.2f}; "
                         + value)
            print(f"  {verdict}  {name} >= {ratio['target']}  ({value})")

    informative = {name: ratio for name, ratio in data["ratios"].items()
                   if ratio["target"] is None and ratio["head_to_head"] is not None}
    if data["shown"] or informative:
        print("\nfor information")
        for name, ratio in informative.items():
            slices = ratio["head_to_head_slices"]
            print(f"  {name + ' head to head':<64} {ratio['head_to_head']:>5.3f}  (slices {min(slices):.2f}-{max(slices):.2f})")
        for name, value in data["shown"].items():
            print(f"  {name:<64} " + ("not measured" if value is None else f"{value:>5.2f}"))

    if data["preview_latency"]:
        previews.print_latency(data["preview_latency"])
    if data["many_websockets"]:
        many_websockets.print_many(data["many_websockets"])


def main() -> int:
    args = parse_args()
    ensure_tools()
    cases = [case for case in CASES if not args.cases or case.name in args.cases]
    cpus = Cpus.pick()
    started = datetime.now(timezone.utc)
    print(f"{len(cases)} cases, {args.rounds} round(s) of {args.duration} s (+{WARMUP_SECONDS} s warm-up); "
          f"load and upstreams on cpu {cpus.load}, proxy under test on cpu {cpus.proxy}", flush=True)

    idle_busy = busy_before_start(cpus)
    with tempfile.TemporaryDirectory(prefix="sandgate-bench-") as workdir, Processes(Path(workdir)) as procs:
        bench = Bench(procs, cpus, Path(workdir))
        results = [set_up(case, bench) for case in cases]
        for result in results:
            if result.status != "ok":
                print(f"  {result.case.name}: {result.status}: {result.note}", flush=True)
        event_loops = procs.event_loops() | {"ws_client.py": loops.NAME}
        print("event loops: " + ", ".join(f"{name} {loop}" for name, loop in event_loops.items()), flush=True)
        run_rounds(results, args.rounds, args.duration, bench)
        head_to_head = run_head_to_head(results, args.head_to_head, bench)
        access_log_lines = procs.stdout_lines()
        preview_latency, latency_failed = None, False
        if args.preview_latency:
            print(f"preview create-to-first-byte: {args.previews} previews per series ...", flush=True)
            try:
                preview_latency = previews.measure_latency(bench, args.previews, warmup=5)
            except CaseError as e:
                print(f"  preview latency not measured: {e}", file=sys.stderr, flush=True)
                latency_failed = True
        many, many_failed = None, False
        if args.many_websockets:
            connections = many_websockets.capped(10_000)
            print(f"many WebSockets: {connections} through one gateway process ...", flush=True)
            try:
                many = many_websockets.measure_many(bench, connections, duration=10.0)
            except CaseError as e:
                print(f"  many WebSockets not measured: {e}", file=sys.stderr, flush=True)
                many_failed = True

    data = report(results, args, cpus, idle_busy, event_loops, access_log_lines, started, head_to_head,
                  preview_latency, many)
    print_table(data)
    for name, lines in access_log_lines.items():
        print(f"{name} wrote {lines} access log lines")
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nwrote {RESULTS_FILE}")

    bad = [result.case.name for result in results if result.bad] + (["--preview-latency"] if latency_failed else [])
    bad += ["--many-websockets"] if many_failed or (many and many_websockets.bad(many)) else []
    if bad:
        print(f"errors in: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    run_main(main)
