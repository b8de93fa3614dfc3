"""``pnn-cluster serve-device``: a device (simulated, VISA-backed or a user's class) on a ZeroMQ ROUTER socket."""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pnn_cluster.devices import SYSTEMS, UserDeviceError, make_device, make_user_device
from pnn_cluster.devices.base import Device, DeviceError
from pnn_cluster.servers.limits import (  # the servers' limits, stated there; no server is imported for --help
    DAY_S,
    MIB,
    ZMQ_HANDSHAKE_TIMEOUT_S,
    ZMQ_IDLE_TIMEOUT_S,
    ZMQ_MAX_CONNECTIONS,
    ZMQ_MAX_HANDSHAKES,
    ZMQ_MAX_HANDSHAKES_PER_SOURCE,
    ZMQ_MAX_HELD_BYTES,
    ZMQ_MAX_MESSAGE_BYTES,
    ZMQ_MAX_PENDING_REPLY_BYTES,
    ZMQ_MESSAGE_CAP_MAX,
    ZMQ_MESSAGE_CAP_MIN,
    ZMQ_REQUEST_TIMEOUT_S,
    Limit,
)

DEFAULT_MAX_CONNECTIONS = ZMQ_MAX_CONNECTIONS.default
DEFAULT_IDLE_TIMEOUT_S = ZMQ_IDLE_TIMEOUT_S.default
DEFAULT_REQUEST_TIMEOUT_S = ZMQ_REQUEST_TIMEOUT_S.default
DEFAULT_MAX_PENDING_REPLY_BYTES = ZMQ_MAX_PENDING_REPLY_BYTES.default


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve-device", help="serve a device over ZeroMQ (wire protocol: docs/wire_protocol.md)",
        description="Serves one device to remote device actors over ZeroMQ until SIGINT or SIGTERM. Every request "
                    "is checked against the device's limits before it reaches the device; refused requests get "
                    "an error reply naming the field, value and allowed range, and are counted in the health "
                    "reply. Binds to loopback unless --allow-remote is given; a server that other machines "
                    "reach needs CURVE (--curve-secret, --curve-allow; keys: `pnn-cluster keys`) unless "
                    "--insecure says otherwise.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--system", choices=sorted(SYSTEMS), help="serve a simulated system")
    src.add_argument("--visa-config", metavar="FILE", type=Path,
                     help="serve a VISA device described by a YAML/JSON file {source: {driver, resource, "
                          "timeout_s, settings}, sink: {...}, backend, spec}")
    src.add_argument("--device", metavar="MODULE:CLASS",
                     help="serve your own Device class, e.g. --device mylab.amps:TanhAmp (importable here: "
                          "installed or on PYTHONPATH), constructed with the --option values as keyword arguments")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="ZeroMQ endpoint to bind (default %(default)s; port 0 lets the OS choose)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding to a non-loopback address (needs CURVE, or --insecure)")
    p.add_argument("--insecure", action="store_true",
                   help="with --allow-remote: serve without CURVE, so anyone who reaches the port may drive the "
                        "device and read its measurements (a closed test network only)")
    p.add_argument("--max-message-mb", default=None, metavar="MB",
                   help="largest request, all frames together, in MiB (default: what the device's spec needs, a "
                        f"batch of max_batch samples with every parameter as float64, {ZMQ_MESSAGE_CAP_MIN // MIB} "
                        f"to {ZMQ_MESSAGE_CAP_MAX // MIB} MiB); a larger request is cut off as its frame headers "
                        "arrive: the connection is closed and there is no reply")
    p.add_argument("--max-connections", default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="most client connections past their handshake (default %(default)s); one more is closed "
                        "when its handshake ends (a ZeroMQ client retries by itself)")
    p.add_argument("--max-handshakes", default=ZMQ_MAX_HANDSHAKES.default, metavar="N",
                   help="connections still in their handshake, apart from --max-connections (default "
                        "%(default)s); a new one that finds them full evicts the one that has got least far, the "
                        "oldest of those, never an authenticated connection")
    p.add_argument("--max-handshakes-per-source", default=ZMQ_MAX_HANDSHAKES_PER_SOURCE.default, metavar="N",
                   help="of those, from one address (default %(default)s); one more evicts that address's own")
    p.add_argument("--handshake-timeout-s", default=ZMQ_HANDSHAKE_TIMEOUT_S.default, metavar="S",
                   help="seconds from a connection to the end of its handshake (default %(default)s)")
    p.add_argument("--max-held-mb", default=None, metavar="MB",
                   help="MiB the server holds for all clients together: requests arriving or being handled, "
                        "decrypted copies, replies not yet read (default: room for two whole requests and one "
                        "client's pending replies, at least 64); beyond it the connection holding the most "
                        "incomplete input is closed")
    p.add_argument("--idle-timeout-s", default=DEFAULT_IDLE_TIMEOUT_S, metavar="S",
                   help="seconds a connection may send nothing, heartbeats included (default %(default)s); "
                        "then it is closed (a ZeroMQ client reconnects when it next sends)")
    p.add_argument("--request-timeout-s", default=DEFAULT_REQUEST_TIMEOUT_S, metavar="S",
                   help="seconds from a request's first byte to its last (default %(default)s); a request still "
                        "incomplete then, or a reply that makes no progress for as long, closes the connection")
    p.add_argument("--max-pending-reply-mb", default=DEFAULT_MAX_PENDING_REPLY_BYTES / MIB, metavar="MB",
                   help="MiB of replies that may wait for one client to read them (default %(default)s); beyond "
                        "it no further request is read from that client until it reads its replies")
    p.add_argument("--curve-secret", metavar="FILE", type=Path,
                   help="enable CURVE: the server's <name>.key_secret file (zmq.auth.create_certificates)")
    p.add_argument("--curve-allow", metavar="DIR", type=Path,
                   help="with --curve-secret: directory of allowed client public keys (*.key)")
    add_device_options(p)
    p.set_defaults(func=run)


