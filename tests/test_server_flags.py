"""The servers' limits on the command line: serve-device and sim-instrument flags.

Refused values are checked in process (exit 2, one line on standard error
naming the flag, the value and what is allowed, before any device or socket
is opened); one system test per server starts it as a subprocess with small
limits and checks that they act while valid requests are still answered.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pnn_cluster.cli import main

ROOT = Path(__file__).resolve().parents[1]
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


# -- the limits act, in a server subprocess ------------------------------------------------------------------------


class ServerProcess:
    """``python -m pnn_cluster.cli ARGS`` with its stdout lines in a queue; stopped with SIGTERM."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "pnn_cluster.cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _pump(stream, put: Callable[[str | None], None]) -> None:
        for line in stream:
            put(line.rstrip("\n"))
        put(None)

    def wait_for(self, pattern: str, timeout_s: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        seen: list[str] = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"the server exited: stdout {seen}, stderr {self.stderr[-10:]}")
            seen.append(line)
            if m := re.search(pattern, line):
                return m
        pytest.fail(f"no line matching {pattern!r} within {timeout_s} s: stdout {seen}, stderr {self.stderr[-10:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(5)


@pytest.fixture
def server_process() -> Iterator[Callable[[list[str]], ServerProcess]]:
    started: list[ServerProcess] = []

    def start(args: list[str]) -> ServerProcess:
        started.append(ServerProcess(args))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def closed_by_server(port: int, send: bytes = b"", timeout_s: float = 5.0) -> bool:
    """Connect (and send ``send``): True if the server closes the connection within ``timeout_s``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        if send:
            sock.sendall(send)
        try:
            while sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
        return True


def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s} s")
        threading.Event().wait(0.02)  # a poll interval, not a fixed wait for an outcome


@pytest.mark.system
@pytest.mark.timeout(60)
def test_serve_device_runs_with_the_limits_given_and_closes_a_connection_over_the_cap(server_process):
    from pnn_cluster.drivers.zmq_client import DeviceClient

    server = server_process(["serve-device", "--system", "shg", "--ideal", "--bind", "tcp://127.0.0.1:0",
                             "--max-connections", "1", "--idle-timeout-s", "120", "--request-timeout-s", "7.5",
                             "--max-pending-reply-mb", "2", "--max-message-mb", "0.5"])
    endpoint = server.wait_for(r"tcp://127\.0\.0\.1:\d+").group(0)
    port = int(endpoint.rsplit(":", 1)[1])
    with DeviceClient(endpoint, timeout_s=10, retries=0) as client:
        health = client.health()["server"]
        assert health["limits"] == {"max_message_bytes": MIB // 2, "max_frames": health["limits"]["max_frames"],
                                    "max_connections": 1, "idle_timeout_s": 120.0, "request_timeout_s": 7.5,
                                    "max_pending_reply_bytes": 2 * MIB}
        # the client holds the one connection allowed: a second one is accepted and closed at once
        assert closed_by_server(port)
        spec, params, _ = client.spec()
        x = np.zeros((2, spec.input.size))
        y = client.forward(x, params)  # the client's own connection still serves
        assert y.shape == (2, spec.output.size)
        assert client.health()["server"]["dropped"]["connection_cap"] == 1
    assert server.stop() == 0


@pytest.mark.system
@pytest.mark.timeout(60)
def test_sim_instrument_runs_with_the_limits_given_and_closes_over_cap_and_oversized_block(server_process):
    server = server_process(["sim-instrument", "--system", "shg", "--ideal", "--port", "0",
                             "--max-connections", "1", "--max-block-mb", "0.01", "--idle-timeout-s", "0",
                             "--command-timeout-s", "5", "--max-unread-mb", "1"])
    port = int(server.wait_for(r"^source \(\w+\): TCPIP::127\.0\.0\.1::(\d+)::SOCKET").group(1))
    server.wait_for(r"^serving")

    def ask(sock: socket.socket, message: bytes) -> bytes:
        sock.sendall(message + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            got = sock.recv(4096)
            assert got, f"closed while waiting for the answer to {message!r}"
            answer += got
        return answer[:-1]

    with socket.create_connection(("127.0.0.1", port), timeout=10) as first:
        assert ask(first, b"*IDN?").startswith(b"PNN-Cluster")
        assert closed_by_server(port)  # the second client of the source instrument
        assert ask(first, b"*IDN?").startswith(b"PNN-Cluster")  # the first still served
        # a block header declaring more than 0.01 MiB (10485 bytes) closes the connection
        first.sendall(b"SOUR:MASK:DATA #520000" + bytes(64))
        first.settimeout(5)
        try:
            assert first.recv(4096) == b""
        except ConnectionResetError:
            pass

    def fresh_client_answered() -> bool:  # once the bench has let the closed connection go, a new one is served
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                return ask(sock, b"*IDN?").startswith(b"PNN-Cluster")
        except (AssertionError, OSError):
            return False

    until(fresh_client_answered, 10, "a new client answered after the oversized block")
    assert server.stop() == 0
    assert any("refused a connection" in line for line in server.stderr), server.stderr[-10:]
    assert any("block of 20000 bytes declared; allowed: at most 10485" in line for line in server.stderr), \
        server.stderr[-10:]
    assert any(line.startswith("stopped after") for line in iter(server.lines.get, None))
