"""Driver tests as expected command/response exchanges (PyMeasure's expected_protocol style), no server.

``ExpectedProtocol`` is a fake pyvisa resource: it asserts the exact bytes of
every message written, in order, and answers with canned bytes.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pyvisa import constants, errors, util

from pnn_cluster.devices.base import DeviceError
from pnn_cluster.devices.spec import DeviceSpec, LimitError, ParamSpec, Port
from pnn_cluster.drivers.visa import (
    DRIVERS,
    InstrumentConfig,
    InstrumentError,
    InstrumentTimeout,
    Oscilloscope,
    PulseShaper,
    Spectrometer,
    VisaDevice,
    VisaDeviceConfig,
    WaveformGenerator,
)
from pnn_cluster.protocol.scpi import (
    COMMAND_SETS,
    Bool,
    Enum,
    Ints,
    Range,
    Refused,
    block_header,
    block_values,
    format_error,
    header_matches,
    header_nodes,
    parse_error,
    short_header,
)

NO_ERROR = b'0,"No error"\n'


def block(values, dtype: str = "<f8") -> bytes:
    data = np.ascontiguousarray(values, dtype=dtype).tobytes()
    n = str(len(data))
    return f"#{len(n)}{n}".encode() + data


class ExpectedProtocol:
    """A scripted pyvisa resource: ``[(bytes written, bytes answered or None), ...]``."""

    def __init__(self, exchanges: list[tuple[bytes, bytes | None]]) -> None:
        self.exchanges = list(exchanges)
        self.read_termination: str | None = "\n"
        self.write_termination = "\n"
        self.pending = bytearray()
        self.closed = False

    def _sent(self, data: bytes) -> None:
        assert self.exchanges, f"unexpected write {data!r}: the script is finished"
        expected, answer = self.exchanges.pop(0)
        assert data == expected, f"wrote {data[:80]!r}, expected {expected[:80]!r}"
        if answer is not None:
            self.pending += answer

    def write(self, message: str) -> int:
        data = (message + self.write_termination).encode()
        self._sent(data)
        return len(data)

    def write_binary_values(self, message: str, values, datatype: str = "f", is_big_endian: bool = False) -> int:
        data = message.encode() + util.to_ieee_block(values, datatype, is_big_endian) + b"\n"
        self._sent(data)
        return len(data)

    def _timeout(self) -> errors.VisaIOError:
        return errors.VisaIOError(constants.StatusCode.error_timeout)

    def read(self) -> str:
        i = self.pending.find(b"\n")
        if i < 0:
            raise self._timeout()
        out = bytes(self.pending[:i])
        del self.pending[: i + 1]
        return out.decode()

    def query(self, message: str) -> str:
        self.write(message)
        return self.read()

    def read_bytes(self, count: int) -> bytes:
        if len(self.pending) < count:
            raise self._timeout()
        out = bytes(self.pending[:count])
        del self.pending[:count]
        return out

    def close(self) -> None:
        self.closed = True

    def assert_done(self) -> None:
        assert not self.exchanges, f"{len(self.exchanges)} expected exchange(s) never happened: {self.exchanges[:2]}"
        assert not self.pending, f"answers never read: {bytes(self.pending)[:80]!r}"


def instrument(cls, exchanges, **kw):
    fake = ExpectedProtocol(exchanges)
    return cls("TCPIP::192.0.2.1::5025::SOCKET", **kw).attach(fake), fake


# -- headers and error strings ---------------------------------------------------------------


def test_header_nodes_and_short_forms():
    assert header_nodes("OUTPut[:STATe]") == (("OUTP", "OUTPUT", False), ("STAT", "STATE", True))
    assert short_header("SOURce:FUNCtion:ARBitrary:SRATe") == "SOUR:FUNC:ARB:SRAT"
    assert short_header("CHANnel1:SCALe") == "CHAN1:SCAL"
    assert short_header("[SENSe:]INTegration:TIME") == "INT:TIME"


def test_header_matches_short_and_long_forms_with_optional_nodes():
    nodes = header_nodes("SYSTem:ERRor[:NEXT]")
    for text in ("SYST:ERR", "SYSTEM:ERROR", "SYST:ERR:NEXT", "SYSTEM:ERR:NEXT"):
        assert header_matches(nodes, text.split(":")), text
    for text in ("SYST", "SYST:ERRO", "SYST:ERR:NEXT:NEXT"):
        assert not header_matches(nodes, text.split(":")), text


def test_parse_error():
    assert parse_error('-222,"Data out of range;amplitude: 20"') == (-222, "Data out of range;amplitude: 20")
    assert parse_error('0,"No error"') == (0, "No error")
    with pytest.raises(DeviceError, match="malformed SYST:ERR"):
        parse_error("garbage")


def test_error_entries_the_bench_formats_are_what_the_driver_parses():
    entry = format_error(-222, 'gain: "9" out of range')
    assert entry == "-222,\"Data out of range;gain: '9' out of range\""
    assert parse_error(entry) == (-222, "Data out of range;gain: '9' out of range")


def test_blocks():
    values = np.array([1.0, -2.5, 3.0])
    assert block_header(values.nbytes) == b"#224" and block(values)[:4] == b"#224"
    np.testing.assert_array_equal(block_values(values.astype("<f8").tobytes()), values)
    with pytest.raises(ValueError, match="whole number of 8-byte values"):
        block_values(b"1234567")


def test_every_instrument_kind_has_one_declaration_that_its_driver_is_built_from():
    assert set(DRIVERS) == set(COMMAND_SETS)
    for kind, driver in DRIVERS.items():
        assert issubclass(driver, COMMAND_SETS[kind]) and driver.kind == kind
        assert driver.settings() == COMMAND_SETS[kind].settings()


# -- settings ------------------------------------------------------------------------------------


def test_setting_write_checks_errors_and_reads_back():
    awg, fake = instrument(WaveformGenerator, [
        (b"SOUR:VOLT 2.5\n", None),
        (b"SYST:ERR?\n", NO_ERROR),
        (b"SOUR:VOLT?\n", b"2.5\n"),
        (b"OUTP ON\n", None),
        (b"SYST:ERR?\n", NO_ERROR),
        (b"OUTP?\n", b"1\n"),
    ])
    awg.amplitude = 2.5
    assert awg.amplitude == 2.5
    awg.output = True
    assert awg.output is True
    fake.assert_done()


@pytest.mark.parametrize("value, problem", [
    (20, "out of range"), (-1.0, "out of range"), (math.nan, "not finite"), (math.inf, "not finite"),
    ("2", "not a real number"), (True, "not a real number"),
])
def test_out_of_range_is_refused_before_anything_is_written(value, problem):
    awg, fake = instrument(WaveformGenerator, [])  # any write would fail the script
    with pytest.raises(LimitError) as ei:
        awg.amplitude = value
    e = ei.value
    assert (e.device, e.field, e.problem) == ("awg", "amplitude", problem)
    assert "[0.001, 10] Vpp" in str(e) and repr(value) in str(e)
    fake.assert_done()


def test_integer_and_readonly_settings():
    scope, fake = instrument(Oscilloscope, [])
    with pytest.raises(LimitError, match="averages: not an integer"):
        scope.averages = 2.5
    with pytest.raises(LimitError, match=r"integers 1\.\.1024"):
        scope.averages = 2000
    with pytest.raises(LimitError, match="output_size: read-only"):
        scope.output_size = 3
    fake.assert_done()


def test_set_many_validates_all_before_writing_any():
    awg, fake = instrument(WaveformGenerator, [])
    with pytest.raises(LimitError, match="offset"):
        awg.set(amplitude=1.0, offset=9.0)
    with pytest.raises(LimitError, match="no such setting"):
        awg.set(frequency=1.0)
    fake.assert_done()


def test_validators_convert_both_ways():
    assert Bool().from_scpi("1") is True and Bool().to_scpi(False) == "OFF"
    assert Enum(("NORM", "AVER")).check("aver") == "AVER"
    with pytest.raises(Refused):
        Enum(("NORM",)).check("PEAK")
    assert Ints(1, 4).from_scpi("3E0") == 3
    with pytest.raises(ValueError):
        Ints(1, 4).from_scpi("2.5")
    assert Range(0, 1).to_scpi(0.1) == "0.1"


def test_instrument_error_after_a_setting_names_the_codes():
    ps, fake = instrument(PulseShaper, [
        (b"SOUR:WAV:CENT 1550.0\n", None),
        (b"SYST:ERR?\n", b'-221,"Settings conflict;shutter open"\n'),
        (b"SYST:ERR?\n", NO_ERROR),
    ])
    with pytest.raises(InstrumentError) as ei:
        ps.center_wavelength = 1550.0
    assert ei.value.errors == [(-221, "Settings conflict;shutter open")]
    assert "pulse_shaper" in str(ei.value) and "center_wavelength" in str(ei.value)
    fake.assert_done()


# -- common commands --------------------------------------------------------------------------------


def test_idn_reset_and_clear():
    spec_, fake = instrument(Spectrometer, [
        (b"*IDN?\n", b"Acme,SPX-1,SN42,1.2.3\n"),
        (b"*RST\n", None),
        (b"*CLS\n", None),
        (b"*OPC?\n", b"1\n"),
    ])
    assert spec_.idn() == {"manufacturer": "Acme", "model": "SPX-1", "serial": "SN42", "firmware": "1.2.3",
                           "raw": "Acme,SPX-1,SN42,1.2.3"}
    spec_.reset()
    fake.assert_done()


def test_timeout_names_instrument_command_and_resource():
    awg, fake = instrument(WaveformGenerator, [(b"*IDN?\n", None)], timeout_s=0.25)
    with pytest.raises(InstrumentTimeout, match=r"awg: no answer to '\*IDN\?' within 0.25 s \(TCPIP::192"):
        awg.idn()
    fake.assert_done()


def test_error_queue_that_never_empties_is_reported():
    awg, fake = instrument(WaveformGenerator, [(b"SYST:ERR?\n", b'-100,"Command error"\n')] * 64)
    with pytest.raises(InstrumentError, match="without reaching"):
        awg.errors()


# -- binary blocks ------------------------------------------------------------------------------------


def test_block_write_is_ieee_488_2_little_endian_float64():
    x = np.array([[0.0, 0.25], [0.5, 1.0]])
    awg, fake = instrument(WaveformGenerator, [(b"SOUR:DATA:ARB " + block(x.ravel()) + b"\n", None)])
    awg.load_batch(x)
    assert fake.exchanges == []
    ps, fake = instrument(PulseShaper, [(b"SOUR:MASK:DATA #216" + np.array([1.0, 2.0]).tobytes() + b"\n", None)])
    ps.load_batch(np.array([[1.0, 2.0]]))
    fake.assert_done()


def test_block_read_survives_newline_bytes_inside_the_data():
    # 0x0A bytes inside the data must not end the read: the header says how much follows
    values = np.frombuffer(b"\n" * 24 + b"\x00" * 8, dtype="<f8")
    scope, fake = instrument(Oscilloscope, [(b"READ:WAV?\n", block(values) + b"\n")])
    got = scope.read_batch()
    np.testing.assert_array_equal(got, values)
    assert got.flags.writeable  # torch refuses read-only arrays
    fake.assert_done()


def test_answer_that_is_not_a_block_raises():
    scope, fake = instrument(Oscilloscope, [(b"READ:WAV?\n", b"1.0,2.0\n")])
    with pytest.raises(DeviceError, match="not a definite-length block"):
        scope.read_batch()


def test_parameter_channel_exchange():
    awg, fake = instrument(WaveformGenerator, [
        (b"SOUR:PAR:DATA gain," + block([1.0, 2.0]) + b"\n", None),
        (b"SOUR:PAR:DATA? gain\n", block([1.0, 2.0]) + b"\n"),
        (b"SOUR:PAR:CAT?\n", b'"gain","bias"\n'),
    ])
    awg.write_param("gain", np.array([1.0, 2.0]))
    np.testing.assert_array_equal(awg.read_param("gain"), [1.0, 2.0])
    assert awg.param_names() == ["gain", "bias"]
    with pytest.raises(LimitError, match="parameter name"):
        awg.write_param("gain;*RST", np.zeros(2))
    fake.assert_done()


# -- the device ------------------------------------------------------------------------------------------

SPEC = DeviceSpec("amp", Port(2, 0.0, 1.0, "V"), Port(3, unit="V"),
                  (ParamSpec("gain", (2,), 0.0, 2.0, unit="V/V", init=1.0),))


def opening(spec_query: bool = True) -> tuple[list, list]:
    src = [(b"*IDN?\n", b"PNN-Cluster,SIM-AWG,1,0.1\n")]
    snk = [(b"*IDN?\n", b"PNN-Cluster,SIM-SCOPE,2,0.1\n")]
    src.append((b"*CLS\n", None))
    snk.append((b"*CLS\n", None))
    if spec_query:
        src.append((b"SYST:SPEC?\n", block(np.frombuffer(json.dumps(SPEC.to_dict()).encode(), np.uint8), "u1")
                    + b"\n"))
    src.append((b"SOUR:DATA:POIN?\n", b"2\n"))
    snk.append((b"SENS:POIN?\n", b"3\n"))
    src += [(b"SOUR:PAR:DATA gain," + block([1.0, 1.0]) + b"\n", None), (b"SYST:ERR?\n", NO_ERROR),
            (b"OUTP ON\n", None), (b"SYST:ERR?\n", NO_ERROR)]
    return src, snk


def make_visa_device(src, snk, spec=None):
    source, fsrc = instrument(WaveformGenerator, src)
    sink, fsnk = instrument(Oscilloscope, snk)
    return VisaDevice(source, sink, spec), fsrc, fsnk


def test_visa_device_full_exchange_spec_from_instrument():
    src, snk = opening()
    x = np.array([[0.1, 0.2], [0.3, 0.4]])
    y = np.arange(6.0)
    src += [(b"SOUR:DATA:ARB " + block(x.ravel()) + b"\n", None), (b"SYST:ERR?\n", NO_ERROR),
            (b"SOUR:PAR:DATA gain," + block([2.0, 0.5]) + b"\n", None), (b"SYST:ERR?\n", NO_ERROR),
            (b"OUTP OFF\n", None), (b"SYST:ERR?\n", NO_ERROR)]
    snk += [(b"READ:WAV?\n", block(y) + b"\n")]
    dev, fsrc, fsnk = make_visa_device(src, snk)
    with pytest.raises(DeviceError, match=r"VisaDevice\(TCPIP::192.0.2.1::5025::SOCKET\): spec is learnt on connect"):
        dev.spec  # noqa: B018 - not known before connect
    dev.connect()
    assert dev.spec == SPEC
    np.testing.assert_array_equal(dev.forward(x), y.reshape(2, 3))
    dev.set_params({"gain": [2.0, 0.5]})
    dev.set_params({"gain": [2.0, 0.5]})  # unchanged: nothing written
    assert dev.identity()["source"]["model"] == "SIM-AWG"
    dev.close()
    fsrc.assert_done()
    fsnk.assert_done()
    assert fsrc.closed and fsnk.closed


def test_visa_device_refuses_bad_values_before_any_io():
    src, snk = opening(spec_query=False)
    dev, fsrc, fsnk = make_visa_device(src, snk, spec=SPEC)
    dev.connect()
    for bad, field in [([[0.1, 1.5]], "input[0,1]"), ([[0.1, math.nan]], "input[0,1]"), ([[0.1, 0.2, 0.3]], "input")]:
        with pytest.raises(LimitError) as ei:
            dev.forward(np.array(bad))
        assert ei.value.field == field
    with pytest.raises(LimitError, match=r"params.gain\[1\].*allowed: \[0, 2\] V/V"):
        dev.set_params({"gain": [1.0, 3.0]})
    assert dev.stats["rejected"] == 4
    fsrc.assert_done()
    fsnk.assert_done()


def test_visa_device_reports_bench_errors_when_a_batch_is_refused():
    src, snk = opening(spec_query=False)
    x = np.array([[0.1, 0.2]])
    src += [(b"SOUR:DATA:ARB " + block(x.ravel()) + b"\n", None),
            (b"SYST:ERR?\n", b'-222,"Data out of range;input[0,1]"\n'), (b"SYST:ERR?\n", NO_ERROR)]
    dev, fsrc, fsnk = make_visa_device(src, snk, spec=SPEC)
    dev.connect()
    with pytest.raises(InstrumentError, match="-222") as ei:
        dev.forward(x)
    assert ei.value.errors == [(-222, "Data out of range;input[0,1]")]
    fsrc.assert_done()


def test_visa_device_short_answer_drains_both_queues():
    src, snk = opening(spec_query=False)
    x = np.array([[0.1, 0.2]])
    src += [(b"SOUR:DATA:ARB " + block(x.ravel()) + b"\n", None), (b"SYST:ERR?\n", NO_ERROR),
            (b"SYST:ERR?\n", NO_ERROR)]
    snk += [(b"READ:WAV?\n", b"#10\n"), (b"SYST:ERR?\n", b'-221,"Settings conflict;output off"\n'),
            (b"SYST:ERR?\n", NO_ERROR)]
    dev, fsrc, fsnk = make_visa_device(src, snk, spec=SPEC)
    dev.connect()
    with pytest.raises(InstrumentError, match="READ\\? returned 0 values, expected 3"):
        dev.forward(x)
    fsrc.assert_done()
    fsnk.assert_done()


def test_visa_device_spec_and_instrument_sizes_must_agree():
    src = [(b"*IDN?\n", b"a,b,c,d\n"), (b"*CLS\n", None), (b"SOUR:DATA:POIN?\n", b"5\n"), (b"OUTP OFF\n", None),
           (b"SYST:ERR?\n", NO_ERROR)]
    snk = [(b"*IDN?\n", b"a,b,c,d\n"), (b"*CLS\n", None), (b"SENS:POIN?\n", b"3\n")]
    dev, fsrc, fsnk = make_visa_device(src, snk, spec=SPEC)
    with pytest.raises(DeviceError, match="input_size=5"):
        dev.connect()
    assert not dev.connected


def test_config_validation_names_the_field():
    with pytest.raises(LimitError, match="driver"):
        InstrumentConfig(driver="dmm", resource="TCPIP::1.2.3.4::INSTR")
    with pytest.raises(LimitError, match="awg: amplitude: out of range"):
        InstrumentConfig(driver="awg", resource="TCPIP::1.2.3.4::INSTR", settings={"amplitude": 99})
    with pytest.raises(LimitError, match="sink.driver"):
        VisaDeviceConfig.from_dict({"source": {"driver": "awg", "resource": "A"},
                                    "sink": {"driver": "pulse_shaper", "resource": "B"}})
    cfg = VisaDeviceConfig.from_dict({"source": {"driver": "pulse_shaper", "resource": "A", "timeout_s": 2},
                                      "sink": {"driver": "spectrometer", "resource": "B"}, "spec": SPEC.to_dict()})
    dev = VisaDevice.from_config(cfg)  # no I/O
    assert dev.spec == SPEC and not dev.connected and dev.source.timeout_s == 2
