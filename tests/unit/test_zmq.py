"""The ZeroMQ device server's bind rules, checked before any socket is opened (round trips, limits, restart,
reconnect and CURVE on loopback: ``tests/system/test_zmq.py``)."""

from __future__ import annotations

import pytest

from pnn_cluster.servers import BindError
from pnn_cluster.servers.zmq_server import check_bind


def test_bind_rules():
    assert check_bind("tcp://127.0.0.1:0") == "tcp://127.0.0.1:*"
    assert check_bind("tcp://[::1]:5555") == "tcp://[::1]:5555"
    assert check_bind("ipc:///tmp/pnn.sock") == "ipc:///tmp/pnn.sock"
    for bad, match in [("tcp://0.0.0.0:5555", "not a loopback"), ("tcp://*:5555", "not a loopback"),
                       ("tcp://10.1.2.3:5555", "not a loopback"), ("udp://127.0.0.1:5", "transport"),
                       ("127.0.0.1:5555", "not a ZeroMQ endpoint"), ("tcp://127.0.0.1:99999", "port")]:
        with pytest.raises(BindError, match=match):
            check_bind(bad)
    assert check_bind("tcp://0.0.0.0:5555", allow_remote=True) == "tcp://0.0.0.0:5555"


def test_cli_refuses_non_loopback_bind():
    from pnn_cluster.cli import main

    assert main(["serve-device", "--system", "shg", "--bind", "tcp://0.0.0.0:5555"]) == 2
