"""The servers' limits on the command line act: each server, started as a subprocess with small limits,
enforces them while valid requests are still answered (refused values: ``tests/unit/test_server_flags.py``)."""

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

import numpy as np
import pytest
from helpers import ROOT, wait_until

MIB = 1 << 20


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


@pytest.mark.timeout(60)
def test_serve_device_runs_with_the_limits_given_and_closes_a_connection_over_the_cap(server_process):
    from pnn_cluster.drivers.zmq_client import DeviceClient

    server = server_process(["serve-device", "--system", "shg", "--ideal", "--bind", "tcp://127.0.0.1:0",
                             "--max-connections", "1", "--idle-timeout-s", "120", "--request-timeout-s", "7.5",
                             "--max-pending-reply-mb", "2", "--max-message-mb", "0.5", "--max-handshakes", "3",
                             "--max-handshakes-per-source", "2", "--handshake-timeout-s", "2.5",
                             "--max-held-mb", "4"])
    endpoint = server.wait_for(r"tcp://127\.0\.0\.1:\d+").group(0)
    port = int(endpoint.rsplit(":", 1)[1])
    with DeviceClient(endpoint, timeout_s=10, retries=0) as client:
        health = client.health()["server"]
        assert health["limits"] == {"max_message_bytes": MIB // 2, "max_frames": health["limits"]["max_frames"],
                                    "max_connections": 1, "idle_timeout_s": 120.0, "request_timeout_s": 7.5,
                                    "max_pending_reply_bytes": 2 * MIB, "max_handshakes": 3,
                                    "max_handshakes_per_source": 2, "handshake_timeout_s": 2.5,
                                    "max_held_bytes": 4 * MIB}
        # the client holds the one connection allowed: a second one is closed as its (NULL) handshake ends
        greeting = b"\xff" + bytes(8) + b"\x7f" + bytes((3, 0)) + b"NULL".ljust(20, b"\0") + bytes(32)
        ready = b"\x05READY\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
        assert closed_by_server(port, greeting + bytes((0x04, len(ready))) + ready)
        spec, params, _ = client.spec()
        x = np.zeros((2, spec.input.size))
        y = client.forward(x, params)  # the client's own connection still serves
        assert y.shape == (2, spec.output.size)
        assert client.health()["server"]["dropped"]["connection_cap"] == 1
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_sim_instrument_runs_with_the_limits_given_and_closes_over_cap_and_oversized_block(server_process):
    server = server_process(["sim-instrument", "--system", "shg", "--ideal", "--port", "0",
                             "--max-connections", "1", "--max-block-mb", "0.01", "--idle-timeout-s", "0",
                             "--command-timeout-s", "5", "--max-unread-mb", "1"])
    port = int(server.wait_for(r"^source \(\w+\): TCPIP::127\.0\.0\.1::(\d+)::SOCKET").group(1))
    sink_port = int(server.wait_for(r"^sink \(\w+\): TCPIP::127\.0\.0\.1::(\d+)::SOCKET").group(1))
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
        first.sendall(b"*IDN")  # a message in progress: the first is not idle, so it does not make room
        with socket.create_connection(("127.0.0.1", sink_port), timeout=10) as sink:
            assert ask(sink, b"*OPC?") == b"1"  # the bench's loop has read what the first sent before this
        assert closed_by_server(port)  # the second client of the source instrument
        assert ask(first, b"?").startswith(b"PNN-Cluster")  # the first still served
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

    wait_until(fresh_client_answered, 10, "a new client answered after the oversized block")
    assert server.stop() == 0
    assert any("refused a connection" in line for line in server.stderr), server.stderr[-10:]
    assert any("block of 20000 bytes declared; allowed: at most 10485" in line for line in server.stderr), \
        server.stderr[-10:]
    assert any(line.startswith("stopped after") for line in iter(server.lines.get, None))
