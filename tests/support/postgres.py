"""Real PostgreSQL for tests: a fresh database on the shared server, or a throwaway cluster.

The shared server (SANDGATE_TEST_POSTGRES_URL, default 127.0.0.1:5432 with trust auth) gives
each test its own database. A throwaway cluster is one the test may stop and start again: it
lives in a temporary directory, listens on a free loopback port and is always removed.

Without PostgreSQL a test is skipped on a workstation, but fails when `CI` is set: a CI run
that silently skipped its database tests would report a pass it never earned.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from contextlib import asynccontextmanager, contextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.support.harness import free_port

ADMIN_URL = os.environ.get("SANDGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def unavailable(reason: str) -> None:
    """Skip the test, or fail it when running in CI (`CI` set and not empty)."""
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


@asynccontextmanager
async def fresh_database(admin_url: str = ADMIN_URL):
    """A new, empty database for one test; yields its URL and drops it afterwards."""
    try:
        admin = await asyncpg.connect(admin_url, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as e:
        unavailable(f"no PostgreSQL at {urlsplit(admin_url).netloc}: {e}")
    name = f"sandgate_test_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield with_database(admin_url, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def _bin_dir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


class Cluster:
    """A PostgreSQL cluster of its own. Run as the `postgres` user when we are root, because
    initdb and postgres refuse to run as root."""

    def __init__(self, bin_dir: str, root: str, host_auth: str = "trust"):
        self.root = root
        self.host_auth = host_auth  # how TCP clients authenticate; the unix socket always trusts
        self.data = os.path.join(root, "data")
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._bin = bin_dir
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _pg_ctl(self, *args: str) -> list[str]:
        return [*self._as_user, os.path.join(self._bin, "pg_ctl"), "-D", self.data, "-w", "-t", "30", *args]

    def _start_args(self) -> list[str]:
        options = f"-c port={self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} -c fsync=off"
        return self._pg_ctl("-l", os.path.join(self.root, "postgres.log"), "-o", options, "start")

    def init(self) -> None:
        subprocess.run(
            [*self._as_user, os.path.join(self._bin, "initdb"), "-D", self.data, "-U", "postgres",
             "--auth-local=trust", f"--auth-host={self.host_auth}", "--no-sync", "-E", "UTF8"],
            check=True, capture_output=True,
        )
        subprocess.run(self._start_args(), check=True, capture_output=True)

    async def start(self) -> None:
        await _run(self._start_args())

    async def stop(self) -> None:
        """Fast shutdown: open sessions are cut off, as in a database failover or restart."""
        await _run(self._pg_ctl("-m", "fast", "stop"))

    def destroy(self) -> None:
        subprocess.run(self._pg_ctl("-m", "immediate", "stop"), capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


async def _run(args: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: {out.decode(errors='replace')}")


@contextmanager
def throwaway_cluster(host_auth: str = "trust"):
    """A running Cluster, stopped and removed afterwards whatever happens. `host_auth`: the
    pg_hba method for TCP clients (e.g. scram-sha-256); Cluster.root is the unix socket's
    directory, which trusts."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found")
    root = tempfile.mkdtemp(prefix="sandgate-pg-")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    cluster = Cluster(bin_dir, root, host_auth)
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.destroy()
