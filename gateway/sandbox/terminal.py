"""The sandbox terminal (SPEC §4.2): a browser WebSocket speaking JSON frames on one side, a
Kubernetes pod exec (channel-prefixed binary frames) with a tty on the other.

A shell outlives its client's connection for a reconnect window: a client that comes back
(the same caller, the same sandbox) resumes the same shell, and what the shell printed in
between is replayed. The shell ends when it exits, when it is idle too long, when the window
passes without a reconnect, or when its sandbox is deleted.

A caller is a principal key, (issuer, subject): the same `sub` from another issuer is someone
else. Shells (attached or kept for a reconnect) are capped per caller and in total, and each
keeps at most BACKLOG_BYTES of output for its replay: a client opening shells and walking away
cannot grow the gateway.
"""

from __future__ import annotations

import asyncio
from collections import deque
import codecs
import json
import logging
from dataclasses import dataclass
from typing import Callable

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from gateway.kube import KubeClient, KubeError

log = logging.getLogger("sandgate.terminal")

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
SHELL = ["/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash; else exec sh; fi"]
MAX_CLIENT_FRAME = 1 << 20
BACKLOG_BYTES = 256 * 1024  # output kept for a resuming client, UTF-8 bytes


@dataclass(frozen=True)
class TerminalSettings:
    reconnect_window: float = 30.0
    idle_timeout: float = 1800.0
    max_per_caller: int = 8  # shells of one caller, attached or kept for a reconnect
    max_total: int = 256  # shells of all callers