def add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a constructor option: a system size (--option n_in=64) or a keyword argument of your "
                        "--device class; VALUE is a YAML scalar (42, 0.5, 1e-3, true, text) (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed of the simulated imperfections")
    p.add_argument("--ideal", action="store_true", help="no noise, miscalibration, drift or latency")
    p.add_argument("--no-latency", action="store_true", help="keep the imperfections, drop the simulated latency")


# PyYAML reads YAML 1.1, where 1e-3 (no dot) is a string; a lab means a number
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["n_in=64", "gain=0.5", "label=amp A"]`` -> ``{"n_in": 64, "gain": 0.5, "label": "amp A"}``.

    Each VALUE is read as a YAML scalar: an int, a float, a bool, null or a string.
    """
    import yaml

    from pnn_cluster.commands import UsageError

    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--option {item!r}: expected KEY=VALUE with KEY an identifier")
        if key in options:
            raise UsageError(f"--option {item!r}: {key} given twice; allowed: each option once")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, str) and _FLOAT.fullmatch(text.strip()):
            value = float(text)
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise UsageError(f"--option {item!r}: {type(value).__name__} value; allowed: a YAML scalar "
                             "(integer, float, true/false, null or a string)")
        options[key] = value
    return options


def simulated_device(args: argparse.Namespace) -> Device:
    """Build the simulated device the command line describes."""
    from pnn_cluster.commands import UsageError

    options = parse_options(args.option)
    try:
        device = make_device(args.system, **options)
        imp = device.imperfections
        if args.ideal:
            imp = imp.ideal(seed=imp.seed)
        if args.no_latency:
            imp = imp.with_(latency_call_s=0.0, latency_sample_s=0.0)
        if args.seed is not None:
            imp = imp.with_(seed=args.seed)
        if imp != device.imperfections:
            device = make_device(args.system, imperfections=imp, **options)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--system {args.system} with options {options}: {exc}") from None
    return device


def user_device(args: argparse.Namespace) -> Device:
    """Construct the user's Device class named by ``--device`` with the ``--option`` values (no I/O)."""
    from pnn_cluster.commands import UsageError

    for flag, given in (("--seed", args.seed is not None), ("--ideal", args.ideal), ("--no-latency", args.no_latency)):
        if given:
            raise UsageError(f"{flag} applies to a simulated --system only; your --device class takes --option values")
    try:
        return make_user_device(args.device, parse_options(args.option))
    except UserDeviceError as exc:
        raise UsageError(f"--device: {exc}") from None


