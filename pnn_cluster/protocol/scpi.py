"""SCPI as drivers and the simulated bench both speak it, and the instruments both are built from.

One declaration, two uses. Every instrument setting is declared once here, as
a :class:`Setting` with an SCPI header, a unit and a validator, in the style
of PyMeasure's ``Instrument.control`` and QCoDeS' ``Parameter(vals=...)``. The
command sets (:class:`WaveformGeneratorCommands`, ...) group the settings and
data headers of one kind of instrument. The pyvisa drivers
(:mod:`pnn_cluster.drivers.visa`) are these command sets plus a transport; the
simulated bench (:mod:`pnn_cluster.servers.scpi_bench`, its tables in
:mod:`pnn_cluster.servers.scpi_instruments`) builds its command table from
the same declarations, so driver and bench cannot disagree about a header, a
range or a default.

Header syntax (SCPI manuals' notation): upper case is the short form, the
whole word the long form, ``[NODE]`` is optional. Drivers write the short
form of the required nodes: ``"SOURce:VOLTage:OFFSet"`` is written
``SOUR:VOLT:OFFS 0.1`` and read back with ``SOUR:VOLT:OFFS?``; an instrument
accepts either form of every node, in any case.

Arrays travel as IEEE 488.2 definite-length binary blocks (``#<n><len><bytes>``)
of little-endian float64 (``FORM:BORD SWAP`` on most instruments), never ASCII.
Errors are entries ``<code>,"<message>"`` of the instrument's error queue
(``SYST:ERR?``), with the standard SCPI codes of :data:`SCPI_ERRORS`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pnn_cluster.devices.base import DeviceError
from pnn_cluster.devices.spec import LimitError

__all__ = [
    "BLOCK_DTYPE", "Bool", "COMMAND_SETS", "DECIMAL_SYNTAX", "EMPTY_BLOCK", "Enum", "InstrumentCommands", "Ints",
    "Node", "OscilloscopeCommands", "PulseShaperCommands", "Range", "Refused", "SCPI_ERRORS", "Setting",
    "SinkCommands", "SourceCommands", "SpectrometerCommands", "Validator", "WaveformGeneratorCommands",
    "block_header", "block_values", "format_error", "header_matches", "header_nodes", "is_decimal_number",
    "parse_decimal", "parse_error", "short_header",
]

#: IEEE 488.2 block element type of every array we move: little-endian float64
BLOCK_DTYPE = np.dtype("<f8")
#: the block of zero bytes: what a failed data query answers
EMPTY_BLOCK = b"#10"

#: standard SCPI error codes and their messages (SCPI-99, volume 2, chapter 21)
SCPI_ERRORS: dict[int, str] = {
    0: "No error",
    -100: "Command error",
    -101: "Invalid character",
    -102: "Syntax error",
    -103: "Invalid separator",
    -104: "Data type error",
    -108: "Parameter not allowed",
    -109: "Missing parameter",
    -113: "Undefined header",
    -120: "Numeric data error",
    -151: "Invalid string data",
    -161: "Invalid block data",
    -200: "Execution error",
    -221: "Settings conflict",
    -222: "Data out of range",
    -223: "Too much data",
    -224: "Illegal parameter value",
    -230: "Data corrupt or stale",
    -240: "Hardware error",
    -350: "Queue overflow",
}


# -- blocks and numbers ---------------------------------------------------------------------


def block_header(nbytes: int) -> bytes:
    """``#<n><len>``, the header of a definite-length block of ``nbytes`` bytes."""
    digits = str(int(nbytes))
    if len(digits) > 9:
        raise ValueError(f"a block of {nbytes} bytes needs more than 9 length digits; allowed: < 1e9 bytes")
    return f"#{len(digits)}{digits}".encode()


