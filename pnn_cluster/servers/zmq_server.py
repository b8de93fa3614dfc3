"""ZeroMQ device server: any :class:`~pnn_cluster.devices.base.Device` behind a ROUTER endpoint.

The wire protocol is specified in ``docs/wire_protocol.md``; its message
layout and array frames are :mod:`pnn_cluster.protocol.zmq`, shared with the
client (:mod:`pnn_cluster.drivers.zmq_client`).

Transport: the server side of ZMTP 3.x is :mod:`pnn_cluster.servers.zmtp`
(plain sockets, no libzmq), so that every limit holds while a request
arrives: its total size and frame count (checked from each frame header,
before the frame is read), the number of connections, an idle timeout, a
deadline for each request and a cap on replies waiting for a client that does
not read them. A peer that breaks one is disconnected and counted in
``health``; any unmodified ZeroMQ DEALER or REQ client connects as before.

Safety: every request is checked before the device sees it (envelope,
header size and JSON, protocol version, op, array descriptors against frame
sizes, dtype, then the device's own limits via ``Device.forward`` /
``Device.set_params``). A refused request gets an error reply naming the
field, the value and what is allowed; the server keeps serving and counts
the refusal (``health``).

The server binds to loopback unless ``allow_remote`` is set, and then
requires CURVE (encryption, and an allow-list of client public keys read from
a directory of key files, every one of which must parse) unless ``insecure``
is set too. A client whose key is not listed is refused during the handshake
and never gets a reply.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pnn_cluster.devices.base import Device
from pnn_cluster.devices.spec import DeviceSpec, LimitError
from pnn_cluster.protocol.zmq import (
    MAX_ARRAYS,
    MAX_HEADER_BYTES,
    OPS,
    PROTOCOL_VERSION,
    ProtocolError,
    decode_arrays,
    encode_arrays,
    load_header,
    short_repr,
)
from pnn_cluster.servers import BindError, is_loopback_host
from pnn_cluster.servers.curve_keys import CurveKeyError, CurveKeys, load_curve_keys
from pnn_cluster.servers.limits import (
    ZMQ_HANDSHAKE_TIMEOUT_S,
    ZMQ_IDLE_TIMEOUT_S,
    ZMQ_MAX_CONNECTIONS,
    ZMQ_MAX_HANDSHAKES,
    ZMQ_MAX_HANDSHAKES_PER_SOURCE,
    ZMQ_MAX_MESSAGE_BYTES,
    ZMQ_MAX_PENDING_REPLY_BYTES,
    ZMQ_MESSAGE_CAP_MAX,
    ZMQ_MESSAGE_CAP_MIN,
    ZMQ_REQUEST_TIMEOUT_S,
)
from pnn_cluster.servers.listeners import listen
from pnn_cluster.servers.zmtp import Limits, RouterServer

__all__ = [
    "CurveKeyError", "CurveServerConfig", "DEFAULT_IDLE_TIMEOUT_S", "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_PENDING_REPLY_BYTES", "DEFAULT_REQUEST_TIMEOUT_S", "DeviceServer", "check_bind",
    "default_max_message_bytes",
]

# the defaults under the names this module has always had (stated in .limits)
DEFAULT_MAX_CONNECTIONS = ZMQ_MAX_CONNECTIONS.default
DEFAULT_IDLE_TIMEOUT_S = ZMQ_IDLE_TIMEOUT_S.default
DEFAULT_REQUEST_TIMEOUT_S = ZMQ_REQUEST_TIMEOUT_S.default
DEFAULT_MAX_PENDING_REPLY_BYTES = ZMQ_MAX_PENDING_REPLY_BYTES.default
#: frames of one request: the empty delimiter, the header and at most MAX_ARRAYS arrays
MAX_REQUEST_FRAMES = MAX_ARRAYS + 2
#: bytes of one array on the wire at most (float64)
_ITEM = 8


def default_max_message_bytes(spec: DeviceSpec) -> int:
    """The largest request a client legitimately sends this device, within the default bounds.

    A forward of ``spec.max_batch`` samples with every parameter array beside it, as float64, and a header of
    the largest size; at least :data:`~.limits.ZMQ_MESSAGE_CAP_MIN`, at most :data:`~.limits.ZMQ_MESSAGE_CAP_MAX`.
    """
    largest = MAX_HEADER_BYTES + _ITEM * (spec.max_batch * spec.input.size + sum(p.numel for p in spec.params))
    return int(min(ZMQ_MESSAGE_CAP_MAX, max(ZMQ_MESSAGE_CAP_MIN, largest)))


def check_bind(endpoint: str, allow_remote: bool = False) -> str:
    """Validate a bind endpoint; ``tcp://host:0`` becomes ``tcp://host:*`` (the OS picks the port)."""
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise BindError(f"bind: {endpoint!r} is not a ZeroMQ endpoint; allowed: tcp://127.0.0.1:PORT, ipc://PATH")
    scheme, _, addr = endpoint.partition("://")
    if scheme == "ipc":
        return endpoint
    if scheme != "tcp":
        raise BindError(f"bind: transport {scheme!r}; allowed: tcp, ipc")
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise BindError(f"bind: {endpoint!r} has no port; allowed: tcp://HOST:PORT (PORT 0 or * for any)")
    if port == "0":
        port = "*"
    if port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
        raise BindError(f"bind: port {port!r}; allowed: 1..65535, 0 or *")
    if not allow_remote and not is_loopback_host(host):
        raise BindError(f"bind: {host!r} is not a loopback address; allowed: 127.0.0.1, [::1], localhost, "
                        "ipc:// (pass allow_remote=True / --allow-remote to serve a network, with CURVE)")
    return f"tcp://{host}:{port}"


