"""`sandgate` command line (SPEC §1). Every flag also reads SANDGATE_<FLAG> from the environment."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

from gateway.config.durations import parse_lifetime
from gateway.config.loader import LoadOptions
from gateway.routing.paths import BadRequestTarget

DEFAULT_ADMIN = "127.0.0.1:9901"


def _env(flag: str, default=None):
    return os.environ.get("SANDGATE_" + flag.upper().replace("-", "_"), default)


def _env_list(flag: str) -> list[str]:
    value = _env(flag)
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routes", default=_env("routes", "routes.yaml"), help="routes file (default routes.yaml)")
    p.add_argument("--policies", default=_env("policies", "policies/"), help="policies directory (default policies/)")
    p.add_argument("--cluster-domain", default=_env("cluster-domain", "cluster.local"))
    p.add_argument(
        "--resolve",
        action="append",
        default=_env_list("resolve"),
        metavar="HOST:PORT=ADDR:PORT",
        help="dial ADDR:PORT instead of HOST:PORT (e.g. a Service's cluster DNS name); repeatable",
    )


def _load_options(args) -> LoadOptions:
    overrides: dict[str, tuple[str, int]] = {}
    for item in args.resolve:
        name, eq, address = item.partition("=")
        host, sep, port = address.rpartition(":")
        if not eq or not sep or not port.isdigit() or ":" not in name:
            raise SystemExit(f"sandgate: --resolve {item!r}: expected HOST:PORT=ADDR:PORT")
        overrides[name.lower()] = (host.strip("[]"), int(port))
    return LoadOptions(cluster_domain=args.cluster_domain, overrides=overrides)


def _audit_mode(text: str) -> str:
    # A type, not `choices`: argparse checks choices against the command line only, and the
    # default may come from SANDGATE_AUDIT_ALLOWED.
    if text not in ("rollup", "every"):
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose rollup or every)")
    return text


def _retention(text: str) -> timedelta | None:
    """--audit-retention: "30d", "12h"...; "0" (or "0s") keeps records forever."""
    try:
        seconds = 0.0 if text == "0" else parse_lifetime(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return timedelta(seconds=seconds) if seconds else None


_SIZE_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}


def _size(text: str) -> int:
    """--audit-spool-max: bytes, or with a unit: 512MiB, 1GiB, 64k."""
    number = text.rstrip("kKmMgGiIbB")
    unit = _SIZE_UNITS.get(text[len(number):].lower())
    if not number.isdigit() or unit is None or len(number) > 15:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (expected bytes, or e.g. 512MiB, 1GiB)")
    return int(number) * unit


def _add_store_flags(p: argparse.ArgumentParser, *, after_subcommand: bool = False) -> None:
    """--data-dir on `keys` / `db`, and again on each of their subcommands, so that
    `keys create --data-dir D` works as well as `keys --data-dir D create`. The copy on a
    subcommand has no default: argparse copies a subcommand's values over its parent's, and a
    default there would undo a value given before the subcommand."""
    # The database URL may carry a password: it is read from the environment only.
    default = argparse.SUPPRESS if after_subcommand else _env("data-dir", "/tmp/sandgate")
    p.add_argument("--data-dir", default=default, help="embedded store and audit spool (default /tmp/sandgate)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandgate", description="Edge gateway for AI-agent platforms.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    _add_config_flags(serve)
    serve.add_argument("--listen", action="append", default=_env_list("listen"), metavar="[LISTENER=]HOST:PORT",
                       help="bind this address instead of the Gateway listener's port; repeatable")
    serve.add_argument("--admin", default=_env("admin", DEFAULT_ADMIN), help="admin address, or 'off'")
    serve.add_argument("--workers", type=int, default=int(_env("workers", "1")))
    serve.add_argument("--public-url", default=_env("public-url"))
    serve.add_argument("--tls-dir", default=_env("tls-dir", "/etc/sandgate/tls"),
                       help="certificates as <dir>/<name>/tls.{crt,key}, or kv://VAULT: Key Vault certificate <name>")
    serve.add_argument("--watch-httproutes", action="store_true", default=_env("watch-httproutes") in ("1", "true"))
    serve.add_argument("--kubeconfig", default=_env("kubeconfig"),
                       help="kubeconfig for sandbox state and terminals (default: in-cluster, else $KUBECONFIG)")
    serve.add_argument("--allow-loopback-sandboxes", action="store_true",
                       default=_env("allow-loopback-sandboxes") in ("1", "true"), help=argparse.SUPPRESS)
    serve.add_argument("--drain-seconds", type=float, default=float(_env("drain-seconds", "30")))
    serve.add_argument("--max-body-bytes", type=int, default=int(_env("max-body-bytes", "0")) or None,
                       help="refuse larger request bodies with 413 (default: no limit)")
    serve.add_argument("--connection-limit", type=int, default=int(_env("connection-limit", "0")) or None,
                       help="open connections per listener port and process, unless a ClientTrafficPolicy sets "
                            "connection.connectionLimit.value (default: no limit)")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--audit-allowed", type=_audit_mode, metavar="{rollup,every}",
                       default=_env("audit-allowed", "rollup"),
                       help="rollup (default): a repeated identical decision within 60 s is stored once, then as one "
                            "record with its count; every: one record per request")
    serve.add_argument("--audit-retention", type=_retention, default=_env("audit-retention", "30d"),
                       help="delete audit records older than this (default 30d; 0 keeps them forever)")
    serve.add_argument("--audit-spool-max", type=_size, default=_env("audit-spool-max", "1GiB"),
                       help="the audit spool's cap while the store is down; beyond it records are dropped and "
                            "counted in sandgate_audit_dropped_total (default 1GiB)")
    _add_store_flags(serve)

    check = sub.add_parser("check", help="validate routes and policies")
    _add_config_flags(check)
    check.add_argument("--public-url", default=_env("public-url"),
                       help="the public origin serve will use (MCP routes need it, or explicit audiences)")

    routes = sub.add_parser("routes", help="print the compiled route table")
    _add_config_flags(routes)

    explain = sub.add_parser("explain", help="show where a request would go")
    _add_config_flags(explain)
    explain.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'")
    explain.add_argument("--token", default=None, help="a JWT to evaluate policies with")
    explain.add_argument("method")
    explain.add_argument("url")

    keys = sub.add_parser("keys", help="manage API keys (only their SHA-256 is stored)")
    _add_store_flags(keys)
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="mint a key; the secret is printed once")
    _add_store_flags(create, after_subcommand=True)
    create.add_argument("--owner", required=True)
    create.add_argument("--scope", action="append", default=[])
    create.add_argument("--expires", default=None, help="lifetime, e.g. 30d, 12h (default: never)")
    _add_store_flags(keys_sub.add_parser("list", help="list keys (never their secrets)"), after_subcommand=True)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    _add_store_flags(revoke, after_subcommand=True)
    revoke.add_argument("id")

    db = sub.add_parser("db", help="the store")
    _add_store_flags(db)
    db_sub = db.add_subparsers(dest="db_command", required=True)
    _add_store_flags(db_sub.add_parser("migrate", help="create or upgrade the store schema (idempotent)"),
                     after_subcommand=True)

    dev = sub.add_parser("dev", help="run the gateway on the shipped routes.yaml with local stand-in services")
    dev.add_argument("--routes", default="routes.yaml")
    dev.add_argument("--listen", default="127.0.0.1:8080")
    dev.add_argument("--admin", default=DEFAULT_ADMIN)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(build_parser().parse_args(argv))
    except BrokenPipeError:
        # `sandgate routes | head`: the reader left; say nothing more (and nothing at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(args) -> int:
    if args.command == "check":
        from gateway.commands.check import run_check

        return run_check(args.routes, args.policies, _load_options(args), args.public_url)
    if args.command == "routes":
        from gateway.commands.show import run_routes

        return run_routes(args.routes, _load_options(args))
    if args.command == "explain":
        from gateway.commands.show import run_explain

        try:
            return run_explain(
                args.routes, args.policies, _load_options(args), args.method, args.url, args.header, args.token
            )
        except BadRequestTarget as e:
            print(f"sandgate: {e}", file=sys.stderr)
            return 2
    if args.command in ("keys", "db"):
        from gateway.commands.store import run_store_command

        return run_store_command(args)
    if args.command == "dev":
        from gateway.commands.dev import run_dev

        return run_dev(args)
    from gateway.commands.serve import run_serve

    return run_serve(args, _load_options(args))


if __name__ == "__main__":
    raise SystemExit(main())
