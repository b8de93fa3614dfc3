"""ZeroMQ client of a device server, and :class:`ZmqDevice`, a device like any other to the engine.

The client speaks the protocol of ``docs/wire_protocol.md`` (message layout
and arrays: :mod:`pnn_cluster.protocol.zmq`, shared with the server) over a DEALER
socket with the Lazy Pirate pattern: each request carries an id; the client
waits ``timeout_s`` for the reply with that id (late replies to earlier tries
are dropped), and on timeout closes the socket, opens a fresh one (which
reconnects, e.g. to a restarted server) and sends again, ``retries`` times.
Then it gives up with a :class:`~pnn_cluster.devices.base.DeviceError` and
drops that socket too, so a server that comes back later never receives the
abandoned request: the next request opens a fresh socket.

A retry is the same request (same id, same arrays, the parameters with it):
measuring it again is harmless, and whoever counts measurements counts the
one reply that came back (``tests/chaos`` checks both with a server killed,
restarted and hung mid-epoch). A request a hung server had already received
is measured when it resumes, and its reply dropped: at most one request per
client is measured twice.

A forward request carries the device parameters with the batch, so a
measurement never depends on what a server (possibly restarted, possibly
shared) happens to hold.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.auth

from pnn_cluster.devices.base import Device, DeviceError
from pnn_cluster.devices.spec import DeviceSpec, LimitError
from pnn_cluster.protocol.zmq import PROTOCOL_VERSION, ProtocolError, decode_arrays, encode_arrays, load_header

__all__ = ["ClientCurve", "DeviceClient", "RemoteError", "Reply", "ZmqDevice"]


class RemoteError(DeviceError):
    """The server answered with an error of kind ``protocol`` or ``device``."""

    def __init__(self, endpoint: str, error: Mapping[str, Any]) -> None:
        self.endpoint = endpoint
        self.error = dict(error)
        self.kind = error.get("kind")
        self.field = error.get("field")
        super().__init__(f"{endpoint}: {error.get('kind')} error: {error.get('message')}")


@dataclass(frozen=True)
class ClientCurve:
    """CURVE for a client: its own key pair (``<name>.key_secret``) and the server's public key file."""

    secret_key_file: Path
    server_public_key_file: Path

    def __post_init__(self) -> None:
        for f in ("secret_key_file", "server_public_key_file"):
            p = Path(getattr(self, f)).expanduser()  # here, on the node that opens the connection
            object.__setattr__(self, f, p)
            if not p.is_file():
                raise FileNotFoundError(f"curve: {f} {p} does not exist (make keys with `pnn-cluster keys`)")

    def apply(self, sock: zmq.Socket) -> None:
        public, secret = zmq.auth.load_certificate(str(self.secret_key_file))
        server_public, _ = zmq.auth.load_certificate(str(self.server_public_key_file))
        if secret is None:
            raise FileNotFoundError(f"curve: {self.secret_key_file} holds no secret key")
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = server_public


@dataclass
class Reply:
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]


