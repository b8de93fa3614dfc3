"""A simulated lab bench: SCPI instruments over TCP, backed by a simulated device.

The bench serves two instruments, each on its own TCP port as LAN
instruments do (raw socket, ``\\n``-terminated, like port 5025 of a real one):

    source  (port P)    waveform generator, or pulse shaper for optical systems:
                        takes the batch (``SOUR:DATA:ARB`` / ``SOUR:MASK:DATA``)
                        and holds the device parameters (``SOUR:PAR:DATA``)
    sink    (port P+1)  oscilloscope, or spectrometer for optical systems:
                        ``READ:WAV?`` / ``READ:SPEC?`` runs the device on the
                        loaded batch and answers with the response

so that the pyvisa drivers (:mod:`pnn_cluster.drivers.visa`) run against it
through pyvisa-py (``TCPIP::127.0.0.1::5025::SOCKET``) exactly as against
hardware. It is built in layers, each with one job:

* :mod:`.scpi_wire` (sans I/O): the byte stream framed into program messages
  (``\\n``-terminated; IEEE 488.2 definite-length blocks ``#<n><len><bytes>``
  of little-endian float64), a message parsed into commands (``;`` between
  commands, headers in short or long form, any case).
* :mod:`.scpi_session` (sans I/O): a connection's error queue, and each
  command run against the instrument's table; the answers framed.
* :mod:`.scpi_instruments`: the two instruments' tables, built from the
  command sets the drivers share (:mod:`pnn_cluster.protocol.scpi`), and the
  device behind them.
* this module: the asyncio transport that moves the bytes and holds each
  connection to its bounds, and :class:`SimBench`, which starts and stops it.

Errors carry standard SCPI codes (-101 invalid character, -102 syntax, -104
data type, -108 parameter not allowed, -109 missing parameter, -113 undefined
header, -120 numeric data, -151 invalid string, -161 invalid block, -221
settings conflict, -222 data out of range, -223 too much data, -224 illegal
parameter value, -230 data stale, -240 hardware error) and a detail after
``;`` naming the field, value and what is allowed. Numbers are IEEE 488.2
decimal numeric data exactly (``5``, ``-1.5``, ``+2.0E-3``, ``.5``, ``5.``):
``1_0``, ``0x10``, ``1e``, ``inf``, ``nan`` are refused with -120 (malformed
number) or -104 (not a number), and so is a quoted string where a setting's
value is expected.

Memory and time are bounded, so that a client (broken or hostile) cannot
exhaust the bench or hold it up for the others (the defaults and ranges are
stated in :mod:`.limits`):

* A message longer than ``SCPI_MAX_MESSAGE_BYTES`` (4 KiB) outside block
  payloads, block headers included, is dropped with -223; the length is
  checked as the bytes arrive, before anything parses them, and numbers are
  parsed in linear time, so no line can hold up the event loop that serves
  both instruments.
* A block's declared length is checked before anything is allocated: more
  than ``max_block_bytes`` closes the connection (the stream cannot be
  resynchronised without trusting that length), and so does a block that
  would take the blocks of its message past ``max_message_block_bytes``
  together. The defaults are the device's largest legitimate block
  (:func:`default_max_block_bytes`) and that plus every parameter array
  (:func:`default_max_message_block_bytes`). A block's buffer then grows with
  the bytes that arrive, never to the declared length up front.
* Each message, block included, must arrive in full within
  ``command_timeout_s`` of its first byte; otherwise the connection is
  closed. A connection with nothing in progress for ``idle_timeout_s``
  (``None``: never) is closed too.
* Each instrument serves at most ``max_connections`` clients. When all are
  taken, a new client is admitted by closing the connection idle the longest
  (nothing arriving, queued, running or waiting to be sent), which is logged
  and counted as ``evicted``; a client mid-conversation is never evicted.
  Only when none is idle is the new connection closed at once, and the
  refusal logged. (SCPI has no authentication: anyone who reaches the port
  may take a slot, so a slot is not kept for a client that is not using it;
  an evicted driver gets a closed connection on its next command.)
* Answers are handed to the socket ``max_unread_bytes / 2`` at a time and no
  more than ``max_unread_bytes`` wait for a client; a client that has not read
  for ``command_timeout_s`` is disconnected. At most ``SCPI_QUEUE_MESSAGES``
  messages or ``SCPI_QUEUE_BYTES`` of received messages wait for execution;
  beyond that the bench stops reading from that connection (TCP
  back-pressure) until they have run.
* Every connection closed by the bench is logged with its reason and counted
  in :attr:`SimBench.stats`.

Several clients may connect to each instrument; commands of one connection
run in order, measurements of all connections one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pnn_cluster.devices import make_device
from pnn_cluster.devices.base import Device
from pnn_cluster.servers import BindError, is_loopback_host
from pnn_cluster.servers.limits import (
    SCPI_BLOCK_CAP_MAX,
    SCPI_BLOCK_CHUNK,
    SCPI_COMMAND_TIMEOUT_S,
    SCPI_IDLE_TIMEOUT_S,
    SCPI_MAX_BLOCK_BYTES,
    SCPI_MAX_CONNECTIONS,
    SCPI_MAX_MESSAGE_BLOCK_BYTES,
    SCPI_MAX_UNREAD_BYTES,
    SCPI_QUEUE_BYTES,
    SCPI_QUEUE_MESSAGES,
    Limit,
)
from pnn_cluster.servers.scpi_instruments import (
    Bench,
    SimInstrument,
    default_max_block_bytes,
    default_max_message_block_bytes,
    instruments_for,
)
from pnn_cluster.servers.scpi_session import ScpiSession
from pnn_cluster.servers.scpi_wire import Framer, Message, Overflow, ScpiError

__all__ = ["ScpiError", "SimBench", "default_max_block_bytes", "default_max_message_block_bytes", "instruments_for"]

log = logging.getLogger(__name__)

# the defaults and caps under the names this module has always had (stated in .limits)
MAX_CONNECTIONS = SCPI_MAX_CONNECTIONS.default
IDLE_TIMEOUT_S = SCPI_IDLE_TIMEOUT_S.default
COMMAND_TIMEOUT_S = SCPI_COMMAND_TIMEOUT_S.default
MAX_UNREAD_BYTES = SCPI_MAX_UNREAD_BYTES.default
BLOCK_LENGTH_LIMIT = SCPI_MAX_BLOCK_BYTES.high
MAX_BLOCK_BYTES = SCPI_BLOCK_CAP_MAX
BLOCK_CHUNK = SCPI_BLOCK_CHUNK

_CLOSE = object()  # in a connection's inbox: close once everything before it has been answered


# -- connections -------------------------------------------------------------------------------


class _Inbox:
    """What a connection received and has not run yet, in order, and the bytes it holds."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[Any, int]] = asyncio.Queue()
        self.nbytes = 0

    def put(self, item: Any, nbytes: int = 0) -> None:
        self.nbytes += nbytes
        self._queue.put_nowait((item, nbytes))

    async def get(self) -> Any:
        item, nbytes = await self._queue.get()
        self.nbytes -= nbytes
        return item

    def empty(self) -> bool:
        return self._queue.empty()

    def full(self) -> bool:
        """Reading from the connection pauses: too many messages, or too many bytes, wait."""
        return self._queue.qsize() > SCPI_QUEUE_MESSAGES or self.nbytes > SCPI_QUEUE_BYTES

    def drained(self) -> bool:
        """Reading may resume."""
        return self._queue.qsize() <= SCPI_QUEUE_MESSAGES // 4 and self.nbytes <= SCPI_QUEUE_BYTES


