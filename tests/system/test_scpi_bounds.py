"""The simulated SCPI bench's bounds on memory and time (issue #10), and its strict SCPI numbers, on a bench.

Every test here starts a bench in process on 127.0.0.1 with OS-chosen ports and short limits, talks to it over
raw sockets, and waits on sockets or polls a condition with a deadline (no fixed sleeps). The numbers and limits
checked without a bench: ``tests/unit/test_scpi_bounds.py``.
"""

from __future__ import annotations

import logging
import socket
import time
import tracemalloc

import numpy as np
import pytest
from helpers import wait_until

from pnn_cluster.devices import Imperfections, make_device
from pnn_cluster.protocol.scpi import block_header
from pnn_cluster.servers.scpi_bench import BLOCK_CHUNK, SimBench

IDEAL = Imperfections.ideal(seed=3)
FLOOD_HEADER = b"SOUR:MASK:DATA #9268435456"  # a block declaring 256 MiB


# -- helpers -------------------------------------------------------------------------------------


def connect(bench: SimBench, role: str = "source", rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", bench.ports[role]))
    return sock


def ask(sock: socket.socket, message: bytes) -> bytes:
    """Send one message and read one answer line (without its newline)."""
    sock.sendall(message + b"\n")
    line = b""
    while not line.endswith(b"\n"):
        got = sock.recv(1 << 16)
        assert got, f"connection closed; no answer to {message[:60]!r}"
        line += got
    return line[:-1]


def error(sock: socket.socket) -> tuple[int, str]:
    code, _, msg = ask(sock, b"SYST:ERR?").decode().partition(",")
    return int(code), msg.strip('"')


def closed_after(sock: socket.socket, timeout_s: float = 10.0) -> float:
    """Seconds until the bench closes the connection (reads and discards anything it still sends)."""
    t0 = time.monotonic()
    sock.settimeout(timeout_s)
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def load(sock: socket.socket, x: np.ndarray) -> None:
    data = np.ascontiguousarray(x, dtype="<f8").tobytes()
    sock.sendall(b"SOUR:MASK:DATA " + block_header(len(data)) + data + b"\n")


def read_block(sock: socket.socket, query: bytes) -> np.ndarray:
    sock.sendall(query + b"\n")
    f = sock.makefile("rb")
    head = f.read(2)
    assert head[:1] == b"#", head
    length = int(f.read(int(head[1:2])))
    payload = f.read(length)
    assert f.read(1) == b"\n"
    f.close()
    return np.frombuffer(payload, dtype="<f8")


# -- servers -------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_strict_numbers_on_the_bench():
    with SimBench("circuit", port=0, imperfections=IDEAL) as bench:
        awg, scope = connect(bench, "source"), connect(bench, "sink")
        try:
            for text in ("1", "-1.5", "+2.0E-3", ".5", "5.", "-0", "2e0"):
                awg.sendall(b"SOUR:VOLT:OFFS " + text.encode() + b"\n")
                assert error(awg) == (0, "No error"), text
                assert float(ask(awg, b"SOUR:VOLT:OFFS?")) == float(text)
            awg.sendall(b"SOUR:VOLT:OFFS 0.25\n")
            refused = {"1_0": -120, "0x10": -120, "1e": -120, "1e1_0": -120, "1 0": -120, "1.2.3": -120,
                       "--1": -104, "inf": -104, "nan": -104, "infinity": -104, "INF": -104, "#H10": -104,
                       "abc": -104, '" 1"': -104, "'1'": -104}
            for text, code in refused.items():
                awg.sendall(b"SOUR:VOLT:OFFS " + text.encode() + b"\n")
                got, msg = error(awg)
                assert got == code, (text, got, msg)
                assert "offset" in msg and "allowed: [-5, 5] V" in msg, msg
                assert error(awg) == (0, "No error")
            assert float(ask(awg, b"SOUR:VOLT:OFFS?")) == 0.25  # no refused value got through
            awg.sendall("SOUR:VOLT:OFFS 1\u0661\n".encode())  # a non-ASCII digit
            assert error(awg)[0] == -101
            # integers: a number that is not an integer is a numeric data error, like a malformed one
            assert error(scope) == (0, "No error")
            for text, code in (("4", 0), ("4.0", 0), ("4E0", 0), ("4.5", -120), ("4_0", -120), ("0x4", -120),
                               ("nan", -104), ("4000", -222)):
                scope.sendall(b"ACQ:AVER " + text.encode() + b"\n")
                assert error(scope)[0] == code, text
            assert ask(scope, b"ACQ:AVER?") == b"4"
        finally:
            awg.close()
            scope.close()


@pytest.mark.timeout(60)
def test_oversized_block_is_refused_before_allocation(caplog):
    caplog.set_level(logging.WARNING, logger="pnn_cluster.servers.scpi_bench")
    with SimBench("shg", port=0, imperfections=IDEAL) as bench:
        cap = bench.max_block_bytes
        assert cap == 32 << 20 < 268_435_456
        other = connect(bench)
        assert ask(other, b"*IDN?").startswith(b"PNN-Cluster,SIM-PULSE_SHAPER")
        flood = [connect(bench) for _ in range(4)]
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            for sock in flood:
                sock.sendall(FLOOD_HEADER + b"abc")
            # closed at once (not after the 60 s command timeout): the declared length alone is refused
            assert all(closed_after(sock, 10) < 10 for sock in flood)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            for sock in flood:
                sock.close()
        assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB allocated while refusing 4 x 256 MiB headers"
        assert bench.stats["oversized_blocks"] == 4 and bench.stats["dropped"] == 4
        reasons = [r.getMessage() for r in caplog.records if "closing the connection" in r.getMessage()]
        assert len(reasons) == 4 and all("block of 268435456 bytes declared; allowed: at most 33554432" in m
                                         for m in reasons), reasons
        assert ask(other, b"*IDN?").startswith(b"PNN-Cluster,SIM-PULSE_SHAPER")  # the others keep being served
        assert error(other) == (0, "No error")
        other.close()


@pytest.mark.timeout(60)
def test_declared_block_costs_only_the_bytes_that_arrive_and_a_stalled_one_is_dropped():
    timeout_s = 0.5
    with SimBench("shg", port=0, imperfections=IDEAL, max_block_bytes=256 << 20,
                  command_timeout_s=timeout_s) as bench:
        other = connect(bench, "sink")
        flood = [connect(bench) for _ in range(4)]
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            t0 = time.monotonic()
            for sock in flood:
                sock.sendall(FLOOD_HEADER + bytes(1000))  # accepted (within the cap), then nothing more
            wait_until(lambda: len(bench.blocks_in_progress()) == 4, 10, "4 blocks in progress")
            held = [size for size, _ in bench.blocks_in_progress()]
            # while they stall, other connections are served
            assert ask(other, b"*IDN?").startswith(b"PNN-Cluster,SIM-SPECTROMETER")
            waited = [closed_after(sock, 10) for sock in flood]
            elapsed = time.monotonic() - t0
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            for sock in flood:
                sock.close()
        assert len(held) == 4 and max(held) <= 1000 + BLOCK_CHUNK, held  # not 256 MiB each
        assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB allocated for 4 stalled 256 MiB blocks"
        assert elapsed >= timeout_s and max(waited) < timeout_s + 5
        assert bench.stats["timed_out"] == 4
        assert ask(other, b"*IDN?").startswith(b"PNN-Cluster,SIM-SPECTROMETER")
        other.close()

        # a message without its newline is dropped too
        sock = connect(bench)
        t0 = time.monotonic()
        sock.sendall(b"*IDN?")
        closed_after(sock, 10)
        assert timeout_s <= time.monotonic() - t0 < timeout_s + 5
        sock.close()
        assert bench.stats["timed_out"] == 5


@pytest.mark.timeout(60)
def test_block_arriving_in_pieces_grows_its_buffer_and_loads():
    ref = make_device("shg", imperfections=IDEAL)
    with SimBench("shg", port=0, imperfections=IDEAL) as bench:
        src, snk = connect(bench, "source"), connect(bench, "sink")
        x = np.random.default_rng(0).uniform(0, 1, (3000, 12))  # 288000 bytes
        data = x.astype("<f8").tobytes()
        message = b"OUTP ON;:SOUR:MASK:DATA " + block_header(len(data)) + data + b"\n"
        cut = message.index(b"#") + 100_000
        src.sendall(message[:cut])
        wait_until(lambda: any(fill >= 100_000 - 8 for _, fill in bench.blocks_in_progress()), 10,
                   "the first piece received")
        sizes = [size for size, _ in bench.blocks_in_progress()]
        # room for what has arrived and at most as much again (or 64 KiB): not the 288000 bytes declared
        assert len(sizes) == 1 and 99_992 <= sizes[0] <= 2 * 99_992 < len(data), sizes
        src.sendall(message[cut:])
        assert error(src) == (0, "No error")
        y = read_block(snk, b"READ:SPEC?")
        np.testing.assert_allclose(y, ref.forward(x).ravel(), rtol=0, atol=1e-12)
        src.close()
        snk.close()


@pytest.mark.timeout(60)
def test_connection_cap_per_instrument_when_no_connection_is_idle(caplog):
    caplog.set_level(logging.WARNING, logger="pnn_cluster.servers.scpi_bench")
    with SimBench("shg", port=0, imperfections=IDEAL, max_connections=2) as bench:
        a, b = connect(bench), connect(bench)
        for s in (a, b):
            assert ask(s, b"*OPC?") == b"1"
            s.sendall(b"*OPC")  # a message in progress: not idle, so not to be evicted
        wait_until(lambda: not any(c.idle() for c in list(bench.source.sessions)), 10, "both messages in progress")
        extra = connect(bench)
        assert closed_after(extra, 10) < 10  # refused: closed without an answer
        extra.close()
        assert bench.stats["refused_connections"] == 1 and bench.stats["evicted"] == 0
        refused = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
        assert len(refused) == 1 and "2 connections open; allowed: at most 2 per instrument" in refused[0]
        sinks = [connect(bench, "sink") for _ in range(2)]  # the sink counts its own
        assert all(ask(s, b"*OPC?") == b"1" for s in sinks)
        for s in (a, b):
            assert ask(s, b"?") == b"1"  # the message each had in progress, completed
            assert ask(s, b"*IDN?").startswith(b"PNN-Cluster")  # the admitted ones are untouched
        a.close()
        wait_until(lambda: len(bench.source.sessions) == 1, 10, "the bench noticing a closed connection")
        c = connect(bench)
        assert ask(c, b"*OPC?") == b"1"
        for s in (b, c, *sinks):
            s.close()


@pytest.mark.timeout(60)
def test_idle_connection_is_closed_an_active_one_is_not():
    idle_s = 0.5
    with SimBench("shg", port=0, imperfections=IDEAL, idle_timeout_s=idle_s) as bench:
        idle, busy = connect(bench), connect(bench, "sink")
        assert ask(idle, b"*OPC?") == b"1"
        t0 = time.monotonic()
        idle.setblocking(False)
        answers = 0
        while True:  # the busy client keeps talking until the idle one is closed
            assert ask(busy, b"*OPC?") == b"1"
            answers += 1
            try:
                if idle.recv(1) == b"":
                    break
            except BlockingIOError:
                pass
            assert time.monotonic() - t0 < 10, "idle connection not closed"
        elapsed = time.monotonic() - t0
        assert elapsed >= idle_s * 0.9 and answers > 1
        assert ask(busy, b"*IDN?").startswith(b"PNN-Cluster")
        assert bench.stats["idle_closed"] == 1
        idle.close()
        busy.close()


@pytest.mark.timeout(60)
def test_answers_for_a_client_that_never_reads_are_capped():
    cap = 64 << 10
    ref = make_device("shg", imperfections=IDEAL)
    with SimBench("shg", port=0, imperfections=IDEAL, max_unread_bytes=cap, command_timeout_s=1.0) as bench:
        src = connect(bench)
        x = np.random.default_rng(1).uniform(0, 1, (4000, 12))  # each answer 384000 bytes: 6 x the cap
        load(src, x)
        src.sendall(b"OUTP ON\n")
        assert error(src) == (0, "No error")
        # a client that reads gets answers much larger than the cap
        snk = connect(bench, "sink")
        np.testing.assert_allclose(read_block(snk, b"READ:SPEC?"), ref.forward(x).ravel(), rtol=0, atol=1e-12)
        # one that asks for 30 of them and reads nothing
        hog = connect(bench, "sink", rcvbuf=4096)
        hog.sendall(b"READ:SPEC?\n" * 30)
        port = hog.getsockname()[1]
        wait_until(lambda: any(s.peer.endswith(f":{port}") for s in list(bench.sink.sessions)), 10, "hog admitted")
        hog_session = next(s for s in list(bench.sink.sessions) if s.peer.endswith(f":{port}"))
        most = 0
        deadline = time.monotonic() + 20
        while hog_session.transport is not None and not hog_session.transport.is_closing():
            most = max(most, hog_session.transport.get_write_buffer_size())
            assert time.monotonic() < deadline, "a client that never reads was not disconnected"
            time.sleep(0.005)
        assert most <= cap
        assert bench.stats["unread_closed"] == 1
        assert closed_after(hog, 10) < 10
        hog.close()
        np.testing.assert_allclose(read_block(snk, b"READ:SPEC?"), ref.forward(x).ravel(), rtol=0, atol=1e-12)
        src.close()
        snk.close()


# -- issue #20: a line that holds up the loop, a message of many blocks, idle connections that hold the slots --


@pytest.mark.timeout(60)
def test_a_long_numeric_line_holds_up_neither_instrument():
    with SimBench("shg", port=0, imperfections=IDEAL) as bench:
        src, snk = connect(bench, "source"), connect(bench, "sink")
        try:
            assert ask(snk, b"*OPC?") == b"1"
            # 20,000 digits and an 'x' took the former number pattern ~10 s, on the loop that serves both
            for digits, code, detail in ((20_000, -223, "4096"), (1 << 20, -223, "4096"), (4000, -120, "allowed: [")):
                t0 = time.monotonic()
                src.sendall(b"SOUR:WAV:CENT " + b"1" * digits + b"x\n")
                assert ask(snk, b"*OPC?") == b"1"
                other = time.monotonic() - t0
                got, msg = error(src)
                both = time.monotonic() - t0
                assert other < 0.5 and both < 2.0, (digits, other, both)
                assert got == code and detail in msg, (digits, got, msg)
                assert error(src) == (0, "No error")  # one error for the line, however long
            assert ask(src, b"*IDN?").startswith(b"PNN-Cluster,SIM-PULSE_SHAPER")
        finally:
            src.close()
            snk.close()


@pytest.mark.timeout(60)
def test_the_blocks_of_one_message_are_capped_together(caplog):
    caplog.set_level(logging.WARNING, logger="pnn_cluster.servers.scpi_bench")
    block = 256 << 10
    with SimBench("shg", port=0, imperfections=IDEAL, max_block_bytes=block) as bench:
        cap = bench.max_message_block_bytes
        assert cap == block + 24 * 8  # one block at the cap and the phase parameters
        other = connect(bench, "sink")
        flood = connect(bench)
        one = b"#6" + str(block).encode() + bytes(block)
        message = b"SOUR:PAR:DATA phase," + b",".join([one] * 40)  # 40 blocks within the cap: 10 MiB, no newline
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            try:
                flood.sendall(message)
            except OSError:  # closed by the bench while the client was still sending
                pass
            assert closed_after(flood, 10) < 10  # at once, not after the 60 s command timeout
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            flood.close()
        assert peak < 2 * cap + (1 << 20), f"{peak / 2**20:.1f} MiB allocated for a 10 MiB message"
        assert bench.stats["oversized_messages"] == 1 and bench.stats["oversized_blocks"] == 0
        reasons = [r.getMessage() for r in caplog.records if "closing the connection" in r.getMessage()]
        assert len(reasons) == 1 and (f"blocks of one message: {block} bytes and a block of {block} more declared; "
                                      f"allowed: at most {cap} bytes in all") in reasons[0], reasons
        assert ask(other, b"*IDN?").startswith(b"PNN-Cluster,SIM-SPECTROMETER")
        # a message whose blocks fit together is taken as ever
        src = connect(bench)
        phase = np.linspace(0.0, 1.0, 24)
        data = phase.astype("<f8").tobytes()
        x = np.random.default_rng(2).uniform(0, 1, (10, 12)).astype("<f8").tobytes()
        src.sendall(b"SOUR:PAR:DATA phase," + block_header(len(data)) + data + b";:SOUR:MASK:DATA "
                    + block_header(len(x)) + x + b"\n")
        assert error(src) == (0, "No error")
        np.testing.assert_array_equal(read_block(src, b"SOUR:PAR:DATA? phase"), phase)
        src.close()
        other.close()


@pytest.mark.timeout(60)
def test_the_longest_idle_connection_makes_room_for_a_new_one(caplog):
    caplog.set_level(logging.WARNING, logger="pnn_cluster.servers.scpi_bench")
    with SimBench("shg", port=0, imperfections=IDEAL) as bench:
        assert bench.max_connections == 8
        idle = [connect(bench) for _ in range(8)]
        for s in idle:
            assert ask(s, b"*OPC?") == b"1"
        assert ask(idle[0], b"*OPC?") == b"1"  # idle[1] is now the one idle the longest
        t0 = time.monotonic()
        ninth = connect(bench)
        assert ask(ninth, b"*IDN?").startswith(b"PNN-Cluster,SIM-PULSE_SHAPER")
        assert time.monotonic() - t0 < 2.0
        assert closed_after(idle[1], 10) < 10
        for k, s in enumerate(idle):
            if k != 1:
                assert ask(s, b"*OPC?") == b"1"  # the others keep their connections
        assert bench.stats["evicted"] == 1 and bench.stats["refused_connections"] == 0
        assert len(bench.source.sessions) == 8
        evicted = [r.getMessage() for r in caplog.records if "closed to admit" in r.getMessage()]
        assert len(evicted) == 1 and f":{idle[1].getsockname()[1]}: idle for" in evicted[0], evicted
        assert "with all 8 connections taken" in evicted[0]
        for s in (*idle, ninth):
            s.close()
