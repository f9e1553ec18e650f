"""A command run on this machine for a pod exec: in a pty (tty) or on pipes, in its own session.

Output arrives on `output` as (channel, bytes) — 1 stdout, 2 stderr; a pty merges both onto
stdout as Kubernetes does — then None once every stream is closed. `kill()` ends the whole
process group, so nothing the command started outlives the exec.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import signal
import struct
import termios

STDOUT, STDERR = 1, 2
_READ_SIZE = 65536


def _set_size(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _take_controlling_terminal() -> None:
    # Runs in the child after setsid(): stdin is the pty slave, which becomes its terminal,
    # so a shell gets job control and SIGWINCH on resize.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class LocalProcess:
    def __init__(self, process: asyncio.subprocess.Process, master: int | None):
        self.process = process
        self.output: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self._master = master
        self._pending = bytearray()  # stdin bytes the pty could not take yet
        self._open_streams = 0
        self._readers: list[asyncio.Task] = []

    @classmethod
    async def spawn(
        cls, argv: list[str], *, tty: bool, stdin: bool, stdout: bool, stderr: bool, cwd: str, env: dict[str, str]
    ) -> LocalProcess:
        if tty:
            master, slave = pty.openpty()
            _set_size(slave, 80, 24)
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                    start_new_session=True, preexec_fn=_take_controlling_terminal,
                )
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)  # only the child keeps the slave: EIO on the master means it is gone
            os.set_blocking(master, False)
            runner = cls(process, master)
            runner._read_pty()
            return runner
        pipe, devnull = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=pipe if stdin else devnull, stdout=pipe if stdout else devnull,
            stderr=pipe if stderr else devnull, cwd=cwd, env=env, start_new_session=True,
        )
        runner = cls(process, None)
        for channel, stream in ((STDOUT, process.stdout), (STDERR, process.stderr)):
            if stream is not None:
                runner._open_streams += 1
                runner._readers.append(asyncio.create_task(runner._read_pipe(channel, stream)))
        if not runner._open_streams:
            runner.output.put_nowait(None)
        return runner

    def _read_pty(self) -> None:
        loop = asyncio.get_running_loop()
        self._open_streams = 1

        def readable() -> None:
            try:
                data = os.read(self._master, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError:  # EIO: no process holds the slave any more
                data = b""
            if data:
                self.output.put_nowait((STDOUT, data))
            else:
                loop.remove_reader(self._master)
                self.output.put_nowait(None)

        loop.add_reader(self._master, readable)

    async def _read_pipe(self, channel: int, stream: asyncio.StreamReader) -> None:
        while data := await stream.read(_READ_SIZE):
            self.output.put_nowait((channel, data))
        self._open_streams -= 1
        if not self._open_streams:
            self.output.put_nowait(None)

    async def write(self, data: bytes) -> None:
        if self._master is None:
            stdin = self.process.stdin
            if stdin is not None and not stdin.is_closing():
                stdin.write(data)
                try:
                    await stdin.drain()
                except ConnectionError:
                    pass  # the command is gone; its exit is reported, not this
            return
        self._pending += data
        self._flush_pty()

    def _flush_pty(self) -> None:
        if self._master is None:
            return
        loop = asyncio.get_running_loop()
        try:
            written = os.write(self._master, self._pending)
        except BlockingIOError:
            written = 0
        except OSError:
            self._pending.clear()
            return
        del self._pending[:written]
        loop.remove_writer(self._master)
        if self._pending:
            loop.add_writer(self._master, self._flush_pty)

    def close_stdin(self) -> None:
        if self._master is None:
            if self.process.stdin is not None:
                self.process.stdin.close()
        else:
            # A terminal has no half-close: end-of-file is the EOF character (Ctrl-D) at line start.
            self._pending += b"\x04"
            self._flush_pty()

    def resize(self, width: int, height: int) -> None:
        if self._master is not None:
            _set_size(self._master, width, height)

    async def wait(self) -> int:
        """The exit code; a death by signal N reads 128+N, as a container runtime reports it."""
        code = await self.process.wait()
        return 128 - code if code < 0 else code

    async def kill(self) -> None:
        """End the process group (the command and all it started), then release the pty."""
        for reader in self._readers:
            reader.cancel()  # a pipe may outlive the group if something escaped it with setsid
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        await self.process.wait()
        if self._master is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._master)
            loop.remove_writer(self._master)
            os.close(self._master)
            self._master = None
