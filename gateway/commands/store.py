"""`sandgate keys ...` and `sandgate db migrate`: the store from the command line.

The store is PostgreSQL when SANDGATE_DATABASE_URL is set, else the embedded one in --data-dir.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import datetime, timedelta, timezone

from gateway.auth.apikeys import hash_key, mint_key, read_pepper
from gateway.secrets import KEY_VAULT, MissingSecret
from gateway.server.app import vault_references
from gateway.config.durations import parse_lifetime
from gateway.store import open_store


def run_store_command(args) -> int:
    try:
        return asyncio.run(_run(args))
    except MissingSecret as e:
        print(f"sandgate: {e}", file=sys.stderr)
        return 1


async def _run(args) -> int:
    url = os.environ.get("SANDGATE_DATABASE_URL") or None
    password_file = os.environ.get("SANDGATE_DATABASE_PASSWORD_FILE") or None
    try:
        await KEY_VAULT.load(vault_references(None, password_file))
        try:
            store = await open_store(url, data_dir=args.data_dir, password_file=password_file)
        except MissingSecret:
            raise
        except Exception as e:  # noqa: BLE001 - one clear line
            print(f"sandgate: cannot open the store: {e}", file=sys.stderr)
            return 1
        try:
            await store.migrate()
            if args.command == "db":
                print("store schema is up to date")
                return 0
            return await _keys(store, args)
        finally:
            await store.close()
    finally:
        await KEY_VAULT.close()


async def _keys(store, args) -> int:
    if args.keys_command == "create":
        pepper = read_pepper()
        expires_at = None
        if args.expires:
            try:
                expires_at = datetime.now(timezone.utc) + timedelta(seconds=parse_lifetime(args.expires))
            except ValueError as e:
                print(f"sandgate: --expires: {e}", file=sys.stderr)
                return 2
        key_id, key = mint_key()
        await store.create_api_key(key_id, hash_key(pepper, key), args.owner, tuple(args.scope), expires_at)
        print(f"id:      {key_id}")
        print(f"owner:   {args.owner}")
        print(f"scopes:  {' '.join(args.scope) or '-'}")
        print(f"expires: {expires_at.isoformat() if expires_at else 'never'}")
        print(f"key:     {key}")
        print("The key is shown only now; Sandgate stores only its SHA-256.", file=sys.stderr)
        return 0
    if args.keys_command == "list":
        print(f"{'ID':<10} {'OWNER':<24} {'SCOPES':<30} {'EXPIRES':<26} STATUS")
        for k in await store.list_api_keys():
            status = "revoked" if k.revoked_at else "active"
            expires = k.expires_at.isoformat() if k.expires_at else "never"
            print(f"{k.id:<10} {k.owner:<24} {' '.join(k.scopes) or '-':<30} {expires:<26} {status}")
        return 0
    if await store.revoke_api_key(args.id):
        print(f"revoked {args.id}")
        return 0
    print(f"sandgate: no active key {args.id}", file=sys.stderr)
    return 1