def block_values(data: Any, dtype: np.dtype | str = BLOCK_DTYPE) -> np.ndarray:
    """A block's payload viewed as little-endian values (no copy); ValueError if not a whole number of them."""
    dt = np.dtype(dtype).newbyteorder("<")
    n = memoryview(data).nbytes
    if n % dt.itemsize:
        raise ValueError(f"{n} bytes is not a whole number of {dt.itemsize}-byte values")
    return np.frombuffer(data, dtype=dt, count=n // dt.itemsize)


#: IEEE 488.2 <DECIMAL NUMERIC PROGRAM DATA> (7.7.2): an optional sign, digits with at most one '.'
#: (at least one digit), an optional exponent E/e with an optional sign and digits. ASCII digits only
#: (re.ASCII), nothing else: no whitespace, no '_' (Python's 1_0), no hex (0x10), no 'inf'/'nan'.
#: Linear time: no two quantifiers can take the same digit (the '.' separates the mantissa's two runs), so
#: a run of digits followed by a non-digit fails in one pass instead of trying every split of the run.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
#: what a number may look like, for error messages
DECIMAL_SYNTAX = "SCPI decimal numeric data: [+|-]digits[.digits][E[+|-]digits], e.g. 5, -0.5, .5, 5., 1E-3"


def is_decimal_number(text: str) -> bool:
    """True for SCPI decimal numeric data (NR1, NR2, NR3: ``5``, ``-0.5``, ``1E-3``), exactly as written.

    Stricter than ``float()``: ``" 1"``, ``"1_0"``, ``"0x10"``, ``"1e"``, ``"inf"``, ``"nan"`` and
    ``"infinity"`` are not decimal numeric data.
    """
    return isinstance(text, str) and _DECIMAL.fullmatch(text) is not None


def parse_decimal(text: str) -> float:
    """The value of SCPI decimal numeric data; ValueError for anything else (see :func:`is_decimal_number`).

    A number too large for a float64 (``1E999``) is ``inf``: the validator then refuses it as out of range.
    """
    if not is_decimal_number(text):
        raise ValueError(f"{str(text)[:40]!r} is not {DECIMAL_SYNTAX}")
    return float(text)


# -- the error queue ------------------------------------------------------------------------------


def format_error(code: int, detail: str = "") -> str:
    """An error-queue entry: ``-222,"Data out of range;<detail>"`` (quotes in the detail become ``'``)."""
    msg = SCPI_ERRORS.get(code, "Error")
    if detail:
        msg += ";" + detail
    msg = msg.replace("\n", " ").replace('"', "'")[:255]
    return f'{code},"{msg}"'


def parse_error(text: str) -> tuple[int, str]:
    """``'-222,"Data out of range"'`` -> ``(-222, "Data out of range")``."""
    code, _, msg = text.strip().partition(",")
    try:
        n = int(code)
    except ValueError:
        raise DeviceError(f"malformed SYST:ERR? answer {text!r}; expected <code>,\"<message>\"") from None
    msg = msg.strip()
    if len(msg) >= 2 and msg[0] == msg[-1] == '"':
        msg = msg[1:-1].replace('""', '"')
    return n, msg


# -- headers ----------------------------------------------------------------------------------------

_NODE_RE = re.compile(r"\[|\]|[A-Za-z*]+\d*")

#: one node of a header: (short form, long form, optional)
Node = tuple[str, str, bool]


def header_nodes(header: str) -> tuple[Node, ...]:
    """``"OUTPut[:STATe]"`` -> ``(("OUTP", "OUTPUT", False), ("STAT", "STATE", True))``."""
    nodes = []
    depth = 0
    for tok in _NODE_RE.findall(header):
        if tok == "[":
            depth += 1
        elif tok == "]":
            depth -= 1
        else:
            m = re.match(r"([A-Z*]*)([a-z]*)(\d*)$", tok)
            if not m or not m.group(1):
                raise ValueError(f"bad SCPI header node {tok!r} in {header!r}")
            short = m.group(1) + m.group(3)
            nodes.append((short, tok.upper(), depth > 0))
    if depth != 0:
        raise ValueError(f"unbalanced brackets in SCPI header {header!r}")
    return tuple(nodes)


def short_header(header: str) -> str:
    """The short form of the required nodes: what a driver writes."""
    return ":".join(short for short, _, optional in header_nodes(header) if not optional)


def header_matches(nodes: tuple[Node, ...], tokens: list[str]) -> bool:
    """Whether received header ``tokens`` (upper case, split at ``:``) name the declared ``nodes``."""
    if not nodes:
        return not tokens
    short, full, optional = nodes[0]
    if tokens and tokens[0] in (short, full) and header_matches(nodes[1:], tokens[1:]):
        return True
    return optional and header_matches(nodes[1:], tokens)


# -- validators -------------------------------------------------------------------------------------


class Refused(ValueError):
    """A validator refused a value; the caller turns it into a LimitError (driver) or an SCPI error (bench)."""

    def __init__(self, problem: str, allowed: str) -> None:
        self.problem = problem
        self.allowed = allowed
        super().__init__(f"{problem}; allowed: {allowed}")


class Validator:
    """Checks a Python value and converts it to and from SCPI text."""

    allowed: str = ""

    def check(self, value: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def to_scpi(self, value: Any) -> str:
        """How a driver writes the value."""
        return str(value)

    def answer(self, value: Any) -> str:
        """How an instrument answers a query for the value (as written, unless the type says otherwise)."""
        return self.to_scpi(value)

    def from_scpi(self, text: str) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


def _real(value: Any, allowed: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise Refused("not a real number", allowed)
    return float(value)


@dataclass(frozen=True)
class _Bounded(Validator):
    """A real number in ``[low, high]``, with a unit for the messages; subclasses say which numbers."""

    low: float
    high: float
    unit: str = ""

    def _unit(self, text: str) -> str:
        return f"{text} {self.unit}" if self.unit else text

    def _within(self, value: Any, kind_ok: Callable[[float], bool], not_kind: str) -> float:
        v = _real(value, self.allowed)
        if not kind_ok(v):
            raise Refused(not_kind, self.allowed)
        if not self.low <= v <= self.high:
            raise Refused("out of range", self.allowed)
        return v


@dataclass(frozen=True)
class Range(_Bounded):
    """A finite real number in ``[low, high]``."""

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return self._unit(f"[{self.low:.6g}, {self.high:.6g}]")

    def check(self, value: Any) -> float:
        return self._within(value, math.isfinite, "not finite")

    def to_scpi(self, value: float) -> str:
        return repr(float(value))

    def from_scpi(self, text: str) -> float:
        return parse_decimal(text)


def _is_integer(v: float) -> bool:
    return math.isfinite(v) and v == int(v)


@dataclass(frozen=True)
class Ints(_Bounded):
    """An integer in ``[low, high]``."""

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return self._unit(f"integers {self.low}..{self.high}")

    def check(self, value: Any) -> int:
        return int(self._within(value, _is_integer, "not an integer"))

    def from_scpi(self, text: str) -> int:
        v = parse_decimal(text)
        if not _is_integer(v):
            raise ValueError(f"not an integer: {text!r}")
        return int(v)


@dataclass(frozen=True)
class Enum(Validator):
    """One of a few SCPI mnemonics, compared case-insensitively."""

    choices: tuple[str, ...]

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(self.choices)

    def check(self, value: Any) -> str:
        if isinstance(value, str):
            for c in self.choices:
                if value.strip().upper() == c.upper():
                    return c
        raise Refused("not an allowed choice", self.allowed)

    def from_scpi(self, text: str) -> str:
        return self.check(text)


@dataclass(frozen=True)
class Bool(Validator):
    """ON/OFF; written as ``ON``/``OFF``, read back as ``1``/``0`` as SCPI instruments answer."""

    allowed: str = "True or False (ON/OFF)"

    def check(self, value: Any) -> bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, (int, np.integer)) and value in (0, 1):
            return bool(value)
        raise Refused("not a boolean", self.allowed)

    def to_scpi(self, value: bool) -> str:
        return "ON" if value else "OFF"

    def from_scpi(self, text: str) -> bool:
        t = text.strip().upper()
        if t in ("1", "ON"):
            return True
        if t in ("0", "OFF"):
            return False
        raise ValueError(f"not a boolean: {text!r}")

    def answer(self, value: bool) -> str:
        """``1`` or ``0``: instruments answer booleans as numbers."""
        return "1" if value else "0"


# -- settings and command sets ----------------------------------------------------------------------


class Setting:
    """A declarative, range-checked instrument setting (PyMeasure's ``control``).

    On an instrument with a transport (a driver), reading the attribute
    queries ``<header>?``; assigning validates the value, writes ``<header>
    <value>`` and, when the instrument checks errors, drains ``SYST:ERR?`` so
    that a refusal by the instrument raises at once. The bench reads the same
    object's header, validator and default to answer those messages.
    """

    def __init__(self, header: str, validator: Validator, doc: str = "", *, readonly: bool = False,
                 default: Any = None) -> None:
        self.header = header
        self.nodes = header_nodes(header)
        self.command = short_header(header)
        self.validator = validator
        self.readonly = readonly
        self.default = default
        self.__doc__ = doc
        self.name = "?"

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def validate(self, instrument: str, value: Any) -> Any:
        try:
            return self.validator.check(value)
        except Refused as r:
            raise LimitError(instrument, self.name, r.problem, repr(value), r.allowed) from None

    def __get__(self, inst: InstrumentCommands | None, owner: type | None = None) -> Any:
        if inst is None:
            return self
        text = inst.query(f"{self.command}?")
        try:
            return self.validator.from_scpi(text)
        except ValueError:
            raise DeviceError(f"{inst.name}: {self.name}: unreadable answer {text!r} to {self.command}?") from None

    def __set__(self, inst: InstrumentCommands, value: Any) -> None:
        if self.readonly:
            raise LimitError(inst.name, self.name, "read-only setting", repr(value), "reading only")
        v = self.validate(inst.name, value)
        inst.write(f"{self.command} {self.validator.to_scpi(v)}")
        if inst.check_errors_on_set:
            inst.check_errors(f"setting {self.name}")


class InstrumentCommands:
    """The SCPI command set of an instrument: its kind, role, settings and data headers.

    Subclasses only declare. A driver adds the transport (``write``,
    ``query``, ``check_errors``), through which :class:`Setting` attributes
    read and write; the bench answers the same headers.
    """

    kind: ClassVar[str] = "instrument"
    role: ClassVar[str] = ""
    ERROR: ClassVar[str] = "SYSTem:ERRor[:NEXT]"
    ERROR_COUNT: ClassVar[str] = "SYSTem:ERRor:COUNt"
    #: the device spec as JSON in a block (the simulated bench only; a real bench's spec is configured)
    SPEC: ClassVar[str] = "SYSTem:SPEC"

    name: str
    check_errors_on_set: bool = False

    @classmethod
    def settings(cls) -> dict[str, Setting]:
        """Every declared setting by attribute name, base classes' first."""
        out: dict[str, Setting] = {}
        for klass in reversed(cls.__mro__):
            for k, v in vars(klass).items():
                if isinstance(v, Setting):
                    out[k] = v
        return out

    # -- the transport a driver provides ------------------------------------------------------

    def write(self, command: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} has no transport")

    def query(self, command: str) -> str:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} has no transport")

    def check_errors(self, context: str = "") -> None:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} has no transport")


