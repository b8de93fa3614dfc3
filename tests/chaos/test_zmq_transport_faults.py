"""Chaos at the wire: the ZeroMQ client against a bare ROUTER socket that answers late, never, or comes back.

The stand-in server speaks ``docs/wire_protocol.md`` by hand (no server code),
so what is checked is exactly what a server restarted or hung mid-request
receives from the reference client.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import zmq
from helpers import free_port

from pnn_cluster.devices.base import DeviceError
from pnn_cluster.drivers.zmq_client import DeviceClient

RECV_TIMEOUT_MS = 10_000  # a bound on each wait of the stand-in server, never a pause


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def router(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.rcvtimeo = RECV_TIMEOUT_MS
    sock.bind(endpoint)
    return sock


def receive(sock: zmq.Socket) -> tuple[bytes, dict, list[bytes]]:
    """One request: (the client connection's routing id, its header, its array frames)."""
    ident, empty, header, *arrays = sock.recv_multipart()
    assert empty == b""
    return ident, json.loads(header), arrays


def reply(sock: zmq.Socket, ident: bytes, rid, **extra) -> None:
    y = extra.pop("y", None)
    descs = [] if y is None else [{"field": "y", "dtype": "<f8", "shape": list(y.shape)}]
    header = {"v": 1, "id": rid, "ok": True, "arrays": descs, **extra}
    frames = [] if y is None else [np.ascontiguousarray(y, dtype="<f8").tobytes()]
    sock.send_multipart([ident, b"", json.dumps(header).encode(), *frames])


def test_a_request_that_gave_up_leaves_nothing_queued_for_a_server_that_comes_back(ctx):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    client = DeviceClient(endpoint, timeout_s=0.2, retries=1, context=ctx)
    with pytest.raises(DeviceError, match=r"no reply to 'health' after 2 tries of 0.2 s"):
        client.health()  # no server: both tries queue on sockets that never connect
    server = router(ctx, endpoint)  # the server comes back
    got: list[dict] = []

    def serve_one() -> None:
        ident, header, _ = receive(server)
        got.append(header)
        reply(server, ident, header["id"], health={"name": "stand-in", "server": {"instance": "b"}})

    t = threading.Thread(target=serve_one)
    t.start()
    assert client.health()["name"] == "stand-in"
    t.join(RECV_TIMEOUT_MS / 1000)
    # the first request it receives is the one being asked now, not the abandoned one still queued
    assert [h["id"] for h in got] == [2] and got[0]["op"] == "health"
    client.close()


def test_a_retried_forward_is_the_same_request_on_a_fresh_connection_and_a_late_reply_is_dropped(ctx):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = router(ctx, endpoint)
    client = DeviceClient(endpoint, timeout_s=0.3, retries=2, context=ctx).connect()
    x = np.arange(6, dtype=float).reshape(2, 3) / 10
    params = {"gain": np.array([1.0, 2.0, 3.0])}
    seen: list[tuple[bytes, dict, list[bytes]]] = []

    def hang_then_answer() -> None:
        seen.append(receive(server))  # the server hangs on the first try: no reply
        seen.append(receive(server))  # the client gave up on that socket and sent again
        (first, h1, _), (second, h2, _) = seen
        # the late answer to the first try goes to a connection that is gone; then the retry is answered
        reply(server, first, h1["id"], y=np.full((2, 3), -1.0))
        reply(server, second, h2["id"], y=x * 2)

    t = threading.Thread(target=hang_then_answer)
    t.start()
    y = client.forward(x, params)
    t.join(RECV_TIMEOUT_MS / 1000)
    np.testing.assert_array_equal(y, x * 2)
    (first, h1, a1), (second, h2, a2) = seen
    assert first != second  # a fresh socket, a new connection
    assert h1 == h2 and h1["op"] == "forward"  # the same request id, the same arrays (x and every parameter)
    assert a1 == a2 and {d["field"] for d in h1["arrays"]} == {"x", "params.gain"}
    assert client.stats["timeouts"] == 1 and client.stats["reconnects"] == 1 and client.stats["requests"] == 1
    client.close()
