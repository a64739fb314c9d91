"""A TCP proxy on 127.0.0.1 that adds a fixed one-way delay: a database one network hop away.

Every chunk read from one side is written to the other `delay` seconds after
it was read, in order. The delay is not cumulative: each chunk carries the
time it arrived and the writer sleeps only until that time plus `delay`, so a
stream of chunks is shifted by `delay`, never stretched. A round trip (query
out, answer back) therefore costs at least 2 x `delay` more than without it.

    async with LatencyProxy("127.0.0.1", 5432, delay=0.001) as proxy:
        url = proxy.url("postgresql://postgres@127.0.0.1:5432/postgres")

`ProxyProcess` runs the same proxy in a process of its own
(`python -m benchmarks.latency_proxy HOST PORT DELAY`), so that forwarding
takes no time from the event loop (or the GIL) of the program measured, as a
real network hop would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

__all__ = ["LatencyProxy", "ProxyProcess", "via"]

CHUNK = 65_536


def via(url: str, port: int) -> str:
    """`url` with its host and port replaced by 127.0.0.1:`port` (user and password kept)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def upstream_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


class _Proxy:
    """What both proxies share: where they forward to, the delay, their port once started."""

    def __init__(self, host: str, port: int, delay: float = 0.001) -> None:
        self.upstream = (host, port)
        self.delay = delay
        self.port = 0

    @classmethod
    def to(cls, url: str, delay: float = 0.001) -> Self:
        """A proxy in front of the server of a database URL."""
        return cls(*upstream_of(url), delay)

    def url(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's."""
        return via(url, self.port)

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()


class LatencyProxy(_Proxy):
    """Forwards connections on a free port of 127.0.0.1 to `host:port`, `delay` s each way."""

    def __init__(self, host: str, port: int, delay: float = 0.001) -> None:
        super().__init__(host, port, delay)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        """One client connection: its own upstream connection and a pump each way."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_w: asyncio.StreamWriter | None = None
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
            await asyncio.gather(self._pump(client_r, up_w), self._pump(up_r, client_w))
        except OSError:
            pass  # the server is gone: the client sees its connection closed
        except asyncio.CancelledError:
            pass  # stop(): asyncio's server callback reports a cancelled task as an error
        finally:
            self._tasks.discard(task)
            for w in (client_w, up_w):
                if w is not None:
                    w.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """One direction: a reader stamping chunks, this writer releasing each when due."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await source.read(CHUNK):
                    queue.put_nowait((loop.time() + self.delay, data))
            finally:  # end of stream (or a reset): passed on, delayed like the data
                queue.put_nowait((loop.time() + self.delay, b""))

        reader = asyncio.create_task(read())
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    break
                sink.write(data)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()  # half close: the other direction may still be talking
        except OSError:
            pass  # a reset ends this direction; the peer's end of stream ends the other
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await reader


class ProxyProcess(_Proxy):
    """A `LatencyProxy` in a child process; it exits with this object (or its parent)."""

    def __init__(self, host: str, port: int, delay: float = 0.001) -> None:
        super().__init__(host, port, delay)
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        host, port = self.upstream
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.latency_proxy", host, str(port), str(self.delay),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent)  # where `benchmarks` imports from
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 30)
        if not line.strip().isdigit():
            await self.stop()
            raise RuntimeError(f"the latency proxy process did not start: {line!r}")
        self.port = int(line)

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # its signal to stop
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _serve(host: str, port: int, delay: float) -> None:
    """Print the proxy's port, then forward until stdin closes (the parent is done)."""
    async with LatencyProxy(host, port, delay) as proxy:
        print(proxy.port, flush=True)
        await asyncio.to_thread(sys.stdin.buffer.read)


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
