"""Every limit of the two servers, stated once: its default and the values it may take.

The servers take their defaults from here and check their arguments against
these ranges; ``pnn-cluster serve-device`` and ``pnn-cluster sim-instrument``
build their flags' defaults and refusals from them too (a flag in MiB takes
the byte range rounded inwards: thousandths of a MiB at the low end, whole
MiB at the top). This module imports nothing but the standard library, so the
command line can read it without importing a server.

What each limit bounds, and what happens beyond it, is told where it is
enforced: :mod:`.zmtp` for the device server's transport, :mod:`.scpi_bench`
for the SCPI bench.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "DAY_S", "Limit", "MIB", "SCPI_BLOCK_CAP_MAX", "SCPI_BLOCK_CAP_MIN", "SCPI_BLOCK_CHUNK", "SCPI_COMMAND_TIMEOUT_S",
    "SCPI_ERROR_QUEUE_LEN", "SCPI_IDLE_TIMEOUT_S", "SCPI_MAX_BLOCK_BYTES", "SCPI_MAX_CONNECTIONS",
    "SCPI_MAX_MESSAGE_BYTES", "SCPI_MAX_UNREAD_BYTES", "SCPI_QUEUE_BYTES", "SCPI_QUEUE_MESSAGES",
    "ZMQ_IDLE_TIMEOUT_S", "ZMQ_MAX_CONNECTIONS", "ZMQ_MAX_FRAMES", "ZMQ_MAX_MESSAGE_BYTES",
    "ZMQ_MAX_PENDING_REPLY_BYTES", "ZMQ_REQUEST_TIMEOUT_S",
]

MIB = 1 << 20
#: the longest timeout a command-line flag takes, and the device server at all
DAY_S = 86400.0


@dataclass(frozen=True)
class Limit:
    """One limit: its default and the least and most it may be (both inclusive, except a timeout's 0)."""

    default: int | float | None
    low: int | float
    high: int | float


# -- the ZeroMQ device server (servers.zmq_server on its transport servers.zmtp) --------------------------------

#: one request, all its frames together
ZMQ_MAX_MESSAGE_BYTES = Limit(256 * MIB, 1024, 1 << 40)
#: frames of one request; its default is the wire protocol's (the delimiter, the header and every array)
ZMQ_MAX_FRAMES = Limit(None, 1, 1 << 20)
ZMQ_MAX_CONNECTIONS = Limit(16, 1, 4096)
#: seconds a connection may send nothing, heartbeats included
ZMQ_IDLE_TIMEOUT_S = Limit(300.0, 0.0, DAY_S)
#: seconds from a request's first byte to its last, for a handshake, and for a reply to make progress
ZMQ_REQUEST_TIMEOUT_S = Limit(30.0, 0.0, DAY_S)
#: replies waiting for one connection before no further request is read from it
ZMQ_MAX_PENDING_REPLY_BYTES = Limit(16 * MIB, 0, 1 << 40)

# -- the SCPI bench (servers.scpi_bench), per instrument or per connection ----------------------------------------

#: the length a block header may declare; the default depends on the device (between the two caps below)
SCPI_MAX_BLOCK_BYTES = Limit(None, 1, 999_999_999)
#: the smallest default block cap (room for any small parameter array)
SCPI_BLOCK_CAP_MIN = 1 * MIB
#: the largest default block cap, whatever the device (an explicit ``max_block_bytes`` may exceed it)
SCPI_BLOCK_CAP_MAX = 256 * MIB
#: clients per instrument
SCPI_MAX_CONNECTIONS = Limit(8, 1, 1 << 16)
#: seconds a connection may sit with nothing in progress (the bench also takes None: never)
SCPI_IDLE_TIMEOUT_S = Limit(3600.0, 0.0, math.inf)
#: seconds a message (block included) may take to arrive, and a client to start reading a pending answer
SCPI_COMMAND_TIMEOUT_S = Limit(60.0, 0.0, math.inf)
#: answer bytes that may wait for a client to read them
SCPI_MAX_UNREAD_BYTES = Limit(8 * MIB, 2, 1 << 40)
#: the longest program message outside blocks
SCPI_MAX_MESSAGE_BYTES = 1 * MIB
#: received messages waiting for execution: reading from the connection pauses above either bound
SCPI_QUEUE_MESSAGES = 16
SCPI_QUEUE_BYTES = 4 * MIB
#: entries of a connection's error queue
SCPI_ERROR_QUEUE_LEN = 32
#: a block's buffer holds what has arrived and room for as much again, or for this much more
SCPI_BLOCK_CHUNK = 64 << 10
