"""The loader and a worker process talk over one Unix socket: length-prefixed pickled messages,
both ways. A call carries an id and gets one reply (its result, or the error it raised, named);
a note gets none. Messages carry names and small documents only: data travels in files."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import struct
from collections.abc import Awaitable, Callable
from typing import Any

FRAME = struct.Struct("!I")
log = logging.getLogger("duckswap.channel")
Handler = Callable[[str, tuple[Any, ...]], Awaitable[Any]]


class ChannelClosed(Exception):
    """The other side went away (it exited, or closed its end)."""


class RemoteError(Exception):
    """The other side's handler raised; the message names its class and text."""


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handle: Handler) -> None:
        self.reader = reader
        self.writer = writer
        self.handle = handle
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def _send(self, msg: tuple[Any, ...]) -> None:
        if self.closed:
            raise ChannelClosed("the channel is closed")
        body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(FRAME.pack(len(body)) + body)

    async def call(self, op: str, *args: Any, timeout: float | None = None) -> Any:
        """Ask the other side to run `op(*args)`; its result."""
        call_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = fut
        try:
            self._send(("call", call_id, op, args))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(call_id, None)

    def note(self, op: str, *args: Any) -> None:
        """Tell the other side `op(*args)`; no reply. Dropped if the channel is closed."""
        with contextlib.suppress(ChannelClosed):
            self._send(("note", 0, op, args))

    async def run(self) -> None:
        """Read and dispatch messages until the other side closes; then every call waiting
        fails with `ChannelClosed`."""
        try:
            while True:
                head = await self.reader.readexactly(FRAME.size)
                msg = pickle.loads(await self.reader.readexactly(FRAME.unpack(head)[0]))
                kind, call_id, op, args = msg
                if kind in ("reply", "fail"):
                    fut = self._waiting.get(call_id)
                    if fut is not None and not fut.done():
                        if kind == "reply":
                            fut.set_result(args)
                        else:
                            fut.set_exception(RemoteError(args))
                    continue
                task = asyncio.create_task(self._dispatch(kind, call_id, op, args))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ChannelClosed("the other side went away"))

    async def _dispatch(self, kind: str, call_id: int, op: str, args: tuple[Any, ...]) -> None:
        try:
            result = await self.handle(op, args)
        except Exception as exc:
            if kind == "call":
                with contextlib.suppress(ChannelClosed):
                    self._send(("fail", call_id, op, f"{type(exc).__name__}: {exc}"))
            else:
                log.exception("handling %s failed", op)
            return
        if kind == "call":
            with contextlib.suppress(ChannelClosed):
                self._send(("reply", call_id, op, result))

    def close(self) -> None:
        self.closed = True
        self.writer.close()