class TooManyTerminals(Exception):
    """A new shell would exceed a cap (the caller answers 429)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class TerminalSession:
    def __init__(self, key: tuple, exec_socket, manager, on_end: Callable[["TerminalSession", str, int | None], None]):
        self.key = key  # (caller identity, namespace, sandbox)
        self.exec = exec_socket
        self._manager = manager  # closes the exec connection
        self._on_end = on_end
        self.client: web.WebSocketResponse | None = None
        self.exit_code: int | None = None
        self.ended = asyncio.Event()
        self._backlog: deque[tuple[str, int]] = deque()  # output while detached, with its UTF-8 size
        self._backlog_size = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._detached_at: float | None = None
        self._stop_reason: str | None = None  # set when the gateway ends the shell
        self._last_activity = asyncio.get_running_loop().time()
        self._reader = asyncio.get_running_loop().create_task(self._read_exec())

    @property
    def detached(self) -> bool:
        return self.client is None and not self.ended.is_set()

    async def attach(self, client: web.WebSocketResponse) -> None:
        self.client = client
        self._detached_at = None
        backlog, self._backlog, self._backlog_size = self._backlog, deque(), 0
        for text, _ in backlog:
            await client.send_str(json.dumps({"type": "output", "data": text}))

    def detach(self) -> None:
        self.client = None
        self._detached_at = asyncio.get_running_loop().time()

    async def serve_client(self, client: web.WebSocketResponse, settings: TerminalSettings) -> None:
        """Pump the client's frames into the shell until either side goes away."""
        await self.attach(client)
        try:
            async for msg in client:
                if msg.type is not WSMsgType.TEXT:
                    await self._client_error("Frames are JSON text.")
                    continue
                self._last_activity = asyncio.get_running_loop().time()
                await self._from_client(msg.data)
        finally:
            if self.client is client:
                self.detach()

    async def _from_client(self, text: str) -> None:
        try:
            frame = json.loads(text)
            kind = frame["type"]
        except (ValueError, TypeError, KeyError):
            await self._client_error("A frame is a JSON object with a type.")
            return
        if kind == "input" and isinstance(frame.get("data"), str):
            # "replace": JSON may escape lone surrogates, which have no UTF-8 form
            await self.exec.send_bytes(bytes([STDIN]) + frame["data"].encode("utf-8", "replace"))
        elif kind == "resize" and _dimension(frame.get("cols")) and _dimension(frame.get("rows")):
            size = json.dumps({"Width": frame["cols"], "Height": frame["rows"]})
            await self.exec.send_bytes(bytes([RESIZE]) + size.encode())
        elif kind == "ping":
            await self.client.send_str('{"type":"pong"}')
        else:
            await self._client_error(f"Unknown or malformed frame of type {str(kind)[:40]!r}.")

    async def _client_error(self, message: str) -> None:
        if self.client is not None:
            await self.client.send_str(json.dumps({"type": "error", "message": message}))

    async def _read_exec(self) -> None:
        reason = "exited"
        try:
            async for msg in self.exec:
                if msg.type is not WSMsgType.BINARY or not msg.data:
                    continue
                channel, payload = msg.data[0], msg.data[1:]
                if channel in (STDOUT, STDERR):
                    self._last_activity = asyncio.get_running_loop().time()
                    await self._output(self._decoder.decode(payload))
                elif channel == ERROR:
                    self.exit_code = _exit_code(payload)
        except (aiohttp.ClientError, ConnectionError) as e:
            reason = f"exec stream lost: {e}"
        finally:
            await self._end(self._stop_reason or reason)

    async def _output(self, text: str) -> None:
        if not text:
            return
        if self.client is not None:
            try:
                await self.client.send_str(json.dumps({"type": "output", "data": text}))
                return
            except ConnectionError:
                self.detach()
        data = text.encode("utf-8", "replace")
        if len(data) > BACKLOG_BYTES:  # one chunk larger than the whole backlog: its tail
            data = data[-BACKLOG_BYTES:]
            text = data.decode("utf-8", "ignore")  # a cut character at the start is dropped
            self._backlog.clear()
            self._backlog_size = 0
        self._backlog.append((text, len(data)))
        self._backlog_size += len(data)
        while self._backlog_size > BACKLOG_BYTES:
            self._backlog_size -= self._backlog.popleft()[1]

    async def _end(self, reason: str) -> None:
        if self.ended.is_set():
            return
        self.ended.set()
        client = self.client
        if client is not None and not client.closed:
            if self.exit_code is not None:
                await client.send_str(json.dumps({"type": "exit", "code": self.exit_code}))
                await client.close(code=WSCloseCode.OK, message=b"shell exited")
            else:
                await client.send_str(json.dumps({"type": "error", "message": f"The shell ended: {reason}."}))
                await client.close(code=WSCloseCode.GOING_AWAY, message=reason.encode()[:123])
        await asyncio.gather(self.exec.close(), return_exceptions=True)
        await asyncio.gather(self._manager.__aexit__(None, None, None), return_exceptions=True)
        self._on_end(self, reason, self.exit_code)

    async def terminate(self, reason: str) -> None:
        """End the shell from the gateway's side (idle, window passed, sandbox deleted)."""
        if self.ended.is_set():
            return
        self._stop_reason = reason
        self._reader.cancel()  # its cleanup ends the session with this reason
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._end(reason)  # when the reader was cancelled before it ever ran

    def expired(self, now: float, settings: TerminalSettings) -> str | None:
        if self._detached_at is not None and now - self._detached_at > settings.reconnect_window:
            return "no reconnect within the window"
        if now - self._last_activity > settings.idle_timeout:
            return "idle timeout"
        return None