class SourceCommands(InstrumentCommands):
    """Where a batch goes out: it holds the input waveforms and the device's parameter channels.

    ``LOAD`` takes the whole batch as one block of ``batch * input_size``
    values, sample after sample; ``PARAM`` holds one named parameter array
    (``PARAM <name>,<block>``, ``PARAM? <name>``); ``PARAM_CATALOG?`` lists them.
    """

    role: ClassVar[str] = "source"
    LOAD: ClassVar[str] = "SOURce:DATA:ARBitrary"
    PARAM: ClassVar[str] = "SOURce:PARameter:DATA"
    PARAM_CATALOG: ClassVar[str] = "SOURce:PARameter:CATalog"

    input_size = Setting("SOURce:DATA:POINts", Ints(1, 1 << 20), "values per sample", readonly=True)
    output = Setting("OUTPut[:STATe]", Bool(), "output on (or shutter open)", default=False)


class SinkCommands(InstrumentCommands):
    """Where the response comes back: ``READ?`` acquires one batch and answers it as a block.

    ``READ?`` is ``INIT`` then ``FETCH?`` in one round trip.
    """

    role: ClassVar[str] = "sink"
    INIT: ClassVar[str] = "INITiate"
    FETCH: ClassVar[str] = "FETCh"
    READ: ClassVar[str] = "READ"

    output_size = Setting("SENSe:POINts", Ints(1, 1 << 20), "values per sample", readonly=True)


