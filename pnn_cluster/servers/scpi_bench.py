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
hardware. The command table of each instrument is built from the command set
the drivers are built from too (:mod:`pnn_cluster.protocol.scpi`: every
:class:`~pnn_cluster.protocol.scpi.Setting`, data header, range and default),
so driver and bench share one declaration of each.

Behaviour a driver can rely on:

* Program messages end with ``\\n``; ``;`` separates commands in one message;
  headers take short or long forms, any case; arrays are IEEE 488.2
  definite-length blocks ``#<n><len><bytes>`` of little-endian float64.
* Each connection has its own error queue (32 entries; on overflow the last
  entry becomes ``-350,"Queue overflow"``). ``SYST:ERR?`` returns the oldest
  entry or ``0,"No error"``. Errors carry standard SCPI codes (-101 invalid
  character, -102 syntax, -104 data type, -108 parameter not allowed, -109
  missing parameter, -113 undefined header, -120 numeric data, -151 invalid
  string, -161 invalid block, -221 settings conflict, -222 data out of range, -223 too much data,
  -224 illegal parameter value, -230 data stale, -240 hardware error) and a
  detail after ``;`` naming the field, value and what is allowed.
* A query that fails produces no answer (as on real instruments), except the
  data queries (``READ?``, ``FETCh?``) which answer an empty block ``#10``
  so a driver never waits out its timeout to learn that a measurement failed.
* Every value is checked against the device's spec before it reaches the
  device: a refused batch also clears the loaded one, so a stale batch is
  never measured.
* Numbers are IEEE 488.2 decimal numeric data exactly (``5``, ``-1.5``,
  ``+2.0E-3``, ``.5``, ``5.``): ``1_0``, ``0x10``, ``1e``, ``inf``, ``nan``
  are refused with -120 (malformed number) or -104 (not a number), and so is
  a quoted string where a setting's value is expected.

Memory and time are bounded, so that a client (broken or hostile) cannot
exhaust the bench or hold it up for the others:

* A message longer than 1 MiB outside a block is dropped with -223.
* A block's declared length is checked before anything is allocated: more
  than ``max_block_bytes`` closes the connection (the stream cannot be
  resynchronised without trusting that length). The default is the device's
  largest legitimate block (``max_batch`` samples of ``input_size`` float64,
  or the largest parameter), at least 1 MiB and at most :data:`MAX_BLOCK_BYTES`
  (256 MiB). A block's buffer then grows with the bytes that arrive (to twice
  what has arrived, or 64 KiB more), never to the declared length up front.
* Each message, block included, must arrive in full within
  ``command_timeout_s`` (60 s) of its first byte; otherwise the connection is
  closed. A connection with nothing in progress for ``idle_timeout_s``
  (1 hour; ``None``: never) is closed too.
* Each instrument serves at most ``max_connections`` (8) clients; one more is
  closed at once, and the refusal logged.
* Answers are handed to the socket ``max_unread_bytes / 2`` at a time and no
  more than ``max_unread_bytes`` (8 MiB) wait for a client; a client that has
  not read for ``command_timeout_s`` is disconnected. At most 16 messages or
  4 MiB of received messages wait for execution; beyond that the bench stops
  reading from that connection (TCP back-pressure) until they have run.
* Every connection closed by the bench is logged with its reason and counted
  in :attr:`SimBench.stats`.

Several clients may connect to each instrument; commands of one connection
run in order, measurements of all connections one at a time.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pnn_cluster.devices import make_device
from pnn_cluster.devices.base import Device, DeviceError
from pnn_cluster.devices.spec import DeviceSpec, LimitError
from pnn_cluster.protocol.scpi import (
    BLOCK_DTYPE,
    COMMAND_SETS,
    DECIMAL_SYNTAX,
    EMPTY_BLOCK,
    InstrumentCommands,
    Ints,
    Node,
    Range,
    Refused,
    Setting,
    SinkCommands,
    SourceCommands,
    block_header,
    block_values,
    format_error,
    header_matches,
    header_nodes,
    is_decimal_number,
)
from pnn_cluster.servers import BindError, is_loopback_host

__all__ = ["ScpiError", "SimBench", "default_max_block_bytes", "instruments_for"]

log = logging.getLogger(__name__)

