"""A TCP proxy a test puts between govflow and a server, to cut connections mid-command.

It runs its own asyncio loop in a thread, so that it keeps forwarding whatever the test's
own loop is doing. ``cut_mid_command("request")`` lets the next chunk a client sends reach
the server only in part (half a command: the server never runs it), then aborts every
connection; ``cut_mid_command("reply")`` does the same to the next reply (the server ran
the command, the client never learns it did: the harder case). ``cut_all()`` aborts every
connection at once, wherever they are. ``link_down()`` cuts every connection and refuses
new ones (each is aborted as soon as it is accepted) until ``link_up()``: the server is out
of reach for the clients behind this proxy only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Literal

Direction = Literal["request", "reply"]
CHUNK = 64 * 1024


class Proxy:
    """Forward 127.0.0.1:``port`` to ``target_port``; cut connections when told to."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0  # accepted so far
        self.cuts = 0  # connections aborted on purpose
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._armed: Direction | None = None
        self._fired: asyncio.Event | None = None
        self._down = False

    def start(self) -> None:
        """Listen on a free port (``self.port``) and start forwarding."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    def stop(self) -> None:
        """Close every connection and stop listening."""
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def cut_all(self) -> int:
        """Abort every open connection now; return how many."""
        return asyncio.run_coroutine_threadsafe(self._abort_all(), self._loop).result(10)

    def link_down(self) -> int:
        """Cut every connection and refuse new ones until ``link_up()``; return how many."""
        self._down = True
        return self.cut_all()

    def link_up(self) -> None:
        """Forward new connections again."""
        self._down = False

    def cut_mid_command(self, direction: Direction, within: float = 5.0) -> bool:
        """Cut inside the next chunk sent in ``direction``; False when none came ``within``."""
        return asyncio.run_coroutine_threadsafe(
            self._arm_and_wait(direction, within), self._loop
        ).result(within + 10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._abort_all()

    async def _arm_and_wait(self, direction: Direction, within: float) -> bool:
        self._armed = direction
        self._fired = asyncio.Event()
        try:
            await asyncio.wait_for(self._fired.wait(), within)
        except TimeoutError:
            return False
        finally:
            self._armed = None
        return True

    async def _abort_all(self) -> int:
        pairs = list(self._pairs)
        for client, upstream in pairs:
            client.transport.abort()
            upstream.transport.abort()
        self._pairs.clear()
        self.cuts += len(pairs)
        return len(pairs)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()  # the server is down: so is the proxy, to the client
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        await asyncio.gather(
            self._pump(reader, up_writer, "request", pair),
            self._pump(up_reader, writer, "reply", pair),
            return_exceptions=True,
        )
        self._pairs.discard(pair)
        for w in pair:
            w.transport.abort()

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        direction: Direction,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        while True:
            data = await source.read(CHUNK)
            if not data:
                # One side closed: pass the close on (the other pump ends with it).
                with contextlib.suppress(OSError):
                    sink.write_eof()
                return
            if self._armed == direction and pair in self._pairs:
                self._armed = None
                # Half the chunk, at least one byte short of a whole command or reply.
                sink.write(data[: len(data) // 2])
                with contextlib.suppress(OSError):
                    await sink.drain()
                await self._abort_all()
                assert self._fired is not None
                self._fired.set()
                return
            sink.write(data)
            await sink.drain()


@contextlib.contextmanager
def proxy_to(port: int) -> Iterator[Proxy]:
    """Run a ``Proxy`` to ``port`` until the block ends."""
    proxy = Proxy(port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
