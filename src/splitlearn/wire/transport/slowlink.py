"""An emulated wide-area link: a TCP relay that delays and rate-limits what passes through it.

Kernel traffic shaping (``tc netem``) is not available everywhere, and a plan should be tried on
a slow link before it is deployed over one. :class:`SlowLink` listens on a local port and relays
every connection to a target address; each direction is its own link with a one-way delay of
half the round trip and a bandwidth: a chunk of ``n`` bytes leaves once the link has sent what
came before it (``n * 8 / bandwidth`` seconds each) and arrives ``rtt / 2`` later. Bytes pass
unchanged (TLS goes through end to end), in order, without loss.

    link = SlowLink(("127.0.0.1", 7000), rtt=0.05, bandwidth=100e6).start()
    ... dial 127.0.0.1:link.port instead of :7000 ...
    link.stop()

From the command line, ``splitlearn link --to HOST:PORT --rtt 50ms --bandwidth 100mbit``, or
``splitlearn run PLAN --link 50ms,100mbit`` to put every connection of a run through one.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import deque

__all__ = ["SlowLink", "parse_link", "CHUNK"]

CHUNK = 64 * 1024  # bytes read at a time: a packet train, small against a round trip's worth


def parse_link(text: str) -> tuple[float, float | None]:
    """``"50ms,100mbit"`` -> (round trip in s, bandwidth in bit/s or None for unlimited). Either
    part may come alone; units: s, ms, us; bit, kbit, mbit, gbit (per second)."""
    rtt, bw = 0.0, None
    for part in [p.strip().lower() for p in text.split(",") if p.strip()]:
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(s|ms|us|bit|kbit|mbit|gbit)(?:/s|ps)?", part)
        if m is None:
            raise ValueError(f"cannot read {part!r}: give a round trip (e.g. 50ms) and/or a bandwidth (e.g. 100mbit)")
        value, unit = float(m.group(1)), m.group(2)
        if unit in ("s", "ms", "us"):
            rtt = value * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]
        else:
            bw = value * {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[unit]
            if bw <= 0:
                raise ValueError(f"bandwidth {part!r} must be positive")
    return rtt, bw


class _Direction:
    """One direction of one connection: the link's timing state."""

    def __init__(self, delay: float, bandwidth: float | None):
        self.delay, self.bandwidth = delay, bandwidth
        self.free_at = 0.0  # when the link has sent everything before

    def arrival(self, n: int, now: float) -> float:
        start = max(now, self.free_at)
        self.free_at = start + (n * 8 / self.bandwidth if self.bandwidth else 0.0)
        return self.free_at + self.delay


class SlowLink:
    """Relay connections to ``target`` (host, port) through an emulated link; ``listen``: the
    local address (port 0: any free port, then :attr:`port`)."""

    def __init__(self, target: tuple[str, int], *, rtt: float = 0.0, bandwidth: float | None = None,
                 listen: tuple[str, int] = ("127.0.0.1", 0)):
        if rtt < 0:
            raise ValueError("the round trip cannot be negative")
        self.target, self.rtt, self.bandwidth, self.listen = target, rtt, bandwidth, listen
        self.port = 0
        self.bytes = {"forward": 0, "back": 0}  # bytes relayed each way (to the target, and back)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> "SlowLink":
        self._thread = threading.Thread(target=self._run, name="sl-slowlink", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "SlowLink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._connection, self.listen[0], self.listen[1]))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:  # noqa: BLE001 - told to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            self._loop.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        half = self.rtt / 2
        await asyncio.gather(self._pipe(reader, up_writer, _Direction(half, self.bandwidth), "forward"),
                             self._pipe(up_reader, writer, _Direction(half, self.bandwidth), "back"),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Direction,
                    way: str) -> None:
        """Read chunks as they come, deliver each at its arrival time (in order)."""
        queue: deque[tuple[float, bytes]] = deque()
        arrived = asyncio.Event()
        done = False

        async def deliver() -> None:
            try:
                while True:
                    while not queue:
                        if done:
                            return
                        arrived.clear()
                        await arrived.wait()
                    at, data = queue.popleft()
                    wait = at - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if not data:
                        return
                    writer.write(data)
                    await writer.drain()
                    self.bytes[way] += len(data)
            except (ConnectionError, RuntimeError):  # the other end went away: so does this direction
                return

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(CHUNK)
                queue.append((link.arrival(len(data), time.monotonic()), data))
                arrived.set()
                if not data:  # the end of the stream, delivered after what came before it
                    break
            await sender
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            done = True
            arrived.set()
            if not sender.done():
                sender.cancel()
            try:
                writer.close()
            except RuntimeError:
                pass
