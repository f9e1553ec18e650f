"""Pod exec over WebSocket: a real local process whose streams ride the channel.k8s.io protocol.

The socket and the process end together: when the command exits its status goes out on the
error channel and the socket closes; when the socket closes first, the process group is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import weakref
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSMsgType, web

from . import channels
from .channels import ChannelProtocol
from .process import LocalProcess
from .query import flag
from .status import bad_request

_DRAIN_AFTER_EXIT = 1.0  # how long to wait for output still buffered when the command exits


@dataclass
class PodShell:
    """Where a pod's commands run: one working directory kept across execs, like a container's."""

    cwd: Path
    env: dict[str, str] = field(default_factory=dict)


class Shells:
    def __init__(self, base: Path):
        self._base = base
        self._registered: dict[tuple[str, str], PodShell] = {}

    def register(self, namespace: str, pod: str, cwd: Path | None, env: dict[str, str] | None) -> PodShell:
        shell = PodShell(Path(cwd) if cwd else self._fresh_dir(namespace, pod), dict(env or {}))
        self._registered[(namespace, pod)] = shell
        return shell

    def for_pod(self, namespace: str, pod: str) -> PodShell:
        return self._registered.get((namespace, pod)) or self.register(namespace, pod, None, None)

    def _fresh_dir(self, namespace: str, pod: str) -> Path:
        self._base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{namespace}.{pod}.", dir=self._base))


@dataclass(frozen=True)
class ExecOptions:
    command: list[str]
    container: str
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool

    @classmethod
    def parse(cls, request: web.Request, pod: dict) -> ExecOptions:
        """The checks the API server makes before it upgrades the connection."""
        name, query = pod["metadata"]["name"], request.query
        phase = pod.get("status", {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            raise bad_request(f"cannot exec into a container in a completed pod; current phase is {phase}")
        if phase != "Running":
            raise bad_request(f"pod {name} is not running")
        options = cls(
            command=query.getall("command", []),
            container=_container(pod, query.get("container", "")),
            stdin=flag(query, "stdin"),
            stdout=flag(query, "stdout", default=True),
            stderr=flag(query, "stderr", default=True),
            tty=flag(query, "tty"),
        )
        if not options.command:
            raise bad_request("you must specify at least one command for the container")
        if not (options.stdin or options.stdout or options.stderr):
            raise bad_request("you must specify at least 1 of stdin, stdout, stderr")
        return options


def _container(pod: dict, requested: str) -> str:
    containers = [c["name"] for c in pod["spec"].get("containers", [])]
    name = pod["metadata"]["name"]
    if requested:
        if requested not in containers:
            raise bad_request(f"container {requested} is not valid for pod {name}")
        return requested
    default = pod["metadata"].get("annotations", {}).get("kubectl.kubernetes.io/default-container")
    if len(containers) == 1 or default in containers:
        return default if default in containers else containers[0]
    raise bad_request(f"a container name must be specified for pod {name}, choose one of: [{' '.join(containers)}]")


async def serve_exec(
    request: web.Request, pod: dict, shell: PodShell, sockets: weakref.WeakSet
) -> web.WebSocketResponse:
    options = ExecOptions.parse(request, pod)
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise bad_request("Upgrade request required")
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    protocol = channels.choose(offered)
    if protocol is None:
        raise bad_request(
            f"unable to upgrade connection: none of the offered subprotocols [{offered}] is supported, "
            f"expected one of [{', '.join(p.name for p in channels.PROTOCOLS)}]"
        )
    ws = web.WebSocketResponse(protocols=[protocol.name], timeout=1.0, autoping=True)
    await ws.prepare(request)
    sockets.add(ws)
    try:
        await _session(ws, protocol, options, _environment(pod, options, shell), shell.cwd)
    finally:
        sockets.discard(ws)
    return ws


def _environment(pod: dict, options: ExecOptions, shell: PodShell) -> dict[str, str]:
    container = next(c for c in pod["spec"]["containers"] if c["name"] == options.container)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(shell.cwd), "HOSTNAME": pod["metadata"]["name"]}
    if options.tty:
        env["TERM"] = "xterm"
    env.update({v["name"]: v["value"] for v in container.get("env") or [] if "value" in v})
    env.update(shell.env)
    return env


async def _session(
    ws: web.WebSocketResponse, protocol: ChannelProtocol, options: ExecOptions, env: dict[str, str], cwd: Path
) -> None:
    try:
        process = await LocalProcess.spawn(
            options.command, tty=options.tty, stdin=options.stdin, stdout=options.stdout,
            stderr=options.stderr and not options.tty, cwd=str(cwd), env=env,
        )
    except OSError as error:
        await _send(ws, protocol, channels.ERROR, _start_failure(protocol, options.command, error))
        await ws.close()
        return
    # The first frame, empty, on the lowest channel the server writes: "the stream is open".
    first = channels.STDOUT if options.stdout else channels.STDERR if options.stderr else channels.ERROR
    try:
        await _send(ws, protocol, first, b"")
        await _attach(ws, protocol, options.command, process)
    finally:
        await process.kill()


async def _attach(
    ws: web.WebSocketResponse, protocol: ChannelProtocol, command: list[str], process: LocalProcess
) -> None:
    """Carry the streams both ways until the command exits (then report how) or the socket closes."""
    pump = asyncio.create_task(_pump_output(ws, protocol, process))
    reader = asyncio.create_task(_read_input(ws, protocol, process))
    exited = asyncio.create_task(process.wait())
    try:
        done, _ = await asyncio.wait({reader, exited}, return_when=asyncio.FIRST_COMPLETED)
        if exited in done:
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pump), _DRAIN_AFTER_EXIT)
            if status := _exit_status(protocol, command, exited.result()):
                await _send(ws, protocol, channels.ERROR, status)
            await ws.close()
    finally:
        for task in (pump, reader, exited):
            task.cancel()


async def _pump_output(ws: web.WebSocketResponse, protocol: ChannelProtocol, process: LocalProcess) -> None:
    while (item := await process.output.get()) is not None:
        await _send(ws, protocol, *item)


async def _read_input(ws: web.WebSocketResponse, protocol: ChannelProtocol, process: LocalProcess) -> None:
    async for message in ws:
        if message.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
            continue
        decoded = protocol.decode(message.data)
        if decoded is None:
            continue
        channel, data = decoded
        if channel == channels.STDIN:
            await process.write(data)
        elif channel == channels.RESIZE:
            with suppress(ValueError, KeyError, TypeError):
                size = json.loads(data)
                process.resize(int(size["Width"]), int(size["Height"]))
        elif channel == channels.CLOSE and protocol.close_frames and data[:1] == bytes([channels.STDIN]):
            process.close_stdin()


async def _send(ws: web.WebSocketResponse, protocol: ChannelProtocol, channel: int, data: bytes) -> None:
    if ws.closed:
        return
    frame = protocol.encode(channel, data)
    with suppress(ConnectionError):
        if isinstance(frame, str):
            await ws.send_str(frame)
        else:
            await ws.send_bytes(frame)


def _exit_status(protocol: ChannelProtocol, command: list[str], code: int) -> bytes:
    if code == 0:
        return _compact({"metadata": {}, "status": "Success"}) if protocol.status_errors else b""
    message = (
        f"command terminated with non-zero exit code: error executing command "
        f"[{' '.join(command)}], exit code {code}"
    )
    return _failure(protocol, message, "NonZeroExitCode", {"reason": "ExitCode", "message": str(code)})


def _start_failure(protocol: ChannelProtocol, command: list[str], error: OSError) -> bytes:
    message = f'exec failed: unable to start container process: exec: "{command[0]}": {error.strerror}'
    return _failure(protocol, message, "InternalError", {"message": message}, code=500)


def _failure(protocol: ChannelProtocol, message: str, reason: str, cause: dict, code: int | None = None) -> bytes:
    """The error channel's payload: a metav1.Status from v4 on, the bare message before."""
    if not protocol.status_errors:
        return message.encode()
    status = {"metadata": {}, "status": "Failure", "message": message, "reason": reason, "details": {"causes": [cause]}}
    if code is not None:
        status["code"] = code
    return _compact(status)


def _compact(status: dict) -> bytes:
    return json.dumps(status, separators=(",", ":")).encode()
