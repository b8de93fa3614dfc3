"""The device server's limits and CURVE key files, checked before anything listens: nonsense limits and a
network bind without protection are refused at construction, a malformed key file stops the start naming
it (what the limits do to peers on loopback: ``tests/system/test_zmq_bounds.py``)."""

from __future__ import annotations

import shutil

import pytest
from helpers import Gain, curve_keys

from pnn_cluster.servers import BindError
from pnn_cluster.servers.zmq_server import CurveKeyError, CurveServerConfig, DeviceServer

LOOPBACK_ANY = "tcp://127.0.0.1:0"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return curve_keys(tmp_path_factory.mktemp("curve"))


def test_limits_are_validated_and_allow_remote_needs_curve_or_insecure(keys):
    for kw in ({"max_connections": 0}, {"request_timeout_s": 0}, {"idle_timeout_s": -1.0},
               {"max_pending_reply_bytes": -1}, {"max_message_bytes": 10}, {"max_handshakes": 0},
               {"max_handshakes_per_source": 0}, {"handshake_timeout_s": 0}, {"max_held_bytes": 1024}):
        with pytest.raises(BindError, match=next(iter(kw))):
            DeviceServer(Gain(), LOOPBACK_ANY, **kw)
    with pytest.raises(BindError, match="--insecure") as ei:
        DeviceServer(Gain(), "tcp://0.0.0.0:0", allow_remote=True)
    assert "CURVE" in str(ei.value) and "\n" not in str(ei.value)
    DeviceServer(Gain(), "tcp://0.0.0.0:0", allow_remote=True, insecure=True)  # constructing does no I/O
    DeviceServer(Gain(), "tcp://0.0.0.0:0", allow_remote=True,
                 curve=CurveServerConfig(keys / "server.key_secret", keys / "allowed"))
    with pytest.raises(BindError, match="transport 'inproc'"):
        DeviceServer(Gain(), "inproc://x")


def test_the_memory_budget_holds_at_least_one_whole_request_and_defaults_to_two_and_the_replies():
    server = DeviceServer(Gain(), LOOPBACK_ANY, max_message_bytes=32 << 20, max_pending_reply_bytes=16 << 20)
    assert server.limits.max_held_bytes == 2 * (32 << 20) + (16 << 20) + 2 * 65536
    assert DeviceServer(Gain(), LOOPBACK_ANY, max_message_bytes=1 << 20).limits.max_held_bytes == 64 << 20
    with pytest.raises(BindError, match=r"max_held_bytes: 1048576; allowed: at least max_message_bytes") as ei:
        DeviceServer(Gain(), LOOPBACK_ANY, max_message_bytes=1 << 20, max_held_bytes=1 << 20)
    assert "\n" not in str(ei.value)


def test_a_malformed_key_file_stops_the_start_naming_the_file_and_the_problem(keys, tmp_path):
    good = (keys / "trusted.key").read_text()
    public = good.split('public-key = "', 1)[1][:40]
    cases = {
        "short.key": (good.replace(public, public[:39]), "has 39 characters"),
        "alphabet.key": (good.replace(public, public[:39] + "~"), "outside Z85"),
        "nokey.key": ("#   ZeroMQ CURVE Public Certificate\nmetadata\ncurve\n", "no public-key"),
        "twice.key": (good + f'    public-key = "{public}"\n', "a second public-key"),
        "quotes.key": (good.replace(f'"{public}"', public), "cannot parse"),
        "binary.key": (b"\xff\xfe\x00garbage", "cannot read it"),
    }
    for name, (content, problem) in cases.items():
        allowed = tmp_path / name.removesuffix(".key")
        allowed.mkdir()
        shutil.copy(keys / "trusted.key", allowed / "trusted.key")  # one good key beside the bad one
        bad = allowed / name
        bad.write_bytes(content) if isinstance(content, bytes) else bad.write_text(content)
        server = DeviceServer(Gain(), LOOPBACK_ANY, curve=CurveServerConfig(keys / "server.key_secret", allowed))
        with pytest.raises(CurveKeyError, match=problem) as ei:
            server.start()
        assert str(bad) in str(ei.value) and "\n" not in str(ei.value)
        assert server.endpoint is None and not server.running
    # the server's own key pair: a public key file is not a secret key, and a pair must match
    with pytest.raises(CurveKeyError, match="no secret-key"):
        CurveServerConfig(keys / "server.key", keys / "allowed").load()
    mixed = tmp_path / "mixed.key_secret"
    mixed.write_text((keys / "server.key_secret").read_text().replace(
        (keys / "server.key").read_text().split('public-key = "', 1)[1][:40], public))
    with pytest.raises(CurveKeyError, match="does not belong to its public-key"):
        CurveServerConfig(mixed, keys / "allowed").load()
    loaded = CurveServerConfig(keys / "server.key_secret", keys / "allowed").load()
    assert len(loaded.allowed) == 1 and len(loaded.public) == 32