ERROR_QUEUE_LEN = 32
#: longest program message outside blocks
MAX_MESSAGE_BYTES = 1 << 20
#: the largest default block cap, whatever the device (an explicit ``max_block_bytes`` may exceed it)
MAX_BLOCK_BYTES = 256 << 20
#: the smallest default block cap (room for any small parameter array)
MIN_BLOCK_BYTES = 1 << 20
#: largest length a block header can declare (9 digits)
BLOCK_LENGTH_LIMIT = 999_999_999
#: a block's buffer holds what has arrived and room for as much again, or for this much more
BLOCK_CHUNK = 64 << 10
#: clients per instrument
MAX_CONNECTIONS = 8
#: seconds a connection may sit with nothing in progress
IDLE_TIMEOUT_S = 3600.0
#: seconds a message (block included) may take to arrive, and a client to start reading a pending answer
COMMAND_TIMEOUT_S = 60.0
#: answer bytes that may wait for a client to read them
MAX_UNREAD_BYTES = 8 << 20
#: received messages waiting for execution: reading from the connection pauses above either bound
QUEUE_MESSAGES = 16
QUEUE_BYTES = 4 << 20
#: systems whose bench is optical (pulse shaper + spectrometer); the others are electronic (AWG + scope)
OPTICAL_SYSTEMS = {"shg"}

_SPECIAL = re.compile(rb"[\n#\"']")
_HEADER = re.compile(r"^:?(\*[A-Za-z]+|[A-Za-z][A-Za-z0-9]*(?::[A-Za-z][A-Za-z0-9]*)*)(\?)?$")
_MARK = re.compile("\x00(\\d+)\x00$")
_NUMBER_START = re.compile(r"[+-]?\.?[0-9]", re.ASCII)


def default_max_block_bytes(spec: DeviceSpec) -> int:
    """The largest block a client legitimately sends to a bench of this device, within the default bounds.

    A batch of ``spec.max_batch`` samples or the largest parameter array, as float64; at least
    :data:`MIN_BLOCK_BYTES`, at most :data:`MAX_BLOCK_BYTES`.
    """
    item = BLOCK_DTYPE.itemsize
    largest = max([spec.max_batch * spec.input.size * item] + [p.numel * item for p in spec.params])
    return int(min(MAX_BLOCK_BYTES, max(MIN_BLOCK_BYTES, largest)))


def instruments_for(system: str) -> tuple[str, str]:
    """Driver names of the (source, sink) instruments that front a simulated system."""
    return ("pulse_shaper", "spectrometer") if system in OPTICAL_SYSTEMS else ("awg", "scope")


