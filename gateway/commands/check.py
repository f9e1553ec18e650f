"""`sandgate check`: load routes exactly as `serve` would and report every finding."""

from __future__ import annotations

import sys

from gateway.config.loader import LoadOptions, load_routes
from gateway.policy.audience import mcp_audience_errors, open_token_warnings
from gateway.policy.loader import load_policies
from gateway.preview.zonecheck import zone_warnings
from gateway.sandbox.router import router_errors


def run_check(routes_path: str, policies_path: str, options: LoadOptions, public_url: str | None = None) -> int:
    config = load_routes(routes_path, options)
    policies = load_policies(policies_path, config)
    errors = [*config.errors, *config.problems, *policies.errors, *policies.problems]
    if not config.errors:
        errors += router_errors(config, lambda *target: policies.security_for(*target) is not None)
        errors += mcp_audience_errors(config, policies, public_url)
    warnings = [*config.warnings, *policies.warnings, *open_token_warnings(config, policies)]
    if not config.errors:
        warnings += zone_warnings(config, policies, public_url)
    for line in errors:
        print(line)
    for line in warnings:
        print(f"{line} (warning)")
    failed = bool(errors)
    summary = (
        f"{routes_path}: {len(config.routes)} routes, {len(config.listeners)} listeners, "
        f"{len(policies.security)} security policies, {len(errors)} errors, {len(warnings)} warnings"
    )
    print(summary, file=sys.stderr)
    return 1 if failed else 0