@dataclass(frozen=True)
class CurveServerConfig:
    """CURVE for a server: its key pair and a directory of allowed client public keys.

    ``secret_key_file`` is the ``<name>.key_secret`` file written by
    ``zmq.auth.create_certificates``; every ``*.key`` file in
    ``allowed_clients_dir`` is a client allowed to connect. The keys are read
    when the server starts (:meth:`load`); a file that cannot be parsed stops
    the start with a :class:`~pnn_cluster.servers.curve_keys.CurveKeyError` naming it.
    """

    secret_key_file: Path
    allowed_clients_dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "secret_key_file", Path(self.secret_key_file))
        object.__setattr__(self, "allowed_clients_dir", Path(self.allowed_clients_dir))
        if not self.secret_key_file.is_file():
            raise FileNotFoundError(f"curve: server secret key file {self.secret_key_file} does not exist "
                                    "(create one with zmq.auth.create_certificates)")
        if not self.allowed_clients_dir.is_dir():
            raise FileNotFoundError(f"curve: allowed clients directory {self.allowed_clients_dir} does not exist")
        if not any(self.allowed_clients_dir.glob("*.key")):
            raise FileNotFoundError(f"curve: no client public keys (*.key) in {self.allowed_clients_dir}")

    def load(self) -> CurveKeys:
        """The server's key pair and the allowed client keys, every file parsed (:class:`CurveKeyError` if not)."""
        return load_curve_keys(self.secret_key_file, self.allowed_clients_dir)


