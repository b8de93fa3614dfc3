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
* A message longer than 1 MiB outside a block is dropped with -223; a block
  declaring more than ``max_block_bytes`` closes the connection (the stream
  cannot be resynchronised without trusting that length).

Several clients may connect to each instrument; commands of one connection
run in order, measurements of all connections one at a time.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pnn_cluster.devices import make_device
from pnn_cluster.devices.base import Device, DeviceError
from pnn_cluster.devices.spec import LimitError
from pnn_cluster.protocol.scpi import (
    BLOCK_DTYPE,
    COMMAND_SETS,
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

__all__ = ["ScpiError", "SimBench", "instruments_for"]

ERROR_QUEUE_LEN = 32
MAX_MESSAGE_BYTES = 1 << 20
MAX_BLOCK_BYTES = 256 << 20
MAX_UNREAD_BYTES = 512 << 20
#: systems whose bench is optical (pulse shaper + spectrometer); the others are electronic (AWG + scope)
OPTICAL_SYSTEMS = {"shg"}

_SPECIAL = re.compile(rb"[\n#\"']")
_HEADER = re.compile(r"^:?(\*[A-Za-z]+|[A-Za-z][A-Za-z0-9]*(?::[A-Za-z][A-Za-z0-9]*)*)(\?)?$")
_MARK = re.compile("\x00(\\d+)\x00$")


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
            try:
                value = s.validator.from_scpi(arg)
            except ValueError:
                if isinstance(s.validator, (Range, Ints)):
                    # a number that is not acceptable (1.5 for an integer) vs. not a number at all
                    code = -120 if is_decimal_number(arg) else -104
                else:
                    code = -224  # a mnemonic the setting does not know
                raise ScpiError(code, f"{name}: {arg!r}; allowed: {s.validator.allowed}") from None
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

    Blocks are received straight into their final buffer (``get_buffer`` hands
    the kernel the block's memory), so a batch is copied once, by the kernel.
    """

    def __init__(self, inst: _SimInstrument) -> None:
        self.inst = inst
        self.bench = inst.bench
        self.errors: collections.deque[str] = collections.deque()
        self.esr = 0
        self.transport: asyncio.Transport | None = None
        self._scratch = bytearray(1 << 16)
        self._scratch_view = memoryview(self._scratch)
        self._text = bytearray()
        self._pos = 0
        self._parts: list[Any] = []
        self._block: bytearray | None = None
        self._block_fill = 0
        self._discarding = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._paused = False
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
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.bench.stats["connections"] += 1
        self.bench._sessions.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def connection_lost(self, exc: Exception | None) -> None:
        self.bench._sessions.discard(self)
        self._queue.put_nowait(None)

    def eof_received(self) -> bool:
        return False

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._block is not None:
            return memoryview(self._block)[self._block_fill:]
        return self._scratch_view

    def buffer_updated(self, nbytes: int) -> None:
        if self._block is not None:
            self._block_fill += nbytes
            if self._block_fill == len(self._block):
                self._parts.append(_Block(self._block))
                self._block = None
            return
        self._text += self._scratch_view[:nbytes]
        self._scan()
        if self._queue.qsize() > 16 and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    # -- framing -----------------------------------------------------------------------------------

    def _queue_error(self, err: ScpiError) -> None:
        self._queue.put_nowait(err)  # through the queue, so errors keep their order with commands

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
                    self._queue.put_nowait(self._parts)
                self._parts = []
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
            if length > self.bench.max_block_bytes:
                self._queue_error(ScpiError(-223, f"block of {length} bytes; allowed: at most "
                                                  f"{self.bench.max_block_bytes}; closing the connection"))
                self._queue.put_nowait("close")
                self._text = bytearray()
                self._block = None
                return
            start = i + 2 + n
            self._parts.append(bytes(text[:i]))
            avail = len(text) - start
            if avail >= length:
                self._parts.append(_Block(bytearray(text[start: start + length])))  # writable, like a big one
                del text[: start + length]
                self._pos = 0
                continue
            block = bytearray(length)
            block[:avail] = text[start:]
            del text[:]
            self._pos = 0
            self._block, self._block_fill = block, avail
            return

    def _discard_message(self, pos: int) -> None:
        self._discarding = True
        self._parts = []
        self._pos = pos

    def _check_length(self) -> None:
        if len(self._text) > MAX_MESSAGE_BYTES:
            self._queue_error(ScpiError(-223, f"message longer than {MAX_MESSAGE_BYTES} bytes without a "
                                              "newline; dropped up to the next newline"))
            del self._text[:]
            self._pos = 0
            self._parts = []
            self._discarding = True

    # -- execution ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._queue.get()
            if self._paused and self._queue.qsize() < 4 and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
            if item is None:
                return
            if item == "close":
                if self.transport is not None:
                    self.transport.close()
                return
            if isinstance(item, ScpiError):
                self.push_error(item)
                continue
            self.bench.stats["messages"] += 1
            commands = self._split(item)
            if commands is None:
                continue
            if any(cmd is not None and cmd.blocking for _, _, _, cmd in commands):
                out = await loop.run_in_executor(self.bench._worker, self._execute, commands)
            else:
                out = self._execute(commands)
            if out and self.transport is not None and not self.transport.is_closing():
                # one write per piece: a block goes to the socket straight from the array's memory
                # (writelines would join everything into one new bytes object first)
                for piece in out:
                    self.transport.write(piece)
                if self.transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
                    self.transport.close()  # a client that sends queries but never reads its answers

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
                        args.append(a[1:-1] if len(a) >= 2 and a[0] == a[-1] and a[0] in "\"'" else a)
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
    """

    def __init__(self, system: str = "circuit", *, device: Device | None = None, host: str = "127.0.0.1",
                 port: int = 5025, allow_remote: bool = False, instruments: tuple[str, str] | None = None,
                 max_block_bytes: int = MAX_BLOCK_BYTES, **device_options: Any) -> None:
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
        self.max_block_bytes = int(max_block_bytes)
        self.source = _SimInstrument(self, COMMAND_SETS[src], "source")
        self.sink = _SimInstrument(self, COMMAND_SETS[snk], "sink")
        self.x: np.ndarray | None = None
        self.result: np.ndarray | None = None
        self.lock = threading.Lock()
        self.stats = {"connections": 0, "messages": 0, "errors": 0, "rejected": 0}
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
        await self._stop.wait()
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