class ScpiError(Exception):
    """An entry for the error queue: an SCPI code and a detail naming what was wrong."""

    def __init__(self, code: int, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(self.text())

    def text(self) -> str:
        return format_error(self.code, self.detail)


class _Block:
    """An IEEE 488.2 block argument or answer: a bytes-like payload, never copied on the way out."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def pieces(self) -> list[Any]:
        view = memoryview(self.data)
        if not view.nbytes:
            return [EMPTY_BLOCK]
        return [block_header(view.nbytes), view.cast("B")]


class _Quoted(str):
    """A parameter that was a quoted string (``"..."`` or ``'...'``): string data, not a number or mnemonic."""

    __slots__ = ()


def _float_block(arr: np.ndarray) -> _Block:
    return _Block(np.ascontiguousarray(arr, dtype=BLOCK_DTYPE))


# -- instruments ------------------------------------------------------------------------------


@dataclass
class _Command:
    nodes: tuple[Node, ...]
    on_set: Callable[[Any, list[Any]], Any] | None = None
    on_query: Callable[[Any, list[Any]], Any] | None = None
    blocking: bool = False  # touches the device: runs in the bench's worker thread


class _SimInstrument:
    """One simulated instrument: its command set's table of handlers, and the shared bench behind it."""

    def __init__(self, bench: SimBench, commands: type[InstrumentCommands], role: str) -> None:
        self.bench = bench
        self.commands = commands
        self.kind = commands.kind
        self.role = role
        self.port = 0
        self.settings = commands.settings()
        self.values: dict[str, Any] = {}
        self.table: list[_Command] = []
        self.sessions: set[_Session] = set()
        self.reset_settings()
        for name, s in self.settings.items():
            self._add_setting(name, s)
        self._add(commands.ERROR, on_query=lambda sess, a: self._no_args(a) or sess.pop_error())
        self._add(commands.ERROR_COUNT, on_query=lambda sess, a: self._no_args(a) or str(len(sess.errors)))
        self._add(commands.SPEC, on_query=self._q_spec)
        if issubclass(commands, SourceCommands):
            self._add(commands.LOAD, on_set=self._load, blocking=True)
            self._add(commands.PARAM, on_set=self._set_param, on_query=self._q_param, blocking=True)
            self._add(commands.PARAM_CATALOG, on_query=self._q_catalog)
        else:
            assert issubclass(commands, SinkCommands)
            self._add(commands.INIT, on_set=self._init, blocking=True)
            self._add(commands.FETCH, on_query=self._fetch, blocking=True)
            self._add(commands.READ, on_query=self._read, blocking=True)

    # -- table --------------------------------------------------------------------------------

    def _add(self, header: str, **kw: Any) -> None:
        self.table.append(_Command(header_nodes(header), **kw))

    def _add_setting(self, name: str, s: Setting) -> None:
        if s.readonly:
            self._add(s.header, on_query=lambda sess, a: self._no_args(a) or str(self._readonly_value(name)))
            return

        def on_set(sess: _Session, args: list[Any]) -> None:
            arg = self._one_text(args)
            if isinstance(arg, _Quoted):
                raise ScpiError(-104, f"{name}: string data {_shown(arg)}; allowed: {s.validator.allowed}, "
                                      "unquoted")
            try:
                value = s.validator.from_scpi(arg)
            except ValueError:
                if isinstance(s.validator, (Range, Ints)):
                    if is_decimal_number(arg):  # a number, but not one the setting takes (1.5 for an integer)
                        raise ScpiError(-120, f"{name}: {arg!r}; allowed: {s.validator.allowed}") from None
                    # a malformed number (1_0, 0x10, 1e) vs. not a number at all (abc, inf)
                    code = -120 if _NUMBER_START.match(arg) else -104
                    raise ScpiError(code, f"{name}: {_shown(arg)} is not {DECIMAL_SYNTAX}; "
                                          f"allowed: {s.validator.allowed}") from None
                raise ScpiError(-224, f"{name}: {arg!r}; allowed: {s.validator.allowed}") from None  # unknown mnemonic
            try:
                self.values[name] = s.validator.check(value)
            except Refused as r:
                self.bench.stats["rejected"] += 1
                raise ScpiError(-222, f"{name}: {r.problem} (got {arg}); allowed: {r.allowed}") from None

        def on_query(sess: _Session, args: list[Any]) -> str:
            self._no_args(args)
            return s.validator.answer(self.values[name])

        self._add(s.header, on_set=on_set, on_query=on_query)

    def lookup(self, header: str, query: bool) -> _Command:
        tokens = header.lstrip(":").upper().split(":")
        for cmd in self.table:
            if header_matches(cmd.nodes, tokens):
                if (cmd.on_query if query else cmd.on_set) is None:
                    kind = "a command, not a query" if cmd.on_set else "query only"
                    raise ScpiError(-113, f"{header}{'?' if query else ''}: {kind}")
                return cmd
        raise ScpiError(-113, f"{header}{'?' if query else ''}")

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _no_args(args: list[Any]) -> None:
        if args:
            raise ScpiError(-108, f"{len(args)} parameter(s) given; allowed: none")

    @staticmethod
    def _one_text(args: list[Any]) -> str:
        if not args:
            raise ScpiError(-109, "1 parameter needed")
        if len(args) > 1:
            raise ScpiError(-108, f"{len(args)} parameters given; allowed: 1")
        if isinstance(args[0], _Block):
            raise ScpiError(-104, "block data given; allowed: a number or mnemonic")
        return args[0]

    @staticmethod
    def _block_arg(args: list[Any], what: str) -> np.ndarray:
        if not args or not isinstance(args[-1], _Block):
            raise ScpiError(-109 if not args else -104, f"{what}: a definite-length block #<n><len><float64 data>")
        try:
            return block_values(args[-1].data)
        except ValueError as exc:
            raise ScpiError(-161, f"{what}: {exc}") from None

    def _readonly_value(self, name: str) -> Any:
        spec = self.bench.device.spec
        if name == "input_size":
            return spec.input.size
        if name == "output_size":
            return spec.output.size
        raise ScpiError(-113, f"{name}")  # pragma: no cover - every readonly setting is listed above

    def reset_settings(self) -> None:
        self.values = {n: s.default for n, s in self.settings.items() if not s.readonly}

    def idn(self) -> str:
        return f"PNN-Cluster,SIM-{self.kind.upper()},{self.bench.system}-{self.role}-{self.port},0.1.0"

    def _q_spec(self, sess: _Session, args: list[Any]) -> _Block:
        self._no_args(args)
        return _Block(json.dumps(self.bench.device.spec.to_dict()).encode())

    # -- source ---------------------------------------------------------------------------------

    def _load(self, sess: _Session, args: list[Any]) -> None:
        bench = self.bench
        bench.x = None  # a refused batch must not leave the previous one to be measured
        if len(args) > 1:
            raise ScpiError(-108, f"{len(args)} parameters given; allowed: 1 block")
        flat = self._block_arg(args, "input")
        n_in = bench.device.spec.input.size
        if flat.size == 0 or flat.size % n_in:
            bench.stats["rejected"] += 1
            raise ScpiError(-222, f"input: {flat.size} values is not a whole number of samples; "
                                  f"allowed: a multiple of {n_in} (batch x input size), at least one sample")
        try:
            bench.x = bench.device.spec.check_input(flat.reshape(-1, n_in))
        except LimitError as exc:
            bench.stats["rejected"] += 1
            raise ScpiError(-222, str(exc)) from None

    def _param_name(self, args: list[Any], n_args: int) -> str:
        if len(args) < n_args:
            raise ScpiError(-109, f"{n_args} parameters needed: <name>{',<block>' if n_args == 2 else ''}")
        if len(args) > n_args:
            raise ScpiError(-108, f"{len(args)} parameters given; allowed: {n_args}")
        name = args[0]
        if isinstance(name, _Block):
            raise ScpiError(-104, "parameter name given as a block; allowed: a name")
        names = self.bench.device.spec.param_names
        if name not in names:
            self.bench.stats["rejected"] += 1
            raise ScpiError(-224, f"params.{name}: unknown parameter; allowed: one of {list(names)}")
        return name

    def _set_param(self, sess: _Session, args: list[Any]) -> None:
        name = self._param_name(args, 2)
        flat = self._block_arg(args, f"params.{name}")
        p = self.bench.device.spec.param(name)
        if flat.size != p.numel:
            self.bench.stats["rejected"] += 1
            raise ScpiError(-222, f"params.{name}: {flat.size} values; allowed: {p.numel} (shape {p.shape})")
        try:
            self.bench.device.set_params({name: flat.reshape(p.shape)})
        except LimitError as exc:
            self.bench.stats["rejected"] += 1
            raise ScpiError(-222, str(exc)) from None

    def _q_param(self, sess: _Session, args: list[Any]) -> _Block:
        name = self._param_name(args, 1)
        return _float_block(self.bench.device.params[name].ravel())

    def _q_catalog(self, sess: _Session, args: list[Any]) -> str:
        self._no_args(args)
        return ",".join(f'"{n}"' for n in self.bench.device.spec.param_names)

    # -- sink -------------------------------------------------------------------------------------

    def _init(self, sess: _Session, args: list[Any]) -> None:
        self._no_args(args)
        bench = self.bench
        bench.result = None
        if not bench.source.values.get("output"):
            raise ScpiError(-221, "source output is off; allowed: measure after OUTP ON on the source")
        if bench.x is None:
            raise ScpiError(-221, "no batch loaded on the source (or the last one was refused)")
        try:
            bench.result = bench.device.forward(bench.x)
        except LimitError as exc:  # pragma: no cover - the batch was checked when loaded
            raise ScpiError(-222, str(exc)) from None
        except DeviceError as exc:
            raise ScpiError(-240, str(exc)) from None

    def _fetch(self, sess: _Session, args: list[Any]) -> _Block:
        self._no_args(args)
        if self.bench.result is None:
            sess.push_error(ScpiError(-230, "no acquisition to fetch (INIT first)"))
            return _Block(b"")
        return _float_block(self.bench.result.ravel())

    def _read(self, sess: _Session, args: list[Any]) -> _Block:
        try:
            self._init(sess, args)
        except ScpiError as err:
            sess.push_error(err)
            return _Block(b"")
        return self._fetch(sess, [])

    # -- common commands ----------------------------------------------------------------------------

    def common(self, sess: _Session, header: str, query: bool, args: list[Any]) -> Any:
        h = header.lstrip(":").upper()
        self._no_args(args)
        if h == "*IDN" and query:
            return self.idn()
        if h == "*OPC":
            return "1" if query else None
        if h == "*ESR" and query:
            v, sess.esr = sess.esr, 0
            return str(v)
        if query:
            raise ScpiError(-113, f"{header}?")
        if h == "*CLS":
            sess.errors.clear()
            sess.esr = 0
            return None
        if h == "*WAI":
            return None
        if h == "*RST":
            with self.bench.lock:
                self.reset_settings()
                if self.role == "source":
                    self.bench.x = None
                    self.bench.device.set_params(self.bench.device.spec.initial_params())
                else:
                    self.bench.result = None
            return None
        raise ScpiError(-113, header)


# -- connections -------------------------------------------------------------------------------


class _Session(asyncio.BufferedProtocol):
    """One client connection: framing (lines and binary blocks), an error queue, ordered execution.

    Blocks are received straight into their buffer (``get_buffer`` hands the
    kernel the block's memory), which starts small and grows as the block's
    bytes arrive, so a header alone costs nothing. The bench's sweeper
    (:meth:`check_deadlines`) closes a connection whose message does not
    arrive in time, or that sits idle too long.
    """

    def __init__(self, inst: _SimInstrument) -> None:
        self.inst = inst
        self.bench = inst.bench
        self.errors: collections.deque[str] = collections.deque()
        self.esr = 0
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._scratch = bytearray(1 << 16)
        self._scratch_view = memoryview(self._scratch)
        self._text = bytearray()
        self._pos = 0
        self._parts: list[Any] = []
        self._parts_bytes = 0
        self._block: bytearray | None = None  # the block being received: what has arrived, then room for more
        self._block_len = 0  # its declared length
        self._block_fill = 0
        self._discarding = False
        self._queue: asyncio.Queue[tuple[Any, int]] = asyncio.Queue()
        self._queued_bytes = 0
        self._read_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._closing = False  # the bench decided to close: input is ignored from then on
        self._busy = False
        self._msg_start: float | None = None  # when the first byte of the message in progress arrived
        self._last_activity = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    # -- error queue -------------------------------------------------------------------------------

    def push_error(self, err: ScpiError) -> None:
        self.bench.stats["errors"] += 1
        self.esr |= 32 if -199 <= err.code <= -100 else 16 if -299 <= err.code <= -200 else 8
        if len(self.errors) >= ERROR_QUEUE_LEN:
            self.errors[-1] = ScpiError(-350, "").text()
        else:
            self.errors.append(err.text())

    def pop_error(self) -> str:
        return self.errors.popleft() if self.errors else '0,"No error"'

    # -- asyncio protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        bench, inst = self.bench, self.inst
        if len(inst.sessions) >= bench.max_connections:
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

    def connection_lost(self, exc: Exception | None) -> None:
        self.bench._sessions.discard(self)
        self.inst.sessions.discard(self)
        self._block = None
        self._text = bytearray()
        self._parts = []
        self._msg_start = None
        self._writable.set()  # a sender waiting for the client wakes up and finds the transport closed
        self._put(None, 0)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._block is not None:
            if self._block_fill == len(self._block):
                self._grow_block()
            return memoryview(self._block)[self._block_fill:]
        return self._scratch_view

    def buffer_updated(self, nbytes: int) -> None:
        self._last_activity = time.monotonic()
        if self._closing:
            return
        if self._block is not None:
            self._block_fill += nbytes
            if self._block_fill == self._block_len:
                self._parts.append(_Block(self._block))
                self._parts_bytes += self._block_len
                self._block = None
            return
        self._text += self._scratch_view[:nbytes]
        self._scan()
        if self._closing:
            return
        in_progress = bool(self._text) or self._block is not None or bool(self._parts) or self._discarding
        if not in_progress:
            self._msg_start = None
        elif self._msg_start is None:
            self._msg_start = self._last_activity
        if (self._queue.qsize() > QUEUE_MESSAGES or self._queued_bytes > QUEUE_BYTES) and not self._read_paused:
            self._read_paused = True
            if self.transport is not None:
                self.transport.pause_reading()

    def _grow_block(self) -> None:
        """Make room for more of the block: double its buffer, never beyond the declared length."""
        buf = self._block
        assert buf is not None
        size = _block_room(len(buf), self._block_len)
        try:
            buf.extend(bytes(size - len(buf)))  # realloc: large buffers grow in place (mremap), no copy
        except BufferError:  # a view of it is still alive: copy into a new buffer instead
            grown = bytearray(size)
            grown[: len(buf)] = buf
            self._block = grown

    def _maybe_resume_reading(self) -> None:
        if (self._read_paused and not self._closing and self._queue.qsize() <= QUEUE_MESSAGES // 4
                and self._queued_bytes <= QUEUE_BYTES):
            self._read_paused = False
            if self._msg_start is not None:  # the message's clock stood still while we were not reading
                self._msg_start = time.monotonic()
            if self.transport is not None:
                self.transport.resume_reading()

    # -- limits --------------------------------------------------------------------------------------

    def check_deadlines(self, now: float) -> None:
        """Close the connection if its message is overdue or it has been idle too long (the bench's sweeper)."""
        t = self.transport
        if self._closing or t is None or t.is_closing():
            return
        bench = self.bench
        if self._msg_start is not None and not self._read_paused and now - self._msg_start > bench.command_timeout_s:
            limit = f"{bench.command_timeout_s:g} s"
            if self._block is not None:
                what = (f"a block declared {self._block_len} bytes and {self._block_fill} arrived within {limit}; "
                        f"allowed: the whole message within {limit}")
                err = ScpiError(-161, what)
            else:
                what = f"a message was not completed by a newline within {limit}"
                err = ScpiError(-100, what)
            bench.stats["timed_out"] += 1
            self.drop(what, err)
            return
        if (bench.idle_timeout_s is not None and self._msg_start is None and not self._busy and self._queue.empty()
                and t.get_write_buffer_size() == 0 and now - self._last_activity > bench.idle_timeout_s):
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
        self._text = bytearray()
        self._block = None
        self._parts = []
        self._msg_start = None
        if self.transport is not None:
            self.transport.pause_reading()
        if err is not None:
            self._put(err, 0)  # through the queue, after the answers to what came before
        self._put("close", 0)

    # -- framing -----------------------------------------------------------------------------------

    def _put(self, item: Any, nbytes: int) -> None:
        self._queued_bytes += nbytes
        self._queue.put_nowait((item, nbytes))

    def _queue_error(self, err: ScpiError) -> None:
        self._put(err, 0)  # through the queue, so errors keep their order with commands

    def _scan(self) -> None:
        text = self._text
        while True:
            m = _SPECIAL.search(text, self._pos)
            if m is None:
                self._pos = len(text)
                self._check_length()
                return
            i = m.start()
            c = text[i]
            if c == 0x0A:  # end of a program message
                piece = bytes(text[:i])
                del text[: i + 1]
                self._pos = 0
                if self._discarding:
                    self._discarding = False
                elif i > MAX_MESSAGE_BYTES:  # arrived whole in one read: same limit
                    self._queue_error(ScpiError(-223, f"message of {i} bytes; allowed: at most "
                                                      f"{MAX_MESSAGE_BYTES} outside blocks"))
                else:
                    self._parts.append(piece)
                    self._put(self._parts, self._parts_bytes + len(piece))
                self._parts = []
                self._parts_bytes = 0
                self._msg_start = None  # the next message's clock starts with its first byte
                continue
            if self._discarding:
                self._pos = i + 1
                continue
            if c in (0x22, 0x27):  # a quoted string: '#' inside it is text; a newline still ends the message
                j = text.find(bytes([c]), i + 1)
                nl = text.find(b"\n", i + 1)
                if nl >= 0 and (j < 0 or nl < j):
                    self._pos = nl  # unterminated: the parser reports it
                    continue
                if j < 0:
                    self._pos = i
                    self._check_length()
                    return
                self._pos = j + 1
                continue
            # '#': a block, or a non-decimal number (#H1F) that the parser judges later
            if i + 1 >= len(text):
                self._pos = i
                return
            d = text[i + 1]
            if d == 0x30:
                self._queue_error(ScpiError(-161, "indefinite-length blocks (#0) are not accepted; "
                                                  "allowed: definite-length #<n><len><data>"))
                self._discard_message(i + 2)
                continue
            if not 0x31 <= d <= 0x39:
                self._pos = i + 1
                continue
            n = d - 0x30
            if i + 2 + n > len(text):
                self._pos = i
                return
            digits = bytes(text[i + 2: i + 2 + n])
            if not digits.isdigit():
                self._queue_error(ScpiError(-161, f"block length {digits!r} is not {n} decimal digits"))
                self._discard_message(i + 2)
                continue
            length = int(digits)
            cap = self.bench.max_block_bytes
            if length > cap:  # checked before anything is allocated for it
                self.bench.stats["oversized_blocks"] += 1
                what = f"block of {length} bytes declared; allowed: at most {cap}"
                self.drop(what, ScpiError(-223, f"{what}; closing the connection"))
                return
            start = i + 2 + n
            self._parts.append(bytes(text[:i]))
            self._parts_bytes += i
            avail = len(text) - start
            if avail >= length:
                self._parts.append(_Block(bytearray(text[start: start + length])))  # writable, like a big one
                self._parts_bytes += length
                del text[: start + length]
                self._pos = 0
                continue
            # the block is still arriving: its buffer grows with it (get_buffer), from what is here already
            block = bytearray(_block_room(avail, length))
            block[:avail] = text[start:]
            del text[:]
            self._pos = 0
            self._block, self._block_len, self._block_fill = block, length, avail
            return

    def _discard_message(self, pos: int) -> None:
        self._discarding = True
        self._parts = []
        self._parts_bytes = 0
        self._pos = pos

    def _check_length(self) -> None:
        if len(self._text) > MAX_MESSAGE_BYTES:
            self._queue_error(ScpiError(-223, f"message longer than {MAX_MESSAGE_BYTES} bytes without a "
                                              "newline; dropped up to the next newline"))
            del self._text[:]
            self._pos = 0
            self._parts = []
            self._parts_bytes = 0
            self._discarding = True

    # -- execution ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item, nbytes = await self._queue.get()
            self._queued_bytes -= nbytes
            self._maybe_resume_reading()
            if item is None:
                return
            if isinstance(item, str) and item == "close":
                t = self.transport
                if t is not None and not t.is_closing():
                    t.close()  # answers already handed over still go out; a client that never reads them:
                    loop.call_later(self.bench.command_timeout_s, t.abort)
                return
            if isinstance(item, ScpiError):
                self.push_error(item)
                continue
            self._busy = True
            try:
                self.bench.stats["messages"] += 1
                commands = self._split(item)
                del item  # a received block is freed as soon as its command is done with it
                if commands is None:
                    continue
                if any(cmd is not None and cmd.blocking for _, _, _, cmd in commands):
                    out = await loop.run_in_executor(self.bench._worker, self._execute, commands)
                else:
                    out = self._execute(commands)
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

    def _split(self, parts: list[Any]) -> list[tuple[str, bool, list[Any], _Command | None]] | None:
        """Program message -> [(header, is_query, args, command)]; None (error queued) if it cannot be parsed."""
        blocks: list[_Block] = []
        chunks: list[str] = []
        for p in parts:
            if isinstance(p, _Block):
                chunks.append(f"\x00{len(blocks)}\x00")
                blocks.append(p)
                continue
            try:
                s = p.decode("ascii")
            except UnicodeDecodeError:
                bad = next(b for b in p if b > 0x7F)
                self.push_error(ScpiError(-101, f"byte 0x{bad:02X}; allowed: 7-bit ASCII outside blocks"))
                return None
            if "\x00" in s:
                self.push_error(ScpiError(-101, "byte 0x00; allowed: 7-bit ASCII text outside blocks"))
                return None
            chunks.append(s)
        text = "".join(chunks)
        if _open_quote(text):
            self.push_error(ScpiError(-151, "unterminated quoted string; allowed: \"...\" or '...'"))
            return None
        out = []
        for command in _split_outside_quotes(text, ";"):
            command = command.strip(" \t\r")
            if not command:
                continue
            header, _, rest = command.replace("\t", " ").partition(" ")
            m = _HEADER.match(header)
            if not m:
                self.push_error(ScpiError(-102 if "\x00" not in header else -103,
                                          f"header {_shown(header)}; allowed: NODE[:NODE...][?] or *CMD[?]"))
                continue
            query = bool(m.group(2))
            args: list[Any] = []
            rest = rest.strip(" \r")
            if rest:
                for a in _split_outside_quotes(rest, ","):
                    a = a.strip(" \r")
                    mk = _MARK.fullmatch(a) if a.startswith("\x00") else None
                    if mk:
                        args.append(blocks[int(mk.group(1))])
                    elif "\x00" in a:
                        self.push_error(ScpiError(-161, f"{m.group(1)}: text around a block; allowed: a block alone"))
                        break
                    elif not a:
                        self.push_error(ScpiError(-109, f"{m.group(1)}: empty parameter"))
                        break
                    else:
                        args.append(_Quoted(a[1:-1]) if len(a) >= 2 and a[0] == a[-1] and a[0] in "\"'" else a)
                else:
                    out.append(self._resolve(m.group(1), query, args))
                continue
            out.append(self._resolve(m.group(1), query, args))
        return out

    def _resolve(self, header: str, query: bool, args: list[Any]) -> tuple[str, bool, list[Any], _Command | None]:
        if header.lstrip(":").startswith("*"):
            blocking = header.lstrip(":").upper() == "*RST"
            return header, query, args, (_Command((), blocking=True) if blocking else None)
        try:
            return header, query, args, self.inst.lookup(header, query)
        except ScpiError as err:
            return header, query, args, _Command((), on_set=_raiser(err), on_query=_raiser(err))

    def _execute(self, commands: list[tuple[str, bool, list[Any], _Command | None]]) -> list[Any]:
        answers: list[Any] = []
        for header, query, args, cmd in commands:
            try:
                if header.lstrip(":").startswith("*"):
                    r = self.inst.common(self, header, query, args)
                else:
                    assert cmd is not None
                    fn = cmd.on_query if query else cmd.on_set
                    assert fn is not None
                    if cmd.blocking:
                        with self.bench.lock:
                            r = fn(self, args)
                    else:
                        r = fn(self, args)
            except ScpiError as err:
                self.push_error(err)
                continue
            except Exception as exc:  # a bug or a device failure must not kill the connection
                self.push_error(ScpiError(-200, f"{type(exc).__name__}: {exc}"))
                continue
            if query and r is not None:
                answers.append(r)
        if not answers:
            return []
        out: list[Any] = []
        for k, r in enumerate(answers):
            if k:
                out.append(b";")
            if isinstance(r, _Block):
                out.extend(r.pieces())
            else:
                out.append(str(r).encode("ascii", "replace"))
        out.append(b"\n")
        return out


def _block_room(arrived: int, length: int) -> int:
    """Buffer size for a block of ``length`` bytes of which ``arrived`` are here: twice that, or 64 KiB more."""
    return min(length, max(2 * arrived, arrived + BLOCK_CHUNK))


def _raiser(err: ScpiError) -> Callable[..., Any]:
    def fn(*_: Any) -> Any:
        raise err
    return fn


def _shown(s: str) -> str:
    s = s.replace("\x00", "<block>")
    return repr(s if len(s) <= 40 else s[:40] + "...")


def _open_quote(s: str) -> bool:
    quote = ""
    for ch in s:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
    return bool(quote)


def _split_outside_quotes(s: str, sep: str) -> list[str]:
    out, cur, quote = [], [], ""
    for ch in s:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            cur.append(ch)
        elif ch == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


# -- the bench -------------------------------------------------------------------------------


class SimBench:
    """Serve a simulated device as a source and a sink SCPI instrument over TCP.

    ``port`` is the source's port and ``port + 1`` the sink's; ``port=0``
    lets the OS choose both (read them from :attr:`ports` or
    :attr:`resources` after :meth:`start`). Constructing does no I/O.

    Limits (see the module's docstring): ``max_block_bytes`` (None: the
    device's largest legitimate block, :func:`default_max_block_bytes`),
    ``max_connections`` per instrument, ``idle_timeout_s`` (None: never),
    ``command_timeout_s`` and ``max_unread_bytes``.
    """

    def __init__(self, system: str = "circuit", *, device: Device | None = None, host: str = "127.0.0.1",
                 port: int = 5025, allow_remote: bool = False, instruments: tuple[str, str] | None = None,
                 max_block_bytes: int | None = None, max_connections: int = MAX_CONNECTIONS,
                 idle_timeout_s: float | None = IDLE_TIMEOUT_S, command_timeout_s: float = COMMAND_TIMEOUT_S,
                 max_unread_bytes: int = MAX_UNREAD_BYTES, **device_options: Any) -> None:
        if not allow_remote and not is_loopback_host(host):
            raise BindError(f"sim-instrument: host {host!r} is not a loopback address; allowed: 127.0.0.1, ::1, "
                            "localhost (pass allow_remote=True / --allow-remote to listen on a network)")
        if not (isinstance(port, int) and 0 <= port <= 65534):
            raise BindError(f"sim-instrument: port {port!r}; allowed: 0 (OS chooses) or 1..65534 (port+1 is the sink)")
        self.system = system if device is None else device.spec.name
        self.device = device if device is not None else make_device(system, **device_options)
        src, snk = instruments or instruments_for(self.system)
        if not issubclass(COMMAND_SETS.get(src, object), SourceCommands):
            raise BindError(f"sim-instrument: source instrument {src!r}; allowed: awg, pulse_shaper")
        if not issubclass(COMMAND_SETS.get(snk, object), SinkCommands):
            raise BindError(f"sim-instrument: sink instrument {snk!r}; allowed: scope, spectrometer")
        self.host = host
        self.port = port
        self.max_block_bytes = (default_max_block_bytes(self.device.spec) if max_block_bytes is None
                                else _whole("max_block_bytes", max_block_bytes, 1, BLOCK_LENGTH_LIMIT))
        self.max_connections = _whole("max_connections", max_connections, 1, 1 << 16)
        self.max_unread_bytes = _whole("max_unread_bytes", max_unread_bytes, 2, 1 << 40)
        self.command_timeout_s = _seconds("command_timeout_s", command_timeout_s)
        self.idle_timeout_s = None if idle_timeout_s is None else _seconds("idle_timeout_s", idle_timeout_s)
        self.source = _SimInstrument(self, COMMAND_SETS[src], "source")
        self.sink = _SimInstrument(self, COMMAND_SETS[snk], "sink")
        self.x: np.ndarray | None = None
        self.result: np.ndarray | None = None
        self.lock = threading.Lock()
        self.stats = {"connections": 0, "messages": 0, "errors": 0, "rejected": 0, "refused_connections": 0,
                      "dropped": 0, "oversized_blocks": 0, "timed_out": 0, "idle_closed": 0, "unread_closed": 0}
        self._sessions: set[_Session] = set()
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
                srv = await loop.create_server(lambda inst=inst: _Session(inst), self.host, port,
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


def _whole(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise BindError(f"sim-instrument: {name} {value!r}; allowed: an integer {low}..{high}")
    return int(value)


def _seconds(name: str, value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
            or not 0 < value < float("inf")):
        raise BindError(f"sim-instrument: {name} {value!r}; allowed: a positive, finite number of seconds")
    return float(value)