class _Connection(asyncio.BufferedProtocol):
    """One client connection: moves its bytes and holds it to its bounds; a :class:`Framer` and a
    :class:`ScpiSession` do the rest.

    Blocks are received straight into their buffer (``get_buffer`` hands the
    kernel the framer's block memory), which starts small and grows as the
    block's bytes arrive, so a header alone costs nothing. The bench's sweeper
    (:meth:`check_deadlines`) closes a connection whose message does not
    arrive in time, or that sits idle too long.
    """

    def __init__(self, inst: SimInstrument, bench: SimBench) -> None:
        self.inst = inst
        self.bench = bench
        self.scpi = ScpiSession(inst)
        self.framer = Framer(bench.max_block_bytes, max_message_block_bytes=bench.max_message_block_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._inbox = _Inbox()
        self._read_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._closing = False  # the bench decided to close: input is ignored from then on
        self._busy = False
        self._msg_start: float | None = None  # when the first byte of the message in progress arrived
        self._last_activity = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    # -- asyncio protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        bench, inst = self.bench, self.inst
        if len(inst.sessions) >= bench.max_connections and not self._make_room():
            self._closing = True
            bench.stats["refused_connections"] += 1
            log.warning("sim-instrument: %s (%s, port %d): refused a connection from %s: %d connections open; "
                        "allowed: at most %d per instrument", inst.role, inst.kind, inst.port, self.peer,
                        len(inst.sessions), bench.max_connections)
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        high = bench.max_unread_bytes // 2
        self.transport.set_write_buffer_limits(high=high, low=high // 4)
        bench.stats["connections"] += 1
        bench._sessions.add(self)
        inst.sessions.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _make_room(self) -> bool:
        """The instrument is at its cap: close its connection idle the longest for this one; False if none is."""
        idle = [c for c in self.inst.sessions if c.idle()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._last_activity)
        self.bench.stats["evicted"] += 1
        oldest.drop(f"idle for {time.monotonic() - oldest._last_activity:.3g} s with all {self.bench.max_connections} "
                    f"connections taken; closed to admit {self.peer}")
        self.inst.sessions.discard(oldest)  # its slot is free now; the transport closes on the next turn of the loop
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.bench._sessions.discard(self)
        self.inst.sessions.discard(self)
        self.framer.close()
        self._msg_start = None
        self._writable.set()  # a sender waiting for the client wakes up and finds the transport closed
        self._inbox.put(None)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.framer.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._last_activity = time.monotonic()
        if self._closing:
            return
        framer = self.framer
        in_block, ended = framer.block is not None, framer.ended
        for event in framer.received(nbytes):
            if isinstance(event, Message):
                self._inbox.put(event.parts, event.nbytes)
            elif isinstance(event, Overflow):
                self.bench.stats["oversized_blocks" if event.before is None else "oversized_messages"] += 1
                self.drop(event.reason(), event.error())
            else:
                self._inbox.put(event)  # an error, through the queue, so errors keep their order with commands
        if self._closing or in_block:
            return
        if framer.ended != ended or not framer.in_progress:
            self._msg_start = None  # the next message's clock starts with its first byte
        if framer.in_progress and self._msg_start is None:
            self._msg_start = self._last_activity
        if self._inbox.full() and not self._read_paused:
            self._read_paused = True
            if self.transport is not None:
                self.transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        if self._read_paused and not self._closing and self._inbox.drained():
            self._read_paused = False
            if self._msg_start is not None:  # the message's clock stood still while we were not reading
                self._msg_start = time.monotonic()
            if self.transport is not None:
                self.transport.resume_reading()

    # -- limits --------------------------------------------------------------------------------------

    def idle(self) -> bool:
        """Nothing in progress: no message arriving, none queued or running, no answer waiting to be sent."""
        t = self.transport
        return (not self._closing and t is not None and not t.is_closing() and self._msg_start is None
                and not self.framer.in_progress and not self._busy and self._inbox.empty()
                and t.get_write_buffer_size() == 0)

    def check_deadlines(self, now: float) -> None:
        """Close the connection if its message is overdue or it has been idle too long (the bench's sweeper)."""
        t = self.transport
        if self._closing or t is None or t.is_closing():
            return
        bench, framer = self.bench, self.framer
        if self._msg_start is not None and not self._read_paused and now - self._msg_start > bench.command_timeout_s:
            limit = f"{bench.command_timeout_s:g} s"
            if framer.block is not None:
                what = (f"a block declared {framer.block_len} bytes and {framer.block_fill} arrived within {limit}; "
                        f"allowed: the whole message within {limit}")
                err = ScpiError(-161, what)
            else:
                what = f"a message was not completed by a newline within {limit}"
                err = ScpiError(-100, what)
            bench.stats["timed_out"] += 1
            self.drop(what, err)
            return
        if bench.idle_timeout_s is not None and self.idle() and now - self._last_activity > bench.idle_timeout_s:
            bench.stats["idle_closed"] += 1
            self.drop(f"idle for {now - self._last_activity:.3g} s; allowed: {bench.idle_timeout_s:g} s")

    def drop(self, reason: str, err: ScpiError | None = None) -> None:
        """Stop reading, log why, and close the connection once what it sent before has been answered."""
        if self._closing:
            return
        self._closing = True
        self.bench.stats["dropped"] += 1
        inst = self.inst
        log.warning("sim-instrument: %s (%s, port %d): closing the connection from %s: %s", inst.role, inst.kind,
                    inst.port, self.peer, reason)
        self.framer.close()
        self._msg_start = None
        if self.transport is not None:
            self.transport.pause_reading()
        if err is not None:
            self._inbox.put(err)  # through the queue, after the answers to what came before
        self._inbox.put(_CLOSE)

    # -- execution ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        scpi = self.scpi
        while True:
            item = await self._inbox.get()
            self._maybe_resume_reading()
            if item is None:
                return
            if item is _CLOSE:
                t = self.transport
                if t is not None and not t.is_closing():
                    t.close()  # answers already handed over still go out; a client that never reads them:
                    loop.call_later(self.bench.command_timeout_s, t.abort)
                return
            if isinstance(item, ScpiError):
                scpi.push_error(item)
                continue
            self._busy = True
            try:
                self.bench.stats["messages"] += 1
                commands = scpi.parse(item)
                del item  # a received block is freed as soon as its command is done with it
                if commands is None:
                    continue
                if scpi.touches_device(commands):
                    out = await loop.run_in_executor(self.bench._worker, scpi.execute, commands)
                else:
                    out = scpi.execute(commands)
                del commands
                if out and not await self._send(out):
                    return
            finally:
                self._busy = False
                self._last_activity = time.monotonic()

    async def _send(self, out: list[Any]) -> bool:
        """Hand the answer to the socket piece by piece, never more than ``max_unread_bytes`` waiting.

        A block goes out straight from the array's memory (``writelines`` would join everything into one
        new bytes object first). False if the connection is gone or was closed for not reading.
        """
        chunk = max(1, self.bench.max_unread_bytes // 2)
        for piece in out:
            view = memoryview(piece)
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
            for start in range(0, view.nbytes, chunk):
                if not self._writable.is_set():
                    try:
                        await asyncio.wait_for(self._writable.wait(), self.bench.command_timeout_s)
                    except asyncio.TimeoutError:
                        self._reader_stalled()
                        return False
                t = self.transport
                if t is None or t.is_closing():
                    return False
                t.write(view[start: start + chunk])
                self._last_activity = time.monotonic()
        return True

    def _reader_stalled(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        self._closing = True
        self.bench.stats["dropped"] += 1
        self.bench.stats["unread_closed"] += 1
        inst = self.inst
        log.warning("sim-instrument: %s (%s, port %d): closing the connection from %s: %d answer bytes unread "
                    "for %g s; allowed: at most %d bytes waiting, read within %g s", inst.role, inst.kind, inst.port,
                    self.peer, t.get_write_buffer_size(), self.bench.command_timeout_s, self.bench.max_unread_bytes,
                    self.bench.command_timeout_s)
        t.abort()  # close() would wait for the client to read what is buffered


# -- the bench -------------------------------------------------------------------------------


class SimBench(Bench):
    """Serve a simulated device as a source and a sink SCPI instrument over TCP.

    ``port`` is the source's port and ``port + 1`` the sink's; ``port=0``
    lets the OS choose both (read them from :attr:`ports` or
    :attr:`resources` after :meth:`start`). Constructing does no I/O.

    Limits (see the module's docstring; defaults and ranges in :mod:`.limits`):
    ``max_block_bytes`` (None: the device's largest legitimate block,
    :func:`default_max_block_bytes`), ``max_message_block_bytes`` (None: that
    and every parameter array, :func:`default_max_message_block_bytes`),
    ``max_connections`` per instrument (then the longest idle connection makes
    room for a new one, or the new one is refused),
    ``idle_timeout_s`` (None: never), ``command_timeout_s`` and
    ``max_unread_bytes``. The instruments and the device they share are the
    :class:`~pnn_cluster.servers.scpi_instruments.Bench` this extends.
    """

    def __init__(self, system: str = "circuit", *, device: Device | None = None, host: str = "127.0.0.1",
                 port: int = 5025, allow_remote: bool = False, instruments: tuple[str, str] | None = None,
                 max_block_bytes: int | None = None, max_message_block_bytes: int | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 idle_timeout_s: float | None = IDLE_TIMEOUT_S, command_timeout_s: float = COMMAND_TIMEOUT_S,
                 max_unread_bytes: int = MAX_UNREAD_BYTES, **device_options: Any) -> None:
        if not allow_remote and not is_loopback_host(host):
            raise BindError(f"sim-instrument: host {host!r} is not a loopback address; allowed: 127.0.0.1, ::1, "
                            "localhost (pass allow_remote=True / --allow-remote to listen on a network)")
        if not (isinstance(port, int) and 0 <= port <= 65534):
            raise BindError(f"sim-instrument: port {port!r}; allowed: 0 (OS chooses) or 1..65534 (port+1 is the sink)")
        super().__init__(device if device is not None else make_device(system, **device_options),
                         system if device is None else None, instruments)
        self.host = host
        self.port = port
        self.max_block_bytes = (default_max_block_bytes(self.device.spec) if max_block_bytes is None
                                else _whole("max_block_bytes", max_block_bytes, SCPI_MAX_BLOCK_BYTES))
        self.max_message_block_bytes = (
            default_max_message_block_bytes(self.device.spec, self.max_block_bytes) if max_message_block_bytes is None
            else _whole("max_message_block_bytes", max_message_block_bytes, SCPI_MAX_MESSAGE_BLOCK_BYTES))
        self.max_connections = _whole("max_connections", max_connections, SCPI_MAX_CONNECTIONS)
        self.max_unread_bytes = _whole("max_unread_bytes", max_unread_bytes, SCPI_MAX_UNREAD_BYTES)
        self.command_timeout_s = _seconds("command_timeout_s", command_timeout_s, SCPI_COMMAND_TIMEOUT_S)
        self.idle_timeout_s = (None if idle_timeout_s is None
                               else _seconds("idle_timeout_s", idle_timeout_s, SCPI_IDLE_TIMEOUT_S))
        self._sessions: set[_Connection] = set()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-device")
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def ports(self) -> dict[str, int]:
        return {"source": self.source.port, "sink": self.sink.port}

    @property
    def resources(self) -> dict[str, str]:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return {role: f"TCPIP::{host}::{p}::SOCKET" for role, p in self.ports.items()}

    def visa_config(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """A :class:`~pnn_cluster.drivers.visa.VisaDeviceConfig` mapping for this bench (spec via SYST:SPEC?)."""
        return {
            "source": {"driver": self.source.kind, "resource": self.resources["source"], "timeout_s": timeout_s},
            "sink": {"driver": self.sink.kind, "resource": self.resources["sink"], "timeout_s": timeout_s},
            "backend": "@py",
        }

    @property
    def running(self) -> bool:
        """Serving: started, and its thread alive."""
        return self._thread is not None and self._thread.is_alive()

    def blocks_in_progress(self) -> list[tuple[int, int]]:
        """``(bytes held for it, bytes arrived)`` of each block being received now, one per connection: what a
        declared length costs before its bytes come (a snapshot, read from any thread)."""
        out = []
        for sess in list(self._sessions):
            block = sess.framer.block
            if block is not None:
                out.append((len(block), sess.framer.block_fill))
        return out

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> SimBench:
        """Listen in a background thread; returns once both ports accept connections."""
        if self._thread is not None:
            return self
        self.device.connect()
        self._thread = threading.Thread(target=self._thread_main, name=f"sim-bench-{self.system}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"sim-instrument: bench did not start within {timeout_s} s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close every connection and both listeners, then release the device."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        self._thread = None
        self._worker.shutdown(wait=True)
        self.device.close()

    def __enter__(self) -> SimBench:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _thread_main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        servers = []
        try:
            for inst, port in ((self.source, self.port), (self.sink, self.port + 1 if self.port else 0)):
                srv = await loop.create_server(lambda inst=inst: _Connection(inst, self), self.host, port,
                                               reuse_address=True)
                inst.port = srv.sockets[0].getsockname()[1]
                servers.append(srv)
        except OSError as exc:
            for srv in servers:
                srv.close()
            raise BindError(f"sim-instrument: cannot listen on {self.host}:{port}: {exc.strerror}") from None
        self._ready.set()
        sweeper = loop.create_task(self._sweep())
        await self._stop.wait()
        sweeper.cancel()
        for srv in servers:
            srv.close()
        sessions = list(self._sessions)
        tasks = [s._task for s in sessions if s._task is not None]
        for sess in sessions:
            if sess.transport is not None:
                sess.transport.close()
        for srv in servers:
            await srv.wait_closed()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    async def _sweep(self) -> None:
        """Enforce the per-connection deadlines (message in progress, idle) a few times per timeout."""
        shortest = min(self.command_timeout_s, self.idle_timeout_s or self.command_timeout_s)
        tick = min(1.0, max(0.02, shortest / 10))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for sess in list(self._sessions):
                sess.check_deadlines(now)


def _whole(name: str, value: Any, limit: Limit) -> int:
    low, high = limit.low, limit.high
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise BindError(f"sim-instrument: {name} {value!r}; allowed: an integer {low}..{high}")
    return int(value)


def _seconds(name: str, value: Any, limit: Limit) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
            or not math.isfinite(value) or not limit.low < value <= limit.high):
        raise BindError(f"sim-instrument: {name} {value!r}; allowed: a positive, finite number of seconds")
    return float(value)