class DeviceClient:
    """Lazy Pirate request/reply over a DEALER socket. Not thread-safe: one client per thread."""

    def __init__(self, endpoint: str, *, timeout_s: float = 5.0, retries: int = 2, curve: ClientCurve | None = None,
                 context: zmq.Context | None = None) -> None:
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise LimitError("zmq client", "timeout_s", "must be positive", repr(timeout_s), "> 0 s")
        if not (isinstance(retries, int) and retries >= 0):
            raise LimitError("zmq client", "retries", "must be a non-negative integer", repr(retries), ">= 0")
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.retries = retries
        self.curve = curve
        self._ctx = context
        self._own_ctx = context is None
        self._sock: zmq.Socket | None = None
        self._seq = 0
        self.server_instance: str | None = None
        self.stats = {"requests": 0, "timeouts": 0, "reconnects": 0, "stale_replies": 0, "server_restarts": 0}

    # -- socket -------------------------------------------------------------------------------------

    def connect(self) -> DeviceClient:
        if self._sock is None:
            if self._ctx is None:
                self._ctx = zmq.Context()
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.sndtimeo = int(self.timeout_s * 1000)
            if self.curve is not None:
                self.curve.apply(sock)
            sock.connect(self.endpoint)
            self._sock = sock
        return self

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def _reset(self) -> None:
        # a fresh socket: whatever the old one had queued for a dead server is dropped with it
        self._drop_socket()
        self.stats["reconnects"] += 1
        self.connect()

    def close(self) -> None:
        self._drop_socket()
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __enter__(self) -> DeviceClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------------------

    def request(self, op: str, arrays: Mapping[str, Any] | None = None) -> Reply:
        self.connect()
        self._seq += 1
        rid = self._seq
        descs, frames = encode_arrays(arrays or {})
        header = json.dumps({"v": PROTOCOL_VERSION, "op": op, "id": rid, "arrays": descs}).encode()
        message = [b"", header, *frames]
        self.stats["requests"] += 1
        tries = self.retries + 1
        for attempt in range(tries):
            if attempt:
                self._reset()
            assert self._sock is not None
            try:
                self._sock.send_multipart(message, copy=False)
            except zmq.Again:
                self.stats["timeouts"] += 1
                continue
            reply = self._await(rid)
            if reply is not None:
                return reply
            self.stats["timeouts"] += 1
        # the last try's socket still holds the request for a server that may come back: dropped with it, so
        # the next request (a retry of this one, as often as not) is the only one a restarted server measures
        self._drop_socket()
        raise DeviceError(f"{self.endpoint}: no reply to {op!r} after {tries} tr{'y' if tries == 1 else 'ies'} "
                          f"of {self.timeout_s:g} s (server down, unreachable, or refusing our CURVE key)")

    def _await(self, rid: int) -> Reply | None:
        assert self._sock is not None
        deadline = time.monotonic() + self.timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(max(1, int(remaining * 1000)), zmq.POLLIN):
                return None
            frames = self._sock.recv_multipart(copy=False)
            try:
                reply = self._parse(frames)
            except ProtocolError as exc:
                raise DeviceError(f"{self.endpoint}: malformed reply: {exc}") from None
            if reply.header.get("id") != rid:
                self.stats["stale_replies"] += 1  # a late answer to an earlier try
                continue
            return reply

    def _parse(self, frames: list[Any]) -> Reply:
        if len(frames) < 2 or len(frames[0]) != 0:
            raise ProtocolError("envelope", "expected b'' then a header frame")
        header = load_header(frames[1], max_bytes=None)  # a reply may be as large as the server makes it
        if header.get("v") != PROTOCOL_VERSION:
            raise ProtocolError("v", "unsupported reply", repr(header)[:80], str(PROTOCOL_VERSION))
        arrays = decode_arrays(header.get("arrays", []), frames[2:])
        return Reply(header, arrays)

    def _checked(self, reply: Reply) -> Reply:
        h = reply.header
        if h.get("ok"):
            return reply
        err = h.get("error") or {}
        if err.get("kind") == "limit":
            e = LimitError(str(err.get("device") or self.endpoint), str(err.get("field")), str(err.get("problem")),
                           err.get("value"), str(err.get("allowed") or ""))
            e.remote = err  # type: ignore[attr-defined]
            raise e
        raise RemoteError(self.endpoint, err)

    # -- operations ---------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        h = self._checked(self.request("health")).header["health"]
        inst = h.get("server", {}).get("instance")
        if inst and self.server_instance and inst != self.server_instance:
            self.stats["server_restarts"] += 1
        self.server_instance = inst or self.server_instance
        return h

    def spec(self) -> tuple[DeviceSpec, dict[str, np.ndarray], dict[str, Any]]:
        """The server's device spec, its current parameters and its identity."""
        r = self._checked(self.request("spec"))
        params = {k[len("params."):]: v for k, v in r.arrays.items() if k.startswith("params.")}
        return DeviceSpec.from_dict(r.header["spec"]), params, r.header.get("identity", {})

    def set_params(self, params: Mapping[str, Any]) -> None:
        self._checked(self.request("set_params", {f"params.{k}": v for k, v in params.items()}))

    def forward(self, x: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        arrays = {"x": x, **{f"params.{k}": v for k, v in (params or {}).items()}}
        r = self._checked(self.request("forward", arrays))
        if "y" not in r.arrays:
            raise DeviceError(f"{self.endpoint}: forward reply has no 'y' array")
        return r.arrays["y"]


class ZmqDevice(Device):
    """A device served by a ZeroMQ device server (``pnn-cluster serve-device``), as a local :class:`Device`.

    With ``spec=None`` the spec and the server's current parameters are
    learnt on :meth:`connect`; a given spec is checked against the server's,
    so a mis-wired endpoint fails at connect, not mid-training. Values are
    validated here first, then again by the server.
    """

    spec_on_connect = True

    def __init__(self, endpoint: str, spec: DeviceSpec | None = None, *, timeout_s: float = 5.0, retries: int = 2,
                 curve: ClientCurve | None = None, model: Any = None, context: zmq.Context | None = None) -> None:
        self.client = DeviceClient(endpoint, timeout_s=timeout_s, retries=retries, curve=curve, context=context)
        self._model = model
        self._remote_identity: dict[str, Any] = {}
        super().__init__(spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.client.endpoint})"

    def open(self) -> None:
        self.client.connect()
        try:
            spec, params, identity = self.client.spec()
            self.learn_spec(spec, params)
        except Exception:
            self.client.close()
            raise
        self._remote_identity = identity

    def shutdown(self) -> None:
        self.client.close()

    def measure(self, x: np.ndarray, params: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.client.forward(x, params)

    def model(self) -> Any:
        return self._model

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "endpoint": self.client.endpoint, "remote": self._remote_identity}

    def health(self) -> dict[str, Any]:
        return {**super().health(), "transport": dict(self.client.stats)}
