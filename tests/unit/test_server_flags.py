"""The servers' limits on the command line: serve-device and sim-instrument flags.

Refused values are checked in process (exit 2, one line on standard error
naming the flag, the value and what is allowed, before any device or socket
is opened). That the limits act, on each server started as a subprocess with
small limits: ``tests/system/test_server_flags.py``.
"""

from __future__ import annotations

import pytest

from pnn_cluster.cli import main

MIB = 1 << 20


# -- refused values, in process ----------------------------------------------------------------------------------

SERVE_DEVICE_REFUSED = [
    ("--max-connections", "0", "an integer 1..4096"),
    ("--max-connections", "4097", "an integer 1..4096"),
    ("--max-connections", "2.5", "an integer 1..4096"),
    ("--max-connections", "many", "an integer 1..4096"),
    ("--max-connections", "1_0", "an integer 1..4096"),
    ("--idle-timeout-s", "0", "seconds, 0 < S <= 86400"),
    ("--idle-timeout-s", "-5", "seconds, 0 < S <= 86400"),
    ("--idle-timeout-s", "nan", "seconds, 0 < S <= 86400"),
    ("--idle-timeout-s", "90000", "seconds, 0 < S <= 86400"),
    ("--request-timeout-s", "0", "seconds, 0 < S <= 86400"),
    ("--request-timeout-s", "inf", "seconds, 0 < S <= 86400"),
    ("--request-timeout-s", "0x10", "seconds, 0 < S <= 86400"),
    ("--max-pending-reply-mb", "-1", "MiB, 0 .. 1048576"),
    ("--max-pending-reply-mb", "2e6", "MiB, 0 .. 1048576"),
    ("--max-pending-reply-mb", "lots", "MiB, 0 .. 1048576"),
    ("--max-message-mb", "0", "MiB, 0.001 .. 1048576"),
    ("--max-message-mb", "abc", "MiB, 0.001 .. 1048576"),
]

SIM_INSTRUMENT_REFUSED = [
    ("--max-block-mb", "0", "MiB, 0.001 .. 953"),
    ("--max-block-mb", "954", "MiB, 0.001 .. 953"),
    ("--max-block-mb", "big", "MiB, 0.001 .. 953"),
    ("--max-connections", "0", "an integer 1..65536"),
    ("--max-connections", "1.5", "an integer 1..65536"),
    ("--idle-timeout-s", "-1", "seconds, 0 < S <= 86400, or 0 (never)"),
    ("--idle-timeout-s", "inf", "seconds, 0 < S <= 86400, or 0 (never)"),
    ("--command-timeout-s", "0", "seconds, 0 < S <= 86400"),
    ("--command-timeout-s", "1e", "seconds, 0 < S <= 86400"),
    ("--max-unread-mb", "0", "MiB, 0.001 .. 1048576"),
    ("--max-unread-mb", "nan", "MiB, 0.001 .. 1048576"),
]


def _one_usage_line(capsys: pytest.CaptureFixture[str], command: str, flag: str, value: str, allowed: str) -> None:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines == [f"pnn-cluster {command}: error: {flag} {value}; allowed: {allowed}"
                     + (" (a block header declares at most 999999999 bytes)" if flag == "--max-block-mb" else "")], \
        captured.err
    assert captured.out == ""


@pytest.mark.parametrize(("flag", "value", "allowed"), SERVE_DEVICE_REFUSED)
def test_serve_device_refuses_a_bad_limit_with_one_usage_line(flag, value, allowed, capsys):
    # port 1 would fail to bind: the flag is refused before any socket is opened
    assert main(["serve-device", "--system", "shg", "--bind", "tcp://127.0.0.1:1", f"{flag}={value}"]) == 2
    _one_usage_line(capsys, "serve-device", flag, value, allowed)


@pytest.mark.parametrize(("flag", "value", "allowed"), SIM_INSTRUMENT_REFUSED)
def test_sim_instrument_refuses_a_bad_limit_with_one_usage_line(flag, value, allowed, capsys):
    assert main(["sim-instrument", "--system", "shg", "--port", "1", f"{flag}={value}"]) == 2
    _one_usage_line(capsys, "sim-instrument", flag, value, allowed)


def test_flag_defaults_are_the_servers_defaults():
    from pnn_cluster.commands import serve_device, sim_instrument
    from pnn_cluster.servers import scpi_bench, zmq_server

    assert serve_device.DEFAULT_MAX_CONNECTIONS == zmq_server.DEFAULT_MAX_CONNECTIONS
    assert serve_device.DEFAULT_IDLE_TIMEOUT_S == zmq_server.DEFAULT_IDLE_TIMEOUT_S
    assert serve_device.DEFAULT_REQUEST_TIMEOUT_S == zmq_server.DEFAULT_REQUEST_TIMEOUT_S
    assert serve_device.DEFAULT_MAX_PENDING_REPLY_BYTES == zmq_server.DEFAULT_MAX_PENDING_REPLY_BYTES
    assert sim_instrument.MAX_CONNECTIONS == scpi_bench.MAX_CONNECTIONS
    assert sim_instrument.IDLE_TIMEOUT_S == scpi_bench.IDLE_TIMEOUT_S
    assert sim_instrument.COMMAND_TIMEOUT_S == scpi_bench.COMMAND_TIMEOUT_S
    assert sim_instrument.MAX_UNREAD_BYTES == scpi_bench.MAX_UNREAD_BYTES
    assert sim_instrument.MAX_BLOCK_MB * MIB <= scpi_bench.BLOCK_LENGTH_LIMIT < (sim_instrument.MAX_BLOCK_MB + 1) * MIB
