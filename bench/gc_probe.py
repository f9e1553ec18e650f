"""Runs `python -m gateway ARGS...` with the garbage collector's pauses recorded, for
many_websockets.py. On SIGUSR1 it writes what it saw since the previous SIGUSR1 (collections by
generation, the longest pause, the total paused) as JSON to $GC_PROBE_FILE and starts again.

It also raises its soft RLIMIT_NOFILE to the hard limit: a gateway relaying N WebSockets holds
2N sockets, which a default soft limit of 1024 would refuse long before 10,000."""

import gc
import json
import os
import resource
import runpy
import signal
import sys
import time

_started = (0.0, 0.0)


def _fresh() -> dict:
    """By generation: collections, the longest pause in wall time (what the relays wait) and in
    the thread's CPU time (what the collector did: on a busy machine the wall time also counts
    the time the process was not scheduled); how many pauses were longer than 10 ms; the total paused."""
    return {"collections": [0, 0, 0], "max_pause_ms": [0.0, 0.0, 0.0], "max_pause_cpu_ms": [0.0, 0.0, 0.0],
            "pauses_over_10ms": [0, 0, 0], "paused_ms": 0.0}


_seen = _fresh()


def _record(phase: str, info: dict) -> None:
    global _started
    if phase == "start":
        _started = (time.perf_counter(), time.thread_time())
        return
    pause_ms = (time.perf_counter() - _started[0]) * 1000
    cpu_ms = (time.thread_time() - _started[1]) * 1000
    generation = info["generation"]
    _seen["collections"][generation] += 1
    _seen["paused_ms"] += pause_ms
    _seen["max_pause_ms"][generation] = max(_seen["max_pause_ms"][generation], pause_ms)
    _seen["max_pause_cpu_ms"][generation] = max(_seen["max_pause_cpu_ms"][generation], cpu_ms)
    _seen["pauses_over_10ms"][generation] += pause_ms > 10


def _dump(signum, frame) -> None:
    global _seen
    seen, _seen = _seen, _fresh()
    seen |= {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}
    path = os.environ["GC_PROBE_FILE"]
    with open(path + ".tmp", "w") as f:
        json.dump(seen, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    gc.callbacks.append(_record)
    signal.signal(signal.SIGUSR1, _dump)
    sys.argv = ["gateway", *sys.argv[1:]]
    runpy.run_module("gateway", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
