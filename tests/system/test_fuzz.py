"""Fuzzing the servers: malformed, garbage and oversized messages must never crash them.

ZeroMQ server: every message that reaches it gets exactly one error reply
(a message over the size or frame-count limit is cut off while it arrives and
its connection dropped, as the protocol says); SCPI bench: every malformed line leaves an error in the
queue (or, for a block that cannot be trusted, closes the connection).
Afterwards a valid request is still answered correctly.
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
import zmq

from pnn_cluster.devices import Imperfections, make_device
from pnn_cluster.drivers.visa import VisaDevice
from pnn_cluster.drivers.zmq_client import DeviceClient
from pnn_cluster.protocol.zmq import MAX_HEADER_BYTES
from pnn_cluster.servers.scpi_bench import SimBench
from pnn_cluster.servers.zmq_server import DeviceServer

IDEAL = Imperfections.ideal(seed=11)
MAX_MSG = 1 << 20
REPLY_TIMEOUT_MS = 5000


def h(**kw) -> bytes:
    return json.dumps({"v": 1, "op": "forward", "id": 1, **kw}).encode()


def desc(field="x", dtype="<f8", shape=(2, 12)):
    return {"field": field, "dtype": dtype, "shape": list(shape)}


def zmq_fuzz_messages(rng: np.random.Generator) -> list[list[bytes]]:
    """Messages (without the routing id) every one of which must be refused with an error reply."""
    msgs: list[list[bytes]] = []
    ok_x = np.full((2, 12), 0.5).tobytes()

    def garbage(n: int) -> bytes:
        return rng.integers(0, 256, n, dtype=np.uint8).tobytes()

    # 1. garbage: no empty delimiter frame
    for _ in range(200):
        frames = [garbage(int(rng.integers(1, 300)))] + [garbage(int(rng.integers(0, 300)))
                                                         for _ in range(int(rng.integers(0, 4)))]
        msgs.append(frames)
    # 2. delimiter, then a header that is not JSON (or not UTF-8), or missing
    for _ in range(150):
        msgs.append([b"", garbage(int(rng.integers(1, 200))) + b"\xff"])
    msgs += [[b""]] * 10
    # 3. JSON that breaks the header rules
    bad_headers = [
        b"[]", b"1", b'"forward"', b"null", b"{}", b'{"op": "forward"}', b'{"v": 2, "op": "health"}',
        b'{"v": true, "op": "health"}', b'{"v": "1", "op": "health"}', b'{"v": 1}', b'{"v": 1, "op": 5}',
        b'{"v": 1, "op": "reboot"}', b'{"v": 1, "op": "health", "extra": 1}', b'{"v": 1, "op": "health", "id": []}',
        b'{"v": 1, "op": "health", "id": 1.5}', b'{"v": 1, "op": "health", "id": true}',
        b'{"v": 1, "op": "health", "id": NaN}', b'{"v": 1, "op": "health", "id": "' + b"x" * 100 + b'"}',
        b'{"v": 1, "op": "health", "arrays": 7}', b'{"v": 1, "op": "health"', b'{"v": 1, "op": "health"}}',
        b"[" * 5000 + b"]" * 5000,
    ]
    for k in range(220):
        msgs.append([b"", bad_headers[k % len(bad_headers)]])
    # 4. array descriptors that do not match the frames, bad dtypes and shapes, wrong fields
    desc_cases = [
        ([desc()], []),
        ([], [ok_x]),
        ([desc(), desc(field="params.phase", shape=(24,))], [ok_x]),
        ([desc(dtype="<i8")], [ok_x]),
        ([desc(dtype=">f8")], [ok_x]),
        ([desc(dtype="float64")], [ok_x]),
        ([desc(dtype=8)], [ok_x]),
        ([desc(shape=(-2, 12))], [ok_x]),
        ([desc(shape=(2.0, 12))], [ok_x]),
        ([{"field": "x", "dtype": "<f8", "shape": [[2], 12]}], [ok_x]),
        ([desc(shape=(1,) * 9 + (24,))], [ok_x]),
        ([desc(shape=(3, 12))], [ok_x]),
        ([desc(shape=(2, 12))], [ok_x[:-1]]),
        ([desc(), desc()], [ok_x, ok_x]),
        ([desc(field="y")], [ok_x]),
        ([desc(field="")], [ok_x]),
        ([desc(field=None)], [ok_x]),
        ([{"field": "x", "dtype": "<f8", "shape": [2, 12], "order": "F"}], [ok_x]),
        (["x"], [ok_x]),
        ([desc(field="params.phase", shape=(24,))], [np.zeros(24).tobytes()]),  # forward without x
        ([desc(field="params.bogus", shape=(24,))], [np.zeros(24).tobytes()]),
    ]
    for k in range(250):
        descs, frames = desc_cases[k % len(desc_cases)]
        op = "set_params" if k % 7 == 0 and descs and isinstance(descs[0], dict) and descs[0].get("field") == "x" \
            else "forward"
        msgs.append([b"", h(op=op, arrays=descs), *frames])
    msgs.append([b"", b'{"v": 1, "op": "health", "arrays": [{"field": "x", "dtype": "<f8", "shape": [1]}]}',
                 np.zeros(1).tobytes()])
    # 5. well-formed requests that break the device's limits
    for k in range(200):
        x = rng.uniform(0, 1, (int(rng.integers(1, 5)), 12))
        params = {}
        kind = k % 8
        if kind == 0:
            x[0, int(rng.integers(0, 12))] = rng.choice([1.5, -0.1, 1e300])
        elif kind == 1:
            x[-1, -1] = np.nan
        elif kind == 2:
            x[0, 0] = -np.inf
        elif kind == 3:
            x = x[:, :11]
        elif kind == 4:
            x = x.reshape(-1)
        elif kind == 5:
            params["phase"] = np.full(24, 4.0)
        elif kind == 6:
            params["phase"] = np.zeros(23)
        else:
            params["phase"] = np.full(24, np.nan)
        arrays = [desc(shape=x.shape)] + [desc(field="params.phase", shape=v.shape) for v in params.values()]
        msgs.append([b"", h(arrays=arrays), x.tobytes(), *(v.tobytes() for v in params.values())])
    for _ in range(20):
        msgs.append([b"", h(op="forward", arrays=[desc(shape=(0, 12))]), b""])  # an empty batch
    # 6. a header over its own limit, the message well under the server's: refused by the header check
    for _ in range(10):
        msgs.append([b"", b'{"v": 1, "op": "health", "pad": "' + b"x" * MAX_HEADER_BYTES + b'"}'])
    return msgs


def zmq_oversized_messages() -> dict[str, list[list[bytes]]]:
    """Messages over the server's limits, by the reason the server drops their connection."""
    rows = MAX_MSG // 96 + 1
    big = np.zeros(MAX_MSG // 8 // 12 * 12 // 2).tobytes()  # half the limit per frame
    return {
        "message_too_large": [[b"", h(arrays=[desc(shape=(rows, 12))]), bytes(96 * rows)]] * 5  # one frame
                             + [[b"", h(arrays=[desc(shape=(len(big) // 96, 12))] * 3), big, big, big]] * 3,
        "too_many_frames": [[b""] + [b""] * 300] * 2,
    }


@pytest.mark.timeout(120)
def test_zmq_server_survives_1000_malformed_messages():
    rng = np.random.default_rng(20240611)
    messages = zmq_fuzz_messages(rng)
    assert len(messages) >= 1000
    device = make_device("shg", imperfections=IDEAL)
    with DeviceServer(device, "tcp://127.0.0.1:0", max_message_bytes=MAX_MSG) as server:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(server.endpoint)
        answered = 0
        kinds: dict[str, int] = {}
        for i, frames in enumerate(messages):
            sock.send_multipart(frames)
            assert sock.poll(REPLY_TIMEOUT_MS), f"no reply to fuzz message {i}: {[f[:60] for f in frames]}"
            reply = sock.recv_multipart()
            assert reply[0] == b"" and len(reply) == 2, f"message {i}"
            header = json.loads(reply[1])
            assert header["ok"] is False, f"message {i} was accepted: {[f[:60] for f in frames]}"
            err = header["error"]
            assert err["field"] and err["message"] and "allowed" in err, err
            kinds[err["kind"]] = kinds.get(err["kind"], 0) + 1
            answered += 1
        assert kinds.get("device", 0) == 0 and kinds["protocol"] > 500 and kinds["limit"] >= 200

        # a message over the size or frame limit is cut off with its connection: no reply, as the protocol says
        oversized = zmq_oversized_messages()
        senders = []
        for frames in [f for msgs in oversized.values() for f in msgs]:
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.connect(server.endpoint)
            s.send_multipart(frames)
            senders.append(s)
        expected = {reason: len(msgs) for reason, msgs in oversized.items()}
        deadline = time.monotonic() + 30
        while {r: server.health()["server"]["dropped"][r] for r in expected} != expected:
            assert time.monotonic() < deadline, server.health()["server"]["dropped"]
            sock.poll(20)  # nothing arrives here: a short wait between looks
        dropped = sum(expected.values())
        for s in senders:
            assert s.poll(0) == 0  # no reply to any of them
            s.close()

        # the server is alive and still right
        ref = make_device("shg", imperfections=IDEAL)
        with DeviceClient(server.endpoint) as client:
            x = np.random.default_rng(0).uniform(0, 1, (16, 12))
            np.testing.assert_allclose(client.forward(x), ref.forward(x), rtol=0, atol=1e-12)
            health = client.health()
        sock.close()
        ctx.term()
    srv = health["server"]
    assert srv["rejected"] == answered == len(messages)
    assert srv["requests"] == answered + 2 and srv["ok"] == 1
    print(f"zmq fuzz: {answered} malformed messages answered with errors {kinds}, {dropped} oversized dropped")


# -- SCPI bench -------------------------------------------------------------------------------------------


def scpi_fuzz_lines(rng: np.random.Generator) -> list[bytes]:
    """Malformed program messages; each must leave at least one error in the queue and no answer."""
    lines: list[bytes] = []
    printable = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:*?,.\"' -+", np.uint8)
    for _ in range(60):
        lines.append(b"@" + rng.choice(printable, int(rng.integers(1, 80))).tobytes())
    for _ in range(40):
        junk = rng.integers(0, 256, int(rng.integers(1, 60)), dtype=np.uint8).tobytes()
        # no '#' (a random block header would swallow the next lines) and no ';' (a random valid command)
        lines.append(b"\x80" + junk.replace(b"\n", b"").replace(b";", b"").replace(b"#", b""))
    structured = [
        b"FOO", b"FOO?", b"SOUR:VOLT 1", b"OUTP", b"OUTP ON,OFF", b"OUTP 2", b"OUTP?  1",
        b"SOUR:WAV:CENT", b"SOUR:WAV:CENT 1e999", b"SOUR:WAV:CENT nan", b"SOUR:WAV:CENT -5",
        b"SOUR:WAV:CENT 1,2", b"SOUR:WAV:CENT #15hello", b"SOUR:WAV:CENT 'x'", b"SOUR:WAV:CENT ,",
        b"SOUR:WAV:SPAN 0", b"SOUR:WAV:SPAN 1e-9", b"SOUR:DATA:POIN 3", b"SOUR:DATA:POIN? 3",
        b"SOUR:MASK:DATA", b"SOUR:MASK:DATA 1,2,3", b"SOUR:MASK:DATA #15hello", b"SOUR:MASK:DATA #0abc",
        b"SOUR:MASK:DATA #3ab", b"SOUR:MASK:DATA #2xx", b"SOUR:MASK:DATA?", b"SOUR:MASK:DATA #10",
        b"SOUR:MASK:DATA x#18\x00\x00\x00\x00\x00\x00\x00\x00",
        b"SOUR:MASK:DATA #18" + np.full(1, 7.0).tobytes(),
        b"SOUR:MASK:DATA #296" + np.full(12, 2.0).tobytes(),
        b"SOUR:MASK:DATA #296" + np.full(12, np.nan).tobytes(),
        b"SOUR:PAR:DATA", b"SOUR:PAR:DATA phase", b"SOUR:PAR:DATA nope,#18" + bytes(8),
        b"SOUR:PAR:DATA phase,#18" + bytes(8), b"SOUR:PAR:DATA? nope", b"SOUR:PAR:DATA? phase,1",
        b"SOUR:PAR:CAT? 1", b"SYST:ERR:NEXT?? ", b"SYST:SPEC? 1", b"*IDN? now", b"*RST 1", b"*FOO",
        b"*FOO?", b"*CLS?", b"**IDN?", b":", b"::", b"SOUR::VOLT 1", b"SOUR:WAV:CENT 800;BAR",
        b"SOUR WAV CENT 800", b"\x00", b"OUTP \x00", b"\xff\xfe", b"SOUR:WAV:CENT \"unterminated'",
        b"READ:SPEC?", b"INIT", b"FETC:SPEC?", b"OUTP ON ; ; FOO",
    ]
    for k in range(110):
        lines.append(structured[k % len(structured)])
    lines.append(b"SOUR:WAV:CENT " + b"9" * (1 << 20) + b"1")  # a message over 1 MiB
    lines.append(b"SOUR:WAV:CENT " + b"1" * 20_000 + b"x")  # digits, then not: once ~10 s of a quadratic pattern
    lines.append(b"SOUR:WAV:CENT " + b"1" * 4000 + b"x")  # the same within the length cap: a malformed number
    return lines


def _readline(f) -> bytes:
    line = f.readline()
    assert line.endswith(b"\n"), f"connection closed or timed out, got {line!r}"
    return line[:-1]


@pytest.mark.timeout(120)
def test_scpi_bench_survives_200_malformed_lines():
    rng = np.random.default_rng(7)
    lines = scpi_fuzz_lines(rng)
    assert len(lines) >= 200
    with SimBench("shg", port=0, imperfections=IDEAL) as bench:
        host, port = "127.0.0.1", bench.ports["source"]
        snk = socket.create_connection((host, bench.ports["sink"]), timeout=10)
        src = socket.create_connection((host, port), timeout=10)
        f = src.makefile("rb")
        answered = 0
        codes: dict[int, int] = {}
        for i, line in enumerate(lines):
            # the malformed message, then the oldest error, then clear whatever else it queued
            src.sendall(line + b"\nSYST:ERR?\n*CLS\n")
            code = int(_readline(f).split(b",", 1)[0])
            assert code < 0, f"line {i} {line[:60]!r} left no error"
            codes[code] = codes.get(code, 0) + 1
            answered += 1
        # a block longer than the bench accepts cannot be skipped safely: the connection is closed
        src.sendall(b"SOUR:MASK:DATA #9999999999\n")
        assert f.readline() == b""
        f.close()
        src.close()
        snk.sendall(b"SYST:ERR?\n")  # other connections were never affected
        assert snk.makefile("rb").readline() == b'0,"No error"\n'

        snk.close()

        ref = make_device("shg", imperfections=IDEAL)
        dev = VisaDevice.from_config(bench.visa_config()).connect()
        x = np.random.default_rng(1).uniform(0, 1, (8, 12))
        np.testing.assert_allclose(dev.forward(x), ref.forward(x), rtol=0, atol=1e-12)
        dev.close()
        assert bench.running
    assert {-101, -102, -104, -108, -109, -113, -161, -222, -223, -224} <= set(codes)
    print(f"scpi fuzz: {answered} malformed lines, each answered by an error in the queue: {sorted(codes.items())}")
