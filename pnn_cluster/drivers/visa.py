"""SCPI instruments through pyvisa, and a device composed of them.

The instruments are the declarative command sets of
:mod:`pnn_cluster.protocol.scpi` (every setting a :class:`~pnn_cluster.protocol.scpi.Setting`
with an SCPI header, a unit and a validator) plus a pyvisa transport. A wrong
value raises :class:`~pnn_cluster.devices.spec.LimitError` naming the
instrument, the setting, the value and the allowed range *before* anything
is written. The simulated bench (:mod:`pnn_cluster.servers.scpi_bench`) is
built from the same declarations, so driver and bench cannot disagree about
a header.

Constructors do no I/O. :meth:`Instrument.open` opens the resource through a
pyvisa ``ResourceManager`` (backend string ``"@py"`` for pyvisa-py, ``""`` for
the system VISA library); tests hand a fake resource to :meth:`Instrument.attach`.

A :class:`VisaDevice` is a source instrument (waveform generator or pulse
shaper: the batch goes out) plus a sink instrument (oscilloscope or
spectrometer: the response comes back), and is a device like any other to
the engine. Its spec comes from the configuration, or, when none is given,
from the source instrument's ``SYST:SPEC?`` query on connect (the simulated
bench answers it with the spec as JSON in a binary block; real instruments
do not, so a real bench's spec belongs in the configuration).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pnn_cluster.devices.base import Device, DeviceError
from pnn_cluster.devices.spec import DeviceSpec, LimitError
from pnn_cluster.protocol.scpi import (
    BLOCK_DTYPE,
    InstrumentCommands,
    OscilloscopeCommands,
    PulseShaperCommands,
    SinkCommands,
    SourceCommands,
    SpectrometerCommands,
    WaveformGeneratorCommands,
    block_values,
    parse_error,
    short_header,
)

__all__ = [
    "DRIVERS", "Instrument", "InstrumentConfig", "InstrumentError", "InstrumentTimeout", "Oscilloscope",
    "PulseShaper", "SinkInstrument", "SourceInstrument", "Spectrometer", "VisaDevice", "VisaDeviceConfig",
    "WaveformGenerator",
]

#: most errors we drain from one queue before calling the instrument broken
MAX_DRAIN = 64


class InstrumentError(DeviceError):
    """The instrument reported errors in its queue (``SYST:ERR?``)."""

    def __init__(self, instrument: str, errors: list[tuple[int, str]], context: str = "") -> None:
        self.instrument = instrument
        self.errors = list(errors)
        self.context = context
        listed = "; ".join(f"{code},\"{msg}\"" for code, msg in errors)
        where = f" after {context}" if context else ""
        super().__init__(f"{instrument}: instrument error{where}: {listed}")


class InstrumentTimeout(DeviceError):
    """No answer from the instrument within its timeout."""


# -- instruments --------------------------------------------------------------------------


class Instrument(InstrumentCommands):
    """An SCPI instrument reached through a pyvisa resource: the transport under a command set.

    ``resource`` is a VISA resource string (``TCPIP::10.0.0.7::5025::SOCKET``,
    ``TCPIP::10.0.0.7::INSTR``, ``GPIB0::12::INSTR`` ...). Raw SOCKET resources
    need the ``\\n`` terminations set here; INSTR resources ignore them.
    """

    def __init__(self, resource: str, *, name: str | None = None, timeout_s: float = 5.0, backend: str = "@py",
                 check_errors: bool = True, read_termination: str = "\n", write_termination: str = "\n") -> None:
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise LimitError(name or self.kind, "timeout_s", "must be a positive number of seconds",
                             repr(timeout_s), "> 0")
        self.resource_name = resource
        self.name = name or self.kind
        self.timeout_s = float(timeout_s)
        self.backend = backend
        self.check_errors_on_set = check_errors
        self.read_termination = read_termination
        self.write_termination = write_termination
        self._resource: Any = None
        self._own_rm: Any = None

    # -- connection ---------------------------------------------------------------------

    def open(self, resource_manager: Any = None) -> Instrument:
        """Open the resource; with no ``resource_manager`` one is made for ``backend`` and owned."""
        if self._resource is not None:
            return self
        import pyvisa

        rm = resource_manager
        if rm is None:
            rm = self._own_rm = pyvisa.ResourceManager(self.backend)
        try:
            res = rm.open_resource(self.resource_name, read_termination=self.read_termination,
                                   write_termination=self.write_termination,
                                   timeout=int(self.timeout_s * 1000))
        except Exception as exc:
            self._close_rm()
            raise DeviceError(f"{self.name}: cannot open {self.resource_name}: {exc}") from exc
        _set_nodelay(res)
        self._resource = res
        return self

    def attach(self, resource: Any) -> Instrument:
        """Use an already open resource-like object (tests pass a scripted fake)."""
        self._resource = resource
        return self

    def close(self) -> None:
        if self._resource is not None:
            try:
                self._resource.close()
            finally:
                self._resource = None
                self._close_rm()

    def _close_rm(self) -> None:
        if self._own_rm is not None:
            try:
                self._own_rm.close()
            finally:
                self._own_rm = None

    @property
    def is_open(self) -> bool:
        return self._resource is not None

    def _res(self) -> Any:
        if self._resource is None:
            raise DeviceError(f"{self.name}: not open; call open() first ({self.resource_name})")
        return self._resource

    # -- transport ------------------------------------------------------------------------

    def _io(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except Exception as exc:
            if _is_timeout(exc):
                raise InstrumentTimeout(
                    f"{self.name}: no answer to {what!r} within {self.timeout_s:g} s ({self.resource_name})"
                ) from exc
            if isinstance(exc, (DeviceError, LimitError)):
                raise
            raise DeviceError(f"{self.name}: I/O error on {what!r} ({self.resource_name}): {exc}") from exc

    def write(self, command: str) -> None:
        self._io(command, self._res().write, command)

    def query(self, command: str) -> str:
        return str(self._io(command, self._res().query, command)).strip()

    def write_block(self, command: str, values: np.ndarray) -> None:
        """Write ``<command> #<n><len><little-endian float64 bytes>``."""
        arr = np.ascontiguousarray(values, dtype=BLOCK_DTYPE)
        # as bytes with datatype "B" pyvisa prepends the header without re-packing every element
        self._io(command, self._res().write_binary_values, command, arr.tobytes(), datatype="B")

    def query_block(self, command: str, dtype: str = "d") -> np.ndarray:
        """Query a definite-length block ``#<n><len><bytes>`` and return it as a little-endian array.

        pyvisa's ``query_binary_values`` reads with the termination character
        enabled, and pyvisa-py then returns a binary block in pieces cut at
        every 0x0A byte *inside the data* (one per ~256 bytes of float64s),
        re-slicing its buffer for each: 2.4 ms for a 256x64 batch on
        loopback. The header says exactly how many bytes follow, so we read
        them in one call with the termination character off (0.45 ms), and
        copy once into a writable buffer (torch refuses read-only arrays).
        """
        return self._io(command, self._query_block, command, np.dtype(dtype).newbyteorder("<"))

    def _query_block(self, command: str, dtype: np.dtype) -> np.ndarray:
        res = self._res()
        res.write(command)
        term = res.read_termination
        res.read_termination = None
        try:
            head = res.read_bytes(2)
            if head[:1] != b"#" or not head[1:2].isdigit() or head[1:2] == b"0":
                rest = res.read_bytes(1) if head[-1:] != b"\n" else b""
                raise DeviceError(f"{self.name}: answer to {command!r} is not a definite-length block "
                                  f"#<n><len><data> (starts {head + rest!r})")
            length = int(res.read_bytes(int(head[1:2])))
            payload = bytearray(res.read_bytes(length + (len(term) if term else 0)))
        finally:
            res.read_termination = term
        try:
            return block_values(memoryview(payload)[:length], dtype)
        except ValueError as exc:
            raise DeviceError(f"{self.name}: block from {command!r}: {exc}") from None

    # -- IEEE 488.2 and SCPI common commands ---------------------------------------------------

    def idn(self) -> dict[str, str]:
        text = self.query("*IDN?")
        parts = [p.strip() for p in text.split(",")] + ["", "", "", ""]
        return {"manufacturer": parts[0], "model": parts[1], "serial": parts[2], "firmware": parts[3],
                "raw": text}

    def reset(self) -> None:
        """``*RST`` then ``*CLS``; waits for completion with ``*OPC?``."""
        self.write("*RST")
        self.write("*CLS")
        self.query("*OPC?")

    def clear(self) -> None:
        self.write("*CLS")

    def errors(self) -> list[tuple[int, str]]:
        """Drain the error queue (oldest first); empty when the instrument reports ``0,"No error"``."""
        found: list[tuple[int, str]] = []
        for _ in range(MAX_DRAIN):
            code, msg = parse_error(self.query(f"{short_header(self.ERROR)}?"))
            if code == 0:
                return found
            found.append((code, msg))
        raise InstrumentError(self.name, found, f"draining {MAX_DRAIN} errors without reaching 0,\"No error\"")

    def check_errors(self, context: str = "") -> None:
        errs = self.errors()
        if errs:
            raise InstrumentError(self.name, errs, context)

    def read_spec(self) -> DeviceSpec:
        """The device spec the instrument publishes (``SYST:SPEC?``, simulated benches only)."""
        command = f"{short_header(self.SPEC)}?"
        raw = self.query_block(command, dtype="B")
        try:
            return DeviceSpec.from_dict(json.loads(raw.tobytes().decode("utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            raise DeviceError(f"{self.name}: {command} answered no valid spec: {exc}") from exc

    # -- settings ---------------------------------------------------------------------------------

    def set(self, **values: Any) -> None:
        """Validate *all* values first, then write them: a bad one leaves the instrument untouched."""
        table = self.settings()
        for k, v in values.items():
            if k not in table:
                raise LimitError(self.name, k, "no such setting", None, f"one of {sorted(table)}")
            if table[k].readonly:
                raise LimitError(self.name, k, "read-only setting", repr(v), "reading only")
            table[k].validate(self.name, v)
        for k, v in values.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resource_name!r}, name={self.name!r})"


def _set_nodelay(res: Any) -> None:
    """Turn Nagle's algorithm off on a TCPIP resource.

    Without it the tail of a large block write waits for the instrument's
    delayed ACK: +40 ms on every batch. pyvisa-py 0.8 refuses to set
    VI_ATTR_TCPIP_NODELAY on SOCKET resources, so there we set it on its
    session's socket.
    """
    try:
        from pyvisa import constants

        res.set_visa_attribute(constants.ResourceAttribute.tcpip_nodelay, True)
        return
    except Exception:  # pyvisa-py, or not a TCPIP resource
        pass
    try:
        import socket

        sock = res.visalib.sessions[res.session].interface
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except Exception:  # another backend: its own business
        pass


def _is_timeout(exc: BaseException) -> bool:
    try:
        from pyvisa import constants, errors
    except ImportError:  # pragma: no cover
        return isinstance(exc, TimeoutError)
    if isinstance(exc, errors.VisaIOError):
        return exc.error_code == constants.StatusCode.error_timeout
    return isinstance(exc, TimeoutError)


class SourceInstrument(Instrument, SourceCommands):
    """A source instrument (:class:`~pnn_cluster.protocol.scpi.SourceCommands`) through pyvisa."""

    def load_batch(self, x: np.ndarray) -> None:
        self.write_block(f"{short_header(self.LOAD)} ", x)

    def write_param(self, name: str, values: np.ndarray) -> None:
        if not name.isidentifier():
            raise LimitError(self.name, "parameter name", "not an identifier", repr(name), "a Python identifier")
        self.write_block(f"{short_header(self.PARAM)} {name},", np.ravel(values))

    def read_param(self, name: str) -> np.ndarray:
        return self.query_block(f"{short_header(self.PARAM)}? {name}")

    def param_names(self) -> list[str]:
        text = self.query(f"{short_header(self.PARAM_CATALOG)}?")
        return [t.strip().strip('"') for t in text.split(",") if t.strip()]


class SinkInstrument(Instrument, SinkCommands):
    """A sink instrument (:class:`~pnn_cluster.protocol.scpi.SinkCommands`) through pyvisa."""

    def read_batch(self) -> np.ndarray:
        """Acquire and return the flat response (``READ?`` = ``INIT`` + ``FETCh?`` in one round trip)."""
        return self.query_block(f"{short_header(self.READ)}?")

    def fetch(self) -> np.ndarray:
        return self.query_block(f"{short_header(self.FETCH)}?")


class WaveformGenerator(SourceInstrument, WaveformGeneratorCommands):
    """Arbitrary waveform generator driving an electronic or mechanical layer."""


class PulseShaper(SourceInstrument, PulseShaperCommands):
    """Spectral phase mask (a 4f pulse shaper with an SLM) for the optical layer."""


class Oscilloscope(SinkInstrument, OscilloscopeCommands):
    """Digitising oscilloscope reading an electronic or mechanical layer's response."""


class Spectrometer(SinkInstrument, SpectrometerCommands):
    """Grating spectrometer reading the optical layer's output spectrum."""


#: the driver of each instrument kind of :data:`~pnn_cluster.protocol.scpi.COMMAND_SETS`, by the kind's name
DRIVERS: dict[str, type[Instrument]] = {
    c.kind: c for c in (WaveformGenerator, PulseShaper, Oscilloscope, Spectrometer)
}


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class InstrumentConfig:
    """One instrument: its driver name, VISA resource string, timeout and settings applied on open."""

    driver: str
    resource: str
    timeout_s: float = 5.0
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.driver not in DRIVERS:
            raise LimitError("visa config", "driver", "unknown driver", repr(self.driver), f"one of {sorted(DRIVERS)}")
        if not isinstance(self.resource, str) or not self.resource:
            raise LimitError("visa config", "resource", "must be a VISA resource string", repr(self.resource),
                             "e.g. TCPIP::127.0.0.1::5025::SOCKET")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise LimitError("visa config", "timeout_s", "must be positive", repr(self.timeout_s), "> 0 s")
        table = DRIVERS[self.driver].settings()
        for k, v in self.settings.items():
            if k not in table or table[k].readonly:
                raise LimitError("visa config", f"{self.driver}.settings.{k}", "no such writable setting", None,
                                 f"one of {sorted(n for n, s in table.items() if not s.readonly)}")
            table[k].validate(self.driver, v)

    def build(self, backend: str = "@py", name: str | None = None) -> Instrument:
        return DRIVERS[self.driver](self.resource, name=name or self.driver, timeout_s=self.timeout_s,
                                    backend=backend)


@dataclass(frozen=True)
class VisaDeviceConfig:
    """A device made of a source and a sink instrument; ``spec`` None means ask the source (``SYST:SPEC?``)."""

    source: InstrumentConfig
    sink: InstrumentConfig
    backend: str = "@py"
    spec: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not issubclass(DRIVERS[self.source.driver], SourceInstrument):
            raise LimitError("visa config", "source.driver", "not a source instrument", repr(self.source.driver),
                             f"one of {sorted(k for k, v in DRIVERS.items() if issubclass(v, SourceInstrument))}")
        if not issubclass(DRIVERS[self.sink.driver], SinkInstrument):
            raise LimitError("visa config", "sink.driver", "not a sink instrument", repr(self.sink.driver),
                             f"one of {sorted(k for k, v in DRIVERS.items() if issubclass(v, SinkInstrument))}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VisaDeviceConfig:
        unknown = set(d) - {"source", "sink", "backend", "spec"}
        if unknown:
            raise LimitError("visa config", sorted(unknown)[0], "unknown key", None, "source, sink, backend, spec")
        for key in ("source", "sink"):
            if key not in d:
                raise LimitError("visa config", key, "missing", None, "{driver, resource, timeout_s, settings}")
        return cls(source=InstrumentConfig(**d["source"]), sink=InstrumentConfig(**d["sink"]),
                   backend=d.get("backend", "@py"), spec=d.get("spec"))


# -- the device -------------------------------------------------------------------------------


class VisaDevice(Device):
    """A physical device reached through two SCPI instruments.

    ``measure`` writes the batch to the source as one block, syncs on the
    source's ``SYST:ERR?`` (which both proves the batch was taken and says
    whether it was refused), then ``READ?`` on the sink: three messages, two
    round trips. Parameters go to the source's parameter channels only when
    they change (:meth:`write_params`), and all of them on :meth:`open`, so
    the instrument always holds what the engine believes it holds.

    With ``spec=None`` the spec is read from the source (``SYST:SPEC?``) on
    :meth:`connect`; until then ``device.spec`` raises. Pass ``model`` to give
    the engine a differentiable model of the physics (the twin's starting point).
    """

    spec_on_connect = True

    def __init__(self, source: SourceInstrument, sink: SinkInstrument, spec: DeviceSpec | None = None, *,
                 backend: str = "@py", settings: Mapping[str, Mapping[str, Any]] | None = None,
                 model: Any = None, name: str | None = None) -> None:
        if not isinstance(source, SourceInstrument):
            raise TypeError(f"VisaDevice source must be a SourceInstrument, got {type(source).__name__}")
        if not isinstance(sink, SinkInstrument):
            raise TypeError(f"VisaDevice sink must be a SinkInstrument, got {type(sink).__name__}")
        self.source, self.sink = source, sink
        self.backend = backend
        self._settings = {k: dict(v) for k, v in (settings or {}).items()}
        self._model = model
        self._name = name
        self._idn: dict[str, Any] = {}
        self._rm: Any = None
        super().__init__(spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source.resource_name})"

    @classmethod
    def from_config(cls, config: VisaDeviceConfig | Mapping[str, Any], model: Any = None) -> VisaDevice:
        cfg = config if isinstance(config, VisaDeviceConfig) else VisaDeviceConfig.from_dict(config)
        spec = DeviceSpec.from_dict(cfg.spec) if cfg.spec is not None else None
        source = cfg.source.build(cfg.backend, name=cfg.source.driver)
        sink = cfg.sink.build(cfg.backend, name=cfg.sink.driver)
        return cls(source, sink, spec, backend=cfg.backend, model=model,
                   settings={"source": cfg.source.settings, "sink": cfg.sink.settings})

    # -- Device hooks ------------------------------------------------------------------------

    def open(self) -> None:
        if not (self.source.is_open and self.sink.is_open):
            import pyvisa

            self._rm = pyvisa.ResourceManager(self.backend)
            try:
                self.source.open(self._rm)
                self.sink.open(self._rm)
            except Exception:
                self.shutdown()
                raise
        try:
            self._idn = {"source": self.source.idn(), "sink": self.sink.idn()}
            self.source.clear()
            self.sink.clear()
            if not self.spec_known:
                self.learn_spec(self.source.read_spec())
            self._check_sizes()
            self.source.set(**self._settings.get("source", {}))
            self.sink.set(**self._settings.get("sink", {}))
            self._push_params(self._known_params())
            self.source.output = True
        except Exception:
            self.shutdown()
            raise

    def _check_sizes(self) -> None:
        n_in, n_out = self.source.input_size, self.sink.output_size
        if n_in != self.spec.input.size or n_out != self.spec.output.size:
            raise DeviceError(
                f"{self.spec.name}: spec says input {self.spec.input.size}, output {self.spec.output.size}; "
                f"instruments report {self.source.name} input_size={n_in}, {self.sink.name} output_size={n_out}"
            )

    def shutdown(self) -> None:
        try:
            if self.source.is_open:
                try:
                    self.source.output = False
                except DeviceError:
                    pass  # the connection may be what failed; closing must still succeed
        finally:
            self.source.close()
            self.sink.close()
            if self._rm is not None:
                try:
                    self._rm.close()
                finally:
                    self._rm = None

    def write_params(self, params: Mapping[str, np.ndarray]) -> None:
        # before open() the values are kept and pushed on open
        if self.source.is_open:
            changed = {k: v for k, v in params.items()
                       if k not in self._params or not np.array_equal(self._params[k], v)}
            self._push_params(changed)

    def _push_params(self, params: Mapping[str, np.ndarray]) -> None:
        for name, values in params.items():
            self.source.write_param(name, values)
        if params:
            self.source.check_errors("writing parameters " + ", ".join(params))

    def measure(self, x: np.ndarray, params: Mapping[str, np.ndarray]) -> np.ndarray:
        batch = x.shape[0]
        self.source.load_batch(x)
        self.source.check_errors(f"loading a batch of {batch}")
        flat = self.sink.read_batch()
        expected = batch * self.spec.output.size
        if flat.size != expected:
            errs = self.sink.errors() + self.source.errors()
            raise InstrumentError(self.sink.name, errs, f"READ? returned {flat.size} values, expected {expected}")
        return flat.reshape(batch, self.spec.output.size)

    def model(self) -> Any:
        return self._model

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "backend": self.backend,
            "source": {"driver": self.source.kind, "resource": self.source.resource_name,
                       **self._idn.get("source", {})},
            "sink": {"driver": self.sink.kind, "resource": self.sink.resource_name, **self._idn.get("sink", {})},
        }

