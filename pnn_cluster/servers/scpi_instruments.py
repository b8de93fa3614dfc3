"""The simulated instruments of the SCPI bench: each one's table of commands, and the device the two share.

A :class:`Bench` is a source and a sink instrument in front of one simulated
device: the source takes the batch (``SOUR:DATA:ARB`` / ``SOUR:MASK:DATA``)
and holds the device parameters (``SOUR:PAR:DATA``); the sink
(``READ:WAV?`` / ``READ:SPEC?``) runs the device on the loaded batch and
answers with the response. Each :class:`SimInstrument`'s table is built from
the command set the pyvisa drivers are built from too
(:mod:`pnn_cluster.protocol.scpi`: every
:class:`~pnn_cluster.protocol.scpi.Setting`, data header, range and default),
so driver and bench share one declaration of each.

Every value is checked against the device's spec before it reaches the
device, and a refused batch also clears the loaded one, so a stale batch is
never measured. Handlers run with the connection's
:class:`~pnn_cluster.servers.scpi_session.ScpiSession` (its error queue) and
raise :class:`~pnn_cluster.servers.scpi_wire.ScpiError`; those marked
``blocking`` touch the device and run under :attr:`Bench.lock`, so
measurements of all connections happen one at a time. Nothing here does I/O.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pnn_cluster.devices.base import Device, DeviceError
from pnn_cluster.devices.spec import DeviceSpec, LimitError
from pnn_cluster.protocol.scpi import (
    BLOCK_DTYPE,
    COMMAND_SETS,
    DECIMAL_SYNTAX,
    InstrumentCommands,
    Ints,
    Node,
    Range,
    Refused,
    Setting,
    SinkCommands,
    SourceCommands,
    block_values,
    header_matches,
    header_nodes,
    is_decimal_number,
)
from pnn_cluster.servers import BindError
from pnn_cluster.servers.limits import SCPI_BLOCK_CAP_MAX, SCPI_BLOCK_CAP_MIN, SCPI_MAX_MESSAGE_BLOCK_BYTES
from pnn_cluster.servers.scpi_wire import Block, Quoted, ScpiError, shown

if TYPE_CHECKING:
    from pnn_cluster.servers.scpi_session import ScpiSession

__all__ = ["Bench", "SimInstrument", "TableEntry", "default_max_block_bytes", "default_max_message_block_bytes",
           "instruments_for"]

#: systems whose bench is optical (pulse shaper + spectrometer); the others are electronic (AWG + scope)
OPTICAL_SYSTEMS = {"shg"}

_NUMBER_START = re.compile(r"[+-]?\.?[0-9]", re.ASCII)


def default_max_block_bytes(spec: DeviceSpec) -> int:
    """The largest block a client legitimately sends to a bench of this device, within the default bounds.

    A batch of ``spec.max_batch`` samples or the largest parameter array, as float64; at least
    :data:`~.limits.SCPI_BLOCK_CAP_MIN`, at most :data:`~.limits.SCPI_BLOCK_CAP_MAX`.
    """
    item = BLOCK_DTYPE.itemsize
    largest = max([spec.max_batch * spec.input.size * item] + [p.numel * item for p in spec.params])
    return int(min(SCPI_BLOCK_CAP_MAX, max(SCPI_BLOCK_CAP_MIN, largest)))


def default_max_message_block_bytes(spec: DeviceSpec, max_block_bytes: int) -> int:
    """What the blocks of one legitimate program message hold at most, with blocks capped at ``max_block_bytes``.

    One block at that cap (a batch) and every parameter array as float64: a driver sends one block a message,
    and a client that chained the batch and all the parameters into one message would still fit.
    """
    params = sum(p.numel for p in spec.params) * BLOCK_DTYPE.itemsize
    return int(min(SCPI_MAX_MESSAGE_BLOCK_BYTES.high, max_block_bytes + params))


def instruments_for(system: str) -> tuple[str, str]:
    """Driver names of the (source, sink) instruments that front a simulated system."""
    return ("pulse_shaper", "spectrometer") if system in OPTICAL_SYSTEMS else ("awg", "scope")


class Bench:
    """A source and a sink instrument in front of one device, and what they share.

    The loaded batch (:attr:`x`), the last measurement (:attr:`result`), the
    lock that serialises access to the device, and the counters
    (:attr:`stats`) that the instruments and the connections to them keep.
    """

    def __init__(self, device: Device, system: str | None = None, instruments: tuple[str, str] | None = None) -> None:
        self.system = system or device.spec.name
        self.device = device
        src, snk = instruments or instruments_for(self.system)
        if not issubclass(COMMAND_SETS.get(src, object), SourceCommands):
            raise BindError(f"sim-instrument: source instrument {src!r}; allowed: awg, pulse_shaper")
        if not issubclass(COMMAND_SETS.get(snk, object), SinkCommands):
            raise BindError(f"sim-instrument: sink instrument {snk!r}; allowed: scope, spectrometer")
        self.source = SimInstrument(self, COMMAND_SETS[src], "source")
        self.sink = SimInstrument(self, COMMAND_SETS[snk], "sink")
        self.x: np.ndarray | None = None
        self.result: np.ndarray | None = None
        self.lock = threading.Lock()
        self.stats = {"connections": 0, "messages": 0, "errors": 0, "rejected": 0, "refused_connections": 0,
                      "dropped": 0, "oversized_blocks": 0, "oversized_messages": 0, "timed_out": 0, "idle_closed": 0,
                      "evicted": 0, "unread_closed": 0}


def float_block(arr: np.ndarray) -> Block:
    return Block(np.ascontiguousarray(arr, dtype=BLOCK_DTYPE))


@dataclass
class TableEntry:
    """A header of the table (its nodes, short and long forms) and what a command or query of it does."""

    nodes: tuple[Node, ...]
    on_set: Callable[[Any, list[Any]], Any] | None = None
    on_query: Callable[[Any, list[Any]], Any] | None = None
    blocking: bool = False  # touches the device: runs in the bench's worker thread


class SimInstrument:
    """One simulated instrument: its command set's table of handlers, and the shared bench behind it."""

    def __init__(self, bench: Bench, commands: type[InstrumentCommands], role: str) -> None:
        self.bench = bench
        self.commands = commands
        self.kind = commands.kind
        self.role = role
        self.port = 0
        self.settings = commands.settings()
        self.values: dict[str, Any] = {}
        self.table: list[TableEntry] = []
        self.sessions: set[Any] = set()  # the transport's connections to this instrument
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
        self.table.append(TableEntry(header_nodes(header), **kw))

    def _add_setting(self, name: str, s: Setting) -> None:
        if s.readonly:
            self._add(s.header, on_query=lambda sess, a: self._no_args(a) or str(self._readonly_value(name)))
            return

        def on_set(sess: ScpiSession, args: list[Any]) -> None:
            arg = self._one_text(args)
            if isinstance(arg, Quoted):
                raise ScpiError(-104, f"{name}: string data {shown(arg)}; allowed: {s.validator.allowed}, "
                                      "unquoted")
            try:
                value = s.validator.from_scpi(arg)
            except ValueError:
                if isinstance(s.validator, (Range, Ints)):
                    if is_decimal_number(arg):  # a number, but not one the setting takes (1.5 for an integer)
                        raise ScpiError(-120, f"{name}: {arg!r}; allowed: {s.validator.allowed}") from None
                    # a malformed number (1_0, 0x10, 1e) vs. not a number at all (abc, inf)
                    code = -120 if _NUMBER_START.match(arg) else -104
                    raise ScpiError(code, f"{name}: {shown(arg)} is not {DECIMAL_SYNTAX}; "
                                          f"allowed: {s.validator.allowed}") from None
                raise ScpiError(-224, f"{name}: {arg!r}; allowed: {s.validator.allowed}") from None  # unknown mnemonic
            try:
                self.values[name] = s.validator.check(value)
            except Refused as r:
                self.bench.stats["rejected"] += 1
                raise ScpiError(-222, f"{name}: {r.problem} (got {arg}); allowed: {r.allowed}") from None

        def on_query(sess: ScpiSession, args: list[Any]) -> str:
            self._no_args(args)
            return s.validator.answer(self.values[name])

        self._add(s.header, on_set=on_set, on_query=on_query)

    def lookup(self, header: str, query: bool) -> TableEntry:
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
        if isinstance(args[0], Block):
            raise ScpiError(-104, "block data given; allowed: a number or mnemonic")
        return args[0]

    @staticmethod
    def _block_arg(args: list[Any], what: str) -> np.ndarray:
        if not args or not isinstance(args[-1], Block):
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

    def _q_spec(self, sess: ScpiSession, args: list[Any]) -> Block:
        self._no_args(args)
        return Block(json.dumps(self.bench.device.spec.to_dict()).encode())

    # -- source ---------------------------------------------------------------------------------

    def _load(self, sess: ScpiSession, args: list[Any]) -> None:
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
        if isinstance(name, Block):
            raise ScpiError(-104, "parameter name given as a block; allowed: a name")
        names = self.bench.device.spec.param_names
        if name not in names:
            self.bench.stats["rejected"] += 1
            raise ScpiError(-224, f"params.{name}: unknown parameter; allowed: one of {list(names)}")
        return name

    def _set_param(self, sess: ScpiSession, args: list[Any]) -> None:
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

    def _q_param(self, sess: ScpiSession, args: list[Any]) -> Block:
        name = self._param_name(args, 1)
        return float_block(self.bench.device.params[name].ravel())

    def _q_catalog(self, sess: ScpiSession, args: list[Any]) -> str:
        self._no_args(args)
        return ",".join(f'"{n}"' for n in self.bench.device.spec.param_names)

    # -- sink -------------------------------------------------------------------------------------

    def _init(self, sess: ScpiSession, args: list[Any]) -> None:
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

    def _fetch(self, sess: ScpiSession, args: list[Any]) -> Block:
        self._no_args(args)
        if self.bench.result is None:
            sess.push_error(ScpiError(-230, "no acquisition to fetch (INIT first)"))
            return Block(b"")
        return float_block(self.bench.result.ravel())

    def _read(self, sess: ScpiSession, args: list[Any]) -> Block:
        try:
            self._init(sess, args)
        except ScpiError as err:
            sess.push_error(err)
            return Block(b"")
        return self._fetch(sess, [])

    # -- common commands ----------------------------------------------------------------------------

    def common(self, sess: ScpiSession, header: str, query: bool, args: list[Any]) -> Any:
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
