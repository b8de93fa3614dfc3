"""Servers: the simulated SCPI lab bench (:mod:`.scpi_bench`) and the ZeroMQ device server (:mod:`.zmq_server`).

The device server speaks ZeroMQ's wire protocol itself (:mod:`.zmtp`, the server side of ZMTP 3.x with NULL and
CURVE security), so that the size, frame count and time of every request are bounded while it arrives.
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