def served_device(args: argparse.Namespace) -> tuple[Device, str]:
    """The device the command line asks to serve, and how to name it in the banner. Constructing does no I/O."""
    if args.visa_config is not None:
        from pnn_cluster.drivers.visa import VisaDevice

        return VisaDevice.from_config(_load_mapping(args.visa_config)), f"VISA device from {args.visa_config}"
    if args.device is not None:
        return user_device(args), f"{args.device}"
    return simulated_device(args), f"simulated {args.system}"


class StopSignals:
    """Turn SIGINT and SIGTERM into an event while a server runs.

    The handlers stay installed until the ``with`` block ends, so a second
    signal during shutdown (``timeout`` and shells often deliver one to the
    whole process group) cannot interrupt the clean stop.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: list[str] = []
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.received.append(signal.Signals(signum).name)
        self.event.set()

    def __enter__(self) -> StopSignals:
        self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def wait(self) -> str:
        self.event.wait()
        return self.received[0]


def _load_mapping(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def check_remote(allow_remote: bool, curve: bool, insecure: bool) -> None:
    """``--allow-remote`` serves other machines: only with CURVE, or when ``--insecure`` says so (with a warning)."""
    from pnn_cluster.commands import UsageError

    if not allow_remote or curve:
        return
    if not insecure:
        raise UsageError("--allow-remote without CURVE lets anyone who reaches the port drive the device; give "
                         "--curve-secret and --curve-allow (keys: `pnn-cluster keys`), or --insecure to serve "
                         "unencrypted and unauthenticated anyway")
    print("pnn-cluster serve-device: warning: --insecure: serving the network without CURVE; anyone who reaches "
          "the port may drive the device and read its measurements", file=sys.stderr, flush=True)


# -- numeric flags: each refused value is one usage error naming the flag, the value and what is allowed ------------

_INTEGER = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _shown(value: Any) -> str:
    text = str(value)
    return text if text and not any(c.isspace() for c in text) else repr(text)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _parse(value: Any, integer: bool) -> int | float | None:
    """A flag's value as a number (the default comes as one), or None: plain decimal digits only, finite."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number: int | float = value
    else:
        text = str(value).strip()
        if not (_INTEGER if integer else _DECIMAL).fullmatch(text):
            return None
        number = int(text) if integer else float(text)
    if integer and not isinstance(number, int):
        return None
    return number if math.isfinite(number) else None