class WaveformGeneratorCommands(SourceCommands):
    """Arbitrary waveform generator driving an electronic or mechanical layer."""

    kind = "awg"
    amplitude = Setting("SOURce:VOLTage", Range(1e-3, 10.0, "Vpp"), "peak-to-peak amplitude", default=1.0)
    offset = Setting("SOURce:VOLTage:OFFSet", Range(-5.0, 5.0, "V"), "DC offset", default=0.0)
    sample_rate = Setting("SOURce:FUNCtion:ARBitrary:SRATe", Range(1e3, 1e9, "Sa/s"), "sample rate",
                          default=1e6)


class PulseShaperCommands(SourceCommands):
    """Spectral phase mask (a 4f pulse shaper with an SLM) for the optical layer."""

    kind = "pulse_shaper"
    LOAD = "SOURce:MASK:DATA"
    center_wavelength = Setting("SOURce:WAVelength:CENTer", Range(700.0, 1700.0, "nm"), "centre wavelength",
                                default=800.0)
    span = Setting("SOURce:WAVelength:SPAN", Range(1.0, 200.0, "nm"), "spectral span of the mask",
                   default=40.0)


class OscilloscopeCommands(SinkCommands):
    """Digitising oscilloscope reading an electronic or mechanical layer's response."""

    kind = "scope"
    READ = "READ:WAVeform"
    FETCH = "FETCh:WAVeform"
    time_scale = Setting("TIMebase:SCALe", Range(1e-9, 10.0, "s/div"), "horizontal scale", default=1e-3)
    volt_scale = Setting("CHANnel1:SCALe", Range(1e-3, 10.0, "V/div"), "vertical scale", default=0.1)
    averages = Setting("ACQuire:AVERages", Ints(1, 1024), "acquisitions averaged", default=1)


class SpectrometerCommands(SinkCommands):
    """Grating spectrometer reading the optical layer's output spectrum."""

    kind = "spectrometer"
    READ = "READ:SPECtrum"
    FETCH = "FETCh:SPECtrum"
    integration_time = Setting("SENSe:INTegration:TIME", Range(1e-5, 10.0, "s"), "exposure", default=1e-3)
    averages = Setting("SENSe:AVERage:COUNt", Ints(1, 1000), "spectra averaged", default=1)


#: the instrument kinds a configuration names, and their command sets
COMMAND_SETS: dict[str, type[InstrumentCommands]] = {
    c.kind: c for c in (WaveformGeneratorCommands, PulseShaperCommands, OscilloscopeCommands, SpectrometerCommands)
}