class DeviceServer:
    """Serve one device over ZeroMQ (ZMTP). Requests are handled one at a time, in arrival order.

    Constructing does no I/O; :meth:`start` reads the CURVE keys, binds, and
    serves: the connections in an I/O thread, the device in its own thread
    (it is connected there: that thread owns the instrument). :meth:`stop`
    shuts down cleanly.

    Limits (see ``docs/wire_protocol.md``, and :mod:`.zmtp` for what each
    guarantees; defaults and ranges in :mod:`pnn_cluster.servers.limits`):
    ``max_message_bytes`` for a whole request (all frames; None: what the
    device's spec needs, :func:`default_max_message_bytes`, known once the
    device is connected), at most ``MAX_ARRAYS + 2`` frames,
    ``max_connections`` authenticated connections, ``max_handshakes``
    connections in their handshake (``max_handshakes_per_source`` from one
    address, ``handshake_timeout_s`` to finish), ``idle_timeout_s`` of
    silence before a connection is closed, ``request_timeout_s`` from a
    request's first byte to its last (and for a reply to make progress),
    ``max_pending_reply_bytes`` of replies queued for a connection before its
    next request is read, ``max_held_bytes`` held for all clients together
    (None: room for two whole requests and one client's replies).
    """

    def __init__(self, device: Device, bind: str = "tcp://127.0.0.1:5555", *,
                 max_message_bytes: int | None = None, curve: CurveServerConfig | None = None,
                 allow_remote: bool = False, insecure: bool = False, name: str | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 max_pending_reply_bytes: int = DEFAULT_MAX_PENDING_REPLY_BYTES,
                 max_handshakes: int = ZMQ_MAX_HANDSHAKES.default,
                 max_handshakes_per_source: int = ZMQ_MAX_HANDSHAKES_PER_SOURCE.default,
                 handshake_timeout_s: float = ZMQ_HANDSHAKE_TIMEOUT_S.default,
                 max_held_bytes: int | None = None) -> None:
        low, high = ZMQ_MAX_MESSAGE_BYTES.low, ZMQ_MAX_MESSAGE_BYTES.high
        if max_message_bytes is not None \
                and not (isinstance(max_message_bytes, int) and low <= max_message_bytes <= high):
            raise BindError(f"max_message_bytes: {max_message_bytes!r}; allowed: integers "
                            f"{low}..2**{high.bit_length() - 1}, or None (from the device's spec)")
        self._limit_args = dict(max_frames=MAX_REQUEST_FRAMES, max_connections=max_connections,
                                idle_timeout_s=idle_timeout_s, request_timeout_s=request_timeout_s,
                                max_pending_reply_bytes=max_pending_reply_bytes, max_handshakes=max_handshakes,
                                max_handshakes_per_source=max_handshakes_per_source,
                                handshake_timeout_s=handshake_timeout_s, max_held_bytes=max_held_bytes)
        self._max_message_arg = max_message_bytes
        # checked now, with the largest default request if the device's own is not known before it connects
        self.limits = self._limits(max_message_bytes or (default_max_message_bytes(device.spec)
                                                         if device.spec_known else ZMQ_MESSAGE_CAP_MAX))
        self.device = device
        self.bind = check_bind(bind, allow_remote)
        if allow_remote and curve is None and not insecure:
            raise BindError(f"bind: {self.bind} with allow_remote but without CURVE would serve the device "
                            "unencrypted to anyone who can reach it; set up CURVE (--curve-secret SERVER.key_secret "
                            "--curve-allow DIR, keys from zmq.auth.create_certificates) or pass --insecure "
                            "(insecure=True) to serve it anyway")
        self.curve = curve
        self.insecure = insecure
        self.name = name
        self.instance = uuid.uuid4().hex[:12]
        self.endpoint: str | None = None
        self.stats: dict[str, Any] = {
            "requests": 0, "ok": 0, "rejected": 0, "rejected_limit": 0, "rejected_protocol": 0,
            "device_errors": 0,
        }
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None
        self._router: RouterServer | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> DeviceServer:
        if self._thread is not None:
            return self
        keys = self.curve.load() if self.curve is not None else None
        listener = listen(self.bind)
        router = RouterServer(listener, self.limits, keys, name=f"device-server-{self.instance}")
        self.endpoint = listener.endpoint
        self._router = router
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._thread_main, args=(router,),
                                        name=f"device-server-{self.instance}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            router.stop()
            raise RuntimeError(f"device server did not start within {timeout_s} s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            router.stop()
            raise self._error
        router.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread is None or self._router is None:
            return
        self._router.stop(timeout_s)  # no new requests; those not answered yet are cancelled
        self._router.requests.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(f"device server {self.endpoint}: still busy after {timeout_s} s; "
                               "its thread (a daemon) is left to finish")
        self._thread = None

    def __enter__(self) -> DeviceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _thread_main(self, router: RouterServer) -> None:
        try:
            self.device.connect()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        try:  # the device's own request cap, now that its spec is known
            self.limits = self._limits(self._max_message_arg or default_max_message_bytes(self.device.spec))
        except BaseException as exc:
            self._error = exc
            self.device.close()
            self._ready.set()
            return
        router.limits = self.limits
        self._ready.set()
        try:
            while True:
                request = router.requests.get()
                if request is None:
                    return
                if request.cancelled:  # its client went away (a Lazy Pirate retry comes on a new connection)
                    router.stats["abandoned"] += 1
                    continue
                router.reply(request, self.handle(request.frames))
        finally:
            self.device.close()

    @property
    def running(self) -> bool:
        """Serving: started, and its device thread alive."""
        return self._thread is not None and self._thread.is_alive()

    def _limits(self, max_message_bytes: int) -> Limits:
        return Limits(max_message_bytes=max_message_bytes, **self._limit_args)

    @property
    def max_message_bytes(self) -> int:
        return self.limits.max_message_bytes

    # -- requests -----------------------------------------------------------------------------------

    def handle(self, frames: list[Any]) -> list[Any]:
        """One request (without the routing id) -> the reply frames (delimiter, header, arrays)."""
        self.stats["requests"] += 1
        rid: Any = None
        try:
            if not frames or len(frames[0]) != 0:
                raise ProtocolError("envelope", "first frame must be empty (the REQ delimiter)",
                                    f"{len(frames[0])} bytes" if frames else "no frames", "b''")
            if len(frames) < 2:
                raise ProtocolError("header", "missing", None, "a JSON object frame after the delimiter")
            total = sum(len(f) for f in frames)
            if total > self.max_message_bytes:
                raise ProtocolError("message", "too large", f"{total} bytes", f"at most {self.max_message_bytes}")
            if len(frames) - 2 > MAX_ARRAYS:
                raise ProtocolError("arrays", "too many frames", len(frames) - 2, f"at most {MAX_ARRAYS}")
            header = load_header(frames[1])
            rid = header.get("id")
            if rid is not None and not (isinstance(rid, (int, str)) and not isinstance(rid, bool)
                                        and len(str(rid)) <= 64):
                rid = None
                raise ProtocolError("id", "must be an integer or a short string", short_repr(header.get("id")),
                                    "integer, string up to 64 characters, or absent")
            self._check_header(header)
            return self._dispatch(header, frames[2:], rid)
        except ProtocolError as exc:
            self.stats["rejected"] += 1
            self.stats["rejected_protocol"] += 1
            return self._error_reply(rid, "protocol", exc.field, exc.problem, exc.value, exc.allowed, str(exc))
        except LimitError as exc:
            self.stats["rejected"] += 1
            self.stats["rejected_limit"] += 1
            return self._error_reply(rid, "limit", exc.field, exc.problem, exc.value, exc.allowed, str(exc),
                                     device=exc.device)
        except Exception as exc:  # the device failed; the server must keep serving
            self.stats["device_errors"] += 1
            return self._error_reply(rid, "device", "device", type(exc).__name__, None, "", str(exc))

    @staticmethod
    def _check_header(header: dict[str, Any]) -> None:
        v = header.get("v")
        if v != PROTOCOL_VERSION or isinstance(v, bool):
            raise ProtocolError("v", "unsupported protocol version", short_repr(v), str(PROTOCOL_VERSION))
        unknown = set(header) - {"v", "op", "id", "arrays"}
        if unknown:
            raise ProtocolError(sorted(unknown)[0], "unknown header key", None, "v, op, id, arrays")
        if header.get("op") not in OPS:
            raise ProtocolError("op", "unknown operation", short_repr(header.get("op")), f"one of {list(OPS)}")

    def _dispatch(self, header: dict[str, Any], frames: list[Any], rid: Any) -> list[Any]:
        op = header["op"]
        arrays = decode_arrays(header.get("arrays", []), frames)
        spec = self.device.spec
        allowed = {"x"} if op == "forward" else set()
        if op in ("forward", "set_params"):
            allowed |= {f"params.{n}" for n in spec.param_names}
        for name in arrays:
            if name not in allowed:
                raise ProtocolError(f"arrays.{name}", f"not a field of {op}", None,
                                    f"{sorted(allowed)}" if allowed else "no arrays")
        params = {k[len("params."):]: v for k, v in arrays.items() if k.startswith("params.")}
        if op == "health":
            return self._reply(rid, {"health": self.health()})
        if op == "spec":
            out = encode_arrays({f"params.{k}": v for k, v in self.device.params.items()})
            return self._reply(rid, {"spec": spec.to_dict(), "identity": self.device.identity()}, out)
        if op == "set_params":
            self.device.set_params(params)
            return self._reply(rid, {})
        if "x" not in arrays:
            raise ProtocolError("arrays", "forward needs an array with field 'x'", None,
                                f"x of shape (batch, {spec.input.size})")
        y = self.device.forward(arrays["x"], params or None)
        return self._reply(rid, {}, encode_arrays({"y": y}))

    def health(self) -> dict[str, Any]:
        transport: dict[str, Any] = {"connections": 0, "connections_accepted": 0, "abandoned": 0, "dropped": {}}
        if self._router is not None:
            transport = {**self._router.stats, "dropped": dict(self._router.stats["dropped"])}
        return {
            **self.device.health(),
            "server": {**self.stats, **transport, "instance": self.instance, "endpoint": self.endpoint,
                       "uptime_s": round(time.monotonic() - self._started, 3), "curve": self.curve is not None,
                       "pid": os.getpid(), "limits": self.limits.as_dict()},
        }

    def _reply(self, rid: Any, body: dict[str, Any], arrays: tuple[list[Any], list[Any]] | None = None) -> list[Any]:
        self.stats["ok"] += 1
        descs, frames = arrays if arrays is not None else ([], [])
        header = {"v": PROTOCOL_VERSION, "id": rid, "ok": True, **body, "arrays": descs}
        return [b"", json.dumps(header, default=_json_default, allow_nan=False).encode(), *frames]

    def _error_reply(self, rid: Any, kind: str, field: str, problem: str, value: Any, allowed: str,
                     message: str, device: str | None = None) -> list[Any]:
        err = {"kind": kind, "field": field, "problem": problem,
               "value": None if value is None else str(value), "allowed": allowed, "message": message,
               "device": device or self.device.spec.name}
        header = {"v": PROTOCOL_VERSION, "id": rid, "ok": False, "error": err, "arrays": []}
        return [b"", json.dumps(header, default=_json_default).encode()]


def _json_default(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return repr(v)
