"""A TCP relay that delays every byte by a fixed one-way delay in each direction: a network with a round trip of
twice the delay between two servers on one machine (`tc netem` is not available here).

Each chunk read is written `delay_s` after it was read, in order: a delay, not a rate limit, so throughput and
concurrency are those of the loopback. Use it from asyncio (`await relay.start()` / `await relay.close()`), from
synchronous code (`with relay.running(): ...`, a thread of its own), or as `cosine-client relay`."""
from __future__ import annotations

import asyncio
import contextlib
import threading

from cosine.address import split_host_port

CHUNK = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copies reader to writer, every chunk `delay_s` after it was read. The end is passed on, delayed like the data:
    a clean end (EOF) as a half-close, a reset as a close (else the far side would wait on a dead connection)."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await chunks.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if data is None:
                return
            writer.write(data)
            await writer.drain()

    delivering = asyncio.ensure_future(deliver())
    reset = False
    try:
        while data := await reader.read(CHUNK):
            chunks.put_nowait((loop.time() + delay_s, data))
    except OSError:
        reset = True
    chunks.put_nowait((loop.time() + delay_s, None))
    try:
        await delivering
        if reset or not writer.can_write_eof():
            writer.close()
        else:
            writer.write_eof()
    except OSError:  # the far side is gone too
        writer.close()
    finally:
        delivering.cancel()


class Relay:
    def __init__(self, upstream: str, delay_s: float, host: str = "127.0.0.1", port: int = 0):
        """upstream: host:port to forward to; port 0: any free port (see `port` once started)."""
        self.upstream = split_host_port(upstream)
        self.delay_s, self.host, self.port = delay_s, host, port
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[asyncio.Task] = set()
        self.sockets: set[asyncio.StreamWriter] = set()  # both ends of every relayed connection

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> "Relay":
        self.server = await asyncio.start_server(self._connect, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stops listening and drops every relayed connection (their pipes then end on their own)."""
        self.server.close()
        for socket in self.sockets:
            socket.transport.abort()
        await asyncio.gather(*self.connections, return_exceptions=True)
        await self.server.wait_closed()

    async def _connect(self, client_reader, client_writer) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        self.sockets.add(client_writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:  # nothing listens upstream: the client sees its connection closed, as with a dead host
            upstream_writer = None
        try:
            if upstream_writer is not None:
                self.sockets.add(upstream_writer)
                await asyncio.gather(_pipe(client_reader, upstream_writer, self.delay_s),
                                     _pipe(upstream_reader, client_writer, self.delay_s))
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
                    self.sockets.discard(writer)
            self.connections.discard(task)

    @contextlib.contextmanager
    def running(self):
        """Serves in a thread of its own for the duration of the block."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(self.start(), loop).result()
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.close(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()


async def serve(upstream: str, delay_s: float, host: str, port: int) -> None:
    relay = await Relay(upstream, delay_s, host, port).start()
    print(f"relaying {relay.url} -> {upstream}, {delay_s * 1e3:g} ms each way", flush=True)
    await relay.server.serve_forever()