def _dimension(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1000


def _exit_code(payload: bytes) -> int:
    """The exec status on the error channel: Success → 0, NonZeroExitCode → its code."""
    try:
        status = json.loads(payload)
    except ValueError:
        return 1
    if status.get("status") == "Success":
        return 0
    for cause in (status.get("details") or {}).get("causes") or ():
        if cause.get("reason") == "ExitCode":
            try:
                return int(cause.get("message"))
            except (TypeError, ValueError):
                break
    return 1


class Terminals:
    """Open shells by (caller, namespace, sandbox), and their reaper. A caller is the principal
    key (issuer, subject) that terminal access was authorized for."""

    def __init__(self, kube: KubeClient | None, settings: TerminalSettings, record: Callable[..., None]):
        self.kube = kube
        self.settings = settings
        self._record = record  # (event, key, **detail): audit
        self._sessions: dict[tuple, TerminalSession] = {}
        # shells per caller, counted from before the exec is dialled (so concurrent opens cannot
        # pass the cap together) until the shell ends
        self._per_caller: dict[tuple, int] = {}
        self._count = 0
        self._reaper: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def count(self, caller: tuple | None = None) -> int:
        """Shells (attached, kept for a reconnect, or being started) of `caller`, or of all."""
        return self._count if caller is None else self._per_caller.get(caller, 0)

    async def open(self, request: web.BaseRequest, key: tuple, pod: str) -> web.StreamResponse:
        """Resume the caller's detached shell in this sandbox, or start a new one; then serve
        the client until it leaves. TooManyTerminals when a new shell would exceed a cap."""
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        session = self._sessions.get(key)
        resumed = session is not None and session.detached
        if not resumed:
            session = await self._start(key, pod)  # KubeError: the caller answers 502
        client = web.WebSocketResponse(max_msg_size=MAX_CLIENT_FRAME, heartbeat=30.0)
        await client.prepare(request)
        self._record("terminal.resumed" if resumed else "terminal.opened", key)
        await session.serve_client(client, self.settings)
        return client

    async def _start(self, key: tuple, pod: str) -> TerminalSession:
        caller, namespace, _ = key
        if self._per_caller.get(caller, 0) >= self.settings.max_per_caller:
            raise TooManyTerminals(f"You have {self.settings.max_per_caller} terminals open or waiting for a reconnect; "
                                   "close one first.")
        if self._count >= self.settings.max_total:
            raise TooManyTerminals("The gateway has as many terminals open as it allows; retry later.")
        self._hold(caller, 1)
        try:
            manager = self.kube.exec_session(namespace, pod, SHELL, tty=True)
            exec_socket = await manager.__aenter__()
        except BaseException:
            self._hold(caller, -1)
            raise
        session = TerminalSession(key, exec_socket, manager, self._ended)
        previous = self._sessions.get(key)
        if previous is not None:  # an attached shell stays; the newest is the one resumed
            self._sessions[("attached", id(previous), *key)] = previous
        self._sessions[key] = session
        return session

    def _hold(self, caller: tuple, delta: int) -> None:
        self._count += delta
        held = self._per_caller.get(caller, 0) + delta
        if held > 0:
            self._per_caller[caller] = held
        else:
            self._per_caller.pop(caller, None)

    def _ended(self, session: TerminalSession, reason: str, exit_code: int | None) -> None:
        for k, s in list(self._sessions.items()):
            if s is session:
                del self._sessions[k]
        self._hold(session.key[0], -1)
        self._record("terminal.closed", session.key, reason=reason, exit_code=exit_code)

    async def close_session(self, key: tuple, reason: str) -> None:
        """End the shells of one (caller, namespace, sandbox): the caller lost access."""
        sessions = [s for s in self._sessions.values() if s.key == key]
        await asyncio.gather(*(s.terminate(reason) for s in sessions), return_exceptions=True)

    async def close_sandbox(self, namespace: str, name: str, reason: str) -> None:
        sessions = [s for s in self._sessions.values() if s.key[1:] == (namespace, name)]
        await asyncio.gather(*(s.terminate(reason) for s in sessions), return_exceptions=True)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings.reconnect_window / 4))
            now = asyncio.get_running_loop().time()
            for session in list(self._sessions.values()):
                reason = session.expired(now, self.settings)
                if reason:
                    await session.terminate(reason)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        await asyncio.gather(*(s.terminate("gateway shutting down") for s in list(self._sessions.values())), return_exceptions=True)


__all__ = ["KubeError", "TerminalSettings", "Terminals", "TooManyTerminals"]
