"""`sandgate check`: load routes exactly as `serve` would and report every finding."""

from __future__ import annotations

import sys

from gateway.config.loader import LoadOptions, load_routes


def run_check(routes_path: str, options: LoadOptions) -> int:
    config = load_routes(routes_path, options)
    for line in config.errors:
        print(line)
    for line in config.problems:
        print(line)
    for line in config.warnings:
        print(f"{line} (warning)")
    failed = bool(config.errors or config.problems)
    summary = (
        f"{routes_path}: {len(config.routes)} routes, {len(config.listeners)} listeners, "
        f"{len(config.errors) + len(config.problems)} errors, {len(config.warnings)} warnings"
    )
    print(summary, file=sys.stderr)
    return 1 if failed else 0
