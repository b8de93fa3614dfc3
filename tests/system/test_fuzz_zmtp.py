"""A fuzz target over the device server's ZMTP parser: greetings, frame headers, commands and handshakes.

Hypothesis writes byte streams (a greeting or none, a NULL handshake or none, then frames whose flags, sizes
and bodies are drawn, some declaring more than they carry, some cut short, or plain random bytes) and sends
each on its own connection to a server with small limits. Whatever arrives, the server must refuse it through
its own checks: no connection may reach the catch-all that logs an unexpected error; every connection the
fuzzer closes is closed by the server too; and a valid client is answered afterwards. Bounded in time by
``max_examples`` (a few seconds here).
"""

from __future__ import annotations

import contextlib
import logging
import socket

import numpy as np
import pytest
from helpers import Gain, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pnn_cluster.drivers.zmq_client import DeviceClient
from pnn_cluster.servers.zmq_server import DeviceServer

GREETING = b"\xff" + bytes(8) + b"\x7f" + bytes((3, 0)) + b"NULL".ljust(20, b"\0") + bytes(32)
READY = b"\x05READY\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
HANDSHAKE = GREETING + bytes((0x04, len(READY))) + READY


def frame(flags: int, body: bytes, declared: int | None, long_form: bool) -> bytes:
    size = len(body) if declared is None else declared
    if long_form or size > 255:
        return bytes((flags | 0x02,)) + size.to_bytes(8, "big") + body
    return bytes((flags & ~0x02 & 0xFF, size)) + body


frames = st.builds(
    frame,
    flags=st.one_of(st.sampled_from([0x00, 0x01, 0x04, 0x05]), st.integers(0, 255)),
    body=st.one_of(st.binary(max_size=64),
                   st.builds(lambda name, data: bytes((len(name),)) + name + data,  # a command: its name, its data
                             st.one_of(st.sampled_from([b"PING", b"PONG", b"ERROR", b"READY", b"SUBSCRIBE"]),
                                       st.binary(min_size=1, max_size=12)), st.binary(max_size=32)),
                   st.sampled_from([b"\x04PING\x00\x00", b"\x04PING", b'{"v": 1, "op": "health"}', READY, b""])),
    declared=st.one_of(st.none(), st.integers(0, 1 << 20), st.integers(0, 2**64 - 1)),
    long_form=st.booleans(),
)
streams = st.one_of(
    st.builds(lambda prefix, fs, cut: (prefix + b"".join(fs))[:cut],
              st.sampled_from([b"", GREETING, HANDSHAKE, GREETING[:10], GREETING.replace(b"NULL", b"CURVE")]),
              st.lists(frames, max_size=6), st.integers(0, 1 << 12)),
    st.binary(max_size=512),
)


@pytest.fixture(scope="module")
def server():
    with DeviceServer(Gain(), "tcp://127.0.0.1:0", max_message_bytes=64 * 1024, handshake_timeout_s=2.0,
                      request_timeout_s=2.0, max_handshakes=64, max_handshakes_per_source=64) as srv:
        yield srv


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=streams)
def test_no_byte_stream_reaches_the_servers_catch_all(server, caplog, data):
    host, port = server.endpoint[len("tcp://"):].rsplit(":", 1)
    with caplog.at_level(logging.ERROR, logger="pnn_cluster.servers.zmtp"):
        with socket.create_connection((host, int(port)), timeout=5) as sock, contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(2)
            while sock.recv(65536):  # until the server closes: it has read all of it and refused or answered it
                pass
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]


def test_after_the_fuzz_every_connection_is_closed_and_a_client_is_answered(server):
    # runs after the fuzz (file order): the fuzzer's connections are gone and the server still serves
    wait_until(lambda: server.health()["server"]["connections"] == 0, 10, "the fuzzer's connections to close")
    with DeviceClient(server.endpoint, timeout_s=10) as client:
        np.testing.assert_array_equal(client.forward(np.full((3, 4), 0.5)), 0.5)
    assert server.health()["server"]["connections_accepted"] > 1
