"""Servers: the simulated SCPI lab bench (:mod:`.scpi_bench`) and the ZeroMQ device server (:mod:`.zmq_server`).

The bench is a thin asyncio transport over sans-I/O parts: :mod:`.scpi_wire` (bytes framed into program messages,
messages parsed into commands), :mod:`.scpi_session` (a connection's error queue and dispatch) and
:mod:`.scpi_instruments` (the instruments' command tables and the device behind them).

The device server speaks ZeroMQ's wire protocol itself (:mod:`.zmtp`, the server side of ZMTP 3.x: its I/O
thread and connections; :mod:`.zmtp_codec` the wire format, :mod:`.zmtp_security` the NULL and CURVE mechanisms,
:mod:`.curve_keys` key files, :mod:`.listeners` binding), so that the size, frame count and time of every request
are bounded while it arrives.

Every limit of both servers (default and range) is stated once, in :mod:`.limits`, which the command line reads too.
"""

from __future__ import annotations

import ipaddress

__all__ = ["BindError", "is_loopback_host"]


class BindError(ValueError):
    """A server was asked to listen where it must not (or cannot)."""


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8`` and ``::1``; servers refuse anything else unless told otherwise."""
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