def mib_range(limit: Limit) -> tuple[float, int]:
    """A byte limit's range as a flag in MiB takes it: rounded inwards, to thousandths at the low end, whole MiB at
    the top (so that every value the flag takes, the server takes too)."""
    return math.ceil(limit.low * 1000 / MIB) / 1000, int(limit.high // MIB)


def int_flag(flag: str, value: Any, low: int, high: int) -> int:
    """``--max-connections 4`` -> 4; UsageError outside ``low..high`` or not an integer."""
    from pnn_cluster.commands import UsageError

    number = _parse(value, integer=True)
    if number is None or not low <= number <= high:
        raise UsageError(f"{flag} {_shown(value)}; allowed: an integer {low}..{high}")
    return int(number)


def seconds_flag(flag: str, value: Any, high: float = DAY_S) -> float:
    """Seconds, ``0 < S <= high``."""
    from pnn_cluster.commands import UsageError

    number = _parse(value, integer=False)
    if number is None or not 0 < number <= high:
        raise UsageError(f"{flag} {_shown(value)}; allowed: seconds, 0 < S <= {_num(high)}")
    return float(number)


def seconds_or_never_flag(flag: str, value: Any, high: float = DAY_S) -> float | None:
    """Seconds, ``0 < S <= high``, or 0 for never (None)."""
    from pnn_cluster.commands import UsageError

    number = _parse(value, integer=False)
    if number == 0:
        return None
    if number is None or not 0 < number <= high:
        raise UsageError(f"{flag} {_shown(value)}; allowed: seconds, 0 < S <= {_num(high)}, or 0 (never)")
    return float(number)


def mib_flag(flag: str, value: Any, low: float, high: float, why: str = "") -> int:
    """MiB (a decimal number, ``low <= MB <= high``) -> bytes."""
    from pnn_cluster.commands import UsageError

    number = _parse(value, integer=False)
    if number is None or not low <= number <= high:
        raise UsageError(f"{flag} {_shown(value)}; allowed: MiB, {_num(low)} .. {_num(high)}{why}")
    return int(number * MIB)


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.commands import UsageError
    from pnn_cluster.servers import BindError
    from pnn_cluster.servers.zmq_server import CurveServerConfig, DeviceServer

    if (args.curve_secret is None) != (args.curve_allow is None):
        raise UsageError("--curve-secret and --curve-allow go together")
    max_message_bytes = None if args.max_message_mb is None else \
        mib_flag("--max-message-mb", args.max_message_mb, *mib_range(ZMQ_MAX_MESSAGE_BYTES))
    max_connections = int_flag("--max-connections", args.max_connections, ZMQ_MAX_CONNECTIONS.low,
                               ZMQ_MAX_CONNECTIONS.high)
    max_handshakes = int_flag("--max-handshakes", args.max_handshakes, ZMQ_MAX_HANDSHAKES.low,
                              ZMQ_MAX_HANDSHAKES.high)
    per_source = int_flag("--max-handshakes-per-source", args.max_handshakes_per_source,
                          ZMQ_MAX_HANDSHAKES_PER_SOURCE.low, ZMQ_MAX_HANDSHAKES_PER_SOURCE.high)
    handshake_timeout_s = seconds_flag("--handshake-timeout-s", args.handshake_timeout_s,
                                       ZMQ_HANDSHAKE_TIMEOUT_S.high)
    max_held_bytes = None if args.max_held_mb is None else \
        mib_flag("--max-held-mb", args.max_held_mb, *mib_range(ZMQ_MAX_HELD_BYTES))
    idle_timeout_s = seconds_flag("--idle-timeout-s", args.idle_timeout_s, ZMQ_IDLE_TIMEOUT_S.high)
    request_timeout_s = seconds_flag("--request-timeout-s", args.request_timeout_s, ZMQ_REQUEST_TIMEOUT_S.high)
    max_pending_reply_bytes = mib_flag("--max-pending-reply-mb", args.max_pending_reply_mb,
                                       *mib_range(ZMQ_MAX_PENDING_REPLY_BYTES))
    curve = CurveServerConfig(args.curve_secret, args.curve_allow) if args.curve_secret else None
    check_remote(args.allow_remote, curve is not None, args.insecure)
    device, what = served_device(args)
    with StopSignals() as signals:
        try:
            server = DeviceServer(device, args.bind, curve=curve, allow_remote=args.allow_remote,
                                  insecure=args.insecure, max_message_bytes=max_message_bytes,
                                  max_connections=max_connections, idle_timeout_s=idle_timeout_s,
                                  request_timeout_s=request_timeout_s,
                                  max_pending_reply_bytes=max_pending_reply_bytes, max_handshakes=max_handshakes,
                                  max_handshakes_per_source=per_source, handshake_timeout_s=handshake_timeout_s,
                                  max_held_bytes=max_held_bytes).start()
        except BindError as exc:
            raise UsageError(str(exc)) from None
        except DeviceError as exc:  # the instruments behind the device could not be opened
            print(f"pnn-cluster serve-device: error: {exc}", file=sys.stderr)
            return 1
        print(f"serving {what} ({server.device.spec.name}) on {server.endpoint} "
              f"(CURVE {'on' if curve else 'off'}); SIGINT or SIGTERM to stop", flush=True)
        sig = signals.wait()
        print(f"{sig}: shutting down", file=sys.stderr, flush=True)
        server.stop()
    h = server.health()["server"]
    print(f"stopped after {h['requests']} requests ({h['rejected']} rejected)", flush=True)
    return 0
