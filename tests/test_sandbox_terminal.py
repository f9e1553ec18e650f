"""The sandbox terminal (SPEC §4.2): a browser-style WebSocket client, JSON frames, a real shell
in a pty behind the Kubernetes API double's pod exec."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest

from gateway.sandbox.terminal import TerminalSettings
from gateway.server.handler import Settings
from tests.support.harness import running_gateway, url
from tests.support.kubeapi import running_kube_api
from tests.support.policy_harness import wait_for
from tests.support.sandboxes import SANDBOX_API, SandboxWorld, router_yaml

TOKEN = "terminal-router-token"
PATH = "/gateway/v1/sandboxes/agents/box-1/terminal"


@pytest.fixture
async def terminal_gateway(tmp_path, aiohttp_server):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    async with running_kube_api(tmp_path) as api:
        world = SandboxWorld(api, aiohttp_server)
        await world.add("agents", "box-1", with_pod=True)
        async with running_gateway(
            tmp_path, router_yaml(token_file=str(token)), settings=Settings(allow_loopback_sandboxes=True),
            kubeconfig=api.kubeconfig, terminal=TerminalSettings(reconnect_window=3.0, idle_timeout=60.0),
        ) as gw:
            gw.world = world
            yield gw


def connect(session, gw, path=PATH, token=TOKEN):
    return session.ws_connect(url(gw, path), headers={"Authorization": f"Bearer {token}"})


async def read_until(ws, needle: str, timeout: float = 10.0) -> str:
    """Output frames joined until `needle` shows up; other frame types are returned too."""
    seen = ""
    async with asyncio.timeout(timeout):
        while needle not in seen:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            frame = json.loads(msg.data)
            if frame["type"] == "output":
                seen += frame["data"]
            else:
                seen += json.dumps(frame)
    return seen


async def run(ws, command: str, marker: str) -> str:
    await ws.send_str(json.dumps({"type": "input", "data": f"{command}; echo {marker}-$((40+2))\n"}))
    return await read_until(ws, f"{marker}-42")


async def test_shell_input_output_resize_ping_and_exit_code(terminal_gateway):
    gw = terminal_gateway
    async with aiohttp.ClientSession() as session:
        async with connect(session, gw) as ws:
            out = await run(ws, "echo hello-from-$((6*7))", "done")
            assert "hello-from-42" in out
            await ws.send_str(json.dumps({"type": "resize", "cols": 123, "rows": 45}))
            out = await run(ws, "stty size", "sized")
            assert "45 123" in out
            await ws.send_str(json.dumps({"type": "ping"}))
            assert '"pong"' in await read_until(ws, "pong")
            await ws.send_str("not json")
            assert "error" in await read_until(ws, '"error"')
            await ws.send_str(json.dumps({"type": "resize", "cols": -1, "rows": 10**9}))
            assert "error" in await read_until(ws, '"error"')
            for hostile in ({"type": "input", "data": 123}, {"type": ["input"]}, [1, 2], {"data": "ls\n"}):
                await ws.send_str(json.dumps(hostile))
                assert "error" in await read_until(ws, '"error"')
            # a lone surrogate (valid JSON, no UTF-8 form) reaches the shell as U+FFFD
            await ws.send_str('{"type": "input", "data": "echo lone-\\ud800-ok\\n"}')
            assert "lone-" in await read_until(ws, "-ok")
            await ws.send_bytes(b"\x00binary")
            assert "error" in await read_until(ws, '"error"')
            assert "alive" in await run(ws, "echo still-alive", "alive")
            await ws.send_str(json.dumps({"type": "input", "data": "exit 3\n"}))
            ending = await read_until(ws, '"exit"')
            assert json.loads(ending[ending.index("{"):])["code"] == 3
            closing = await ws.receive()
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_a_dropped_client_resumes_the_same_shell_within_the_window(terminal_gateway):
    gw = terminal_gateway
    async with aiohttp.ClientSession() as session:
        async with connect(session, gw) as ws:
            await run(ws, "SECRET_WORD=swordfish-$$", "set")
            out = await run(ws, "echo pid=$$", "pid")
            pid = re.search(r"pid=(\d+)", out).group(1)  # the output, not the echoed command line
            # printed while nobody is connected: replayed on resume
            await ws.send_str(json.dumps({"type": "input", "data": "sleep 0.3; echo while-away\n"}))
        await asyncio.sleep(0.8)
        async with connect(session, gw) as ws:
            out = await run(ws, "echo word=$SECRET_WORD", "resumed")
            assert f"word=swordfish-{pid}" in out
            assert "while-away" in out
    assert await stored(gw, "terminal.opened") and await stored(gw, "terminal.resumed")


async def test_after_the_window_a_new_shell_starts(terminal_gateway):
    gw = terminal_gateway
    async with aiohttp.ClientSession() as session:
        async with connect(session, gw) as ws:
            await run(ws, "GONE=yes", "set")
        assert await wait_for(lambda: _no_sessions(gw), timeout=8)
        async with connect(session, gw) as ws:
            out = await run(ws, "echo gone=[$GONE]", "fresh")
            assert "gone=[]" in out
    assert await stored(gw, "terminal.closed")


async def _no_sessions(gw) -> bool:
    return len(gw.gateway.sandboxes.terminals) == 0  # the shell of the dropped client ended


async def test_terminal_refuses_without_the_token_and_for_unknown_sandboxes(terminal_gateway):
    gw = terminal_gateway
    async with aiohttp.ClientSession() as session:
        for path, token, status in [
            (PATH, "wrong", 401),
            ("/gateway/v1/sandboxes/agents/ghost/terminal", TOKEN, 404),
            ("/gateway/v1/sandboxes/other/box-1/terminal", TOKEN, 400),
        ]:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with connect(session, gw, path, token):
                    pass
            assert refused.value.status == status
        async with session.get(url(gw, PATH), headers={"Authorization": f"Bearer {TOKEN}"}) as plain:
            assert plain.status == 400


async def test_deleting_the_sandbox_ends_its_terminal(terminal_gateway):
    gw = terminal_gateway
    async with aiohttp.ClientSession() as session:
        async with connect(session, gw) as ws:
            await run(ws, "true", "ready")
            gw.world.api.delete(SANDBOX_API, "Sandbox", "agents", "box-1")
            out = await read_until(ws, '"error"')
            assert "deleted" in out
            closing = await asyncio.wait_for(ws.receive(), 5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == 1001


async def stored(gw, kind: str) -> bool:
    """The audit store holds an event of this kind (writes are batched: poll briefly)."""
    async def present():
        return await gw.store.count_audit(kind=kind) > 0

    return await wait_for(present, timeout=5)
