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
    "SCPI_MAX_MESSAGE_BLOCK_BYTES", "SCPI_MAX_MESSAGE_BYTES", "SCPI_MAX_UNREAD_BYTES", "SCPI_QUEUE_BYTES",
    "SCPI_QUEUE_MESSAGES",
    "ZMQ_HANDSHAKE_TIMEOUT_S", "ZMQ_HELD_FLOOR", "ZMQ_IDLE_TIMEOUT_S", "ZMQ_MAX_CONNECTIONS", "ZMQ_MAX_FRAMES",
    "ZMQ_MAX_HANDSHAKES", "ZMQ_MAX_HANDSHAKES_PER_SOURCE", "ZMQ_MAX_HELD_BYTES", "ZMQ_MAX_MESSAGE_BYTES",
    "ZMQ_MAX_PENDING_REPLY_BYTES", "ZMQ_MESSAGE_CAP_MAX", "ZMQ_MESSAGE_CAP_MIN", "ZMQ_REQUEST_TIMEOUT_S",
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

#: one request, all its frames together; the default depends on the device (between the two caps below)
ZMQ_MAX_MESSAGE_BYTES = Limit(None, 1024, 1 << 40)
#: the smallest default request cap (room for the header and any small array)
ZMQ_MESSAGE_CAP_MIN = 1 * MIB
#: the largest default request cap, whatever the device (an explicit ``max_message_bytes`` may exceed it)
ZMQ_MESSAGE_CAP_MAX = 256 * MIB
#: frames of one request; its default is the wire protocol's (the delimiter, the header and every array)
ZMQ_MAX_FRAMES = Limit(None, 1, 1 << 20)
#: authenticated connections (past their handshake); one more is closed when its handshake ends
ZMQ_MAX_CONNECTIONS = Limit(16, 1, 4096)
#: connections still in their handshake, apart from the authenticated ones: when full, a new connection
#: evicts the one that has got least far, the oldest of those (a handshake is a few round trips)
ZMQ_MAX_HANDSHAKES = Limit(8, 1, 4096)
#: of those, from one source address (a new one from an address at its cap evicts that address's own)
ZMQ_MAX_HANDSHAKES_PER_SOURCE = Limit(4, 1, 4096)
#: seconds from a connection's accept to the end of its handshake (CURVE needs two round trips)
ZMQ_HANDSHAKE_TIMEOUT_S = Limit(5.0, 0.0, DAY_S)
#: bytes the whole server holds for its clients (read buffers, frames arriving, requests, decrypted copies,
#: replies not yet sent, with Python's own overhead per buffer); the default is room for two whole requests
#: and one client's pending replies, and at least ZMQ_HELD_FLOOR
ZMQ_MAX_HELD_BYTES = Limit(None, 64 * 1024, 1 << 42)
ZMQ_HELD_FLOOR = 64 * MIB
#: seconds a connection may send nothing, heartbeats included
ZMQ_IDLE_TIMEOUT_S = Limit(300.0, 0.0, DAY_S)
#: seconds from a request's first byte to its last, and for a reply to make progress
ZMQ_REQUEST_TIMEOUT_S = Limit(30.0, 0.0, DAY_S)
#: replies waiting for one connection before no further request is read from it
ZMQ_MAX_PENDING_REPLY_BYTES = Limit(16 * MIB, 0, 1 << 40)

# -- the SCPI bench (servers.scpi_bench), per instrument or per connection ----------------------------------------

#: the length a block header may declare; the default depends on the device (between the two caps below)
SCPI_MAX_BLOCK_BYTES = Limit(None, 1, 999_999_999)
#: the smallest default block cap (room for any small parameter array)
SCPI_BLOCK_CAP_MIN = 1 * MIB
#: the largest default block cap, whatever the device (an explicit ``max_block_bytes`` may exceed it): far more
#: than a training sends in one block (an evaluation batch of 500 samples of 1,000 values is 4 MB), about what a
#: real arbitrary waveform generator's or spectrometer's memory holds, and within the 64 MiB a stranger's
#: unfinished message may cost the bench
SCPI_BLOCK_CAP_MAX = 32 * MIB
#: clients per instrument; when all are taken, the one idle longest makes room for a new one
SCPI_MAX_CONNECTIONS = Limit(8, 1, 1 << 16)
#: seconds a connection may sit with nothing in progress (the bench also takes None: never)
SCPI_IDLE_TIMEOUT_S = Limit(3600.0, 0.0, math.inf)
#: seconds a message (block included) may take to arrive, and a client to start reading a pending answer
SCPI_COMMAND_TIMEOUT_S = Limit(60.0, 0.0, math.inf)
#: answer bytes that may wait for a client to read them
SCPI_MAX_UNREAD_BYTES = Limit(8 * MIB, 2, 1 << 40)
#: the bytes of all blocks of one program message together; the default depends on the device: one block at the
#: block cap and every parameter array, the most a legitimate message carries (a driver sends one block a message)
SCPI_MAX_MESSAGE_BLOCK_BYTES = Limit(None, 1, 1 << 40)
#: the longest program message outside block payloads (block headers count): the longest legitimate one is a few
#: hundred bytes (every setting of an instrument chained with ';', or a parameter's name and a block header), so
#: 4 KiB leaves room; checked as the bytes arrive, before anything is parsed, and it bounds what parsing a message
#: costs and how many blocks one message may carry (at least 3 header bytes each)
SCPI_MAX_MESSAGE_BYTES = 4 << 10
#: received messages waiting for execution: reading from the connection pauses above either bound
SCPI_QUEUE_MESSAGES = 16
SCPI_QUEUE_BYTES = 4 * MIB
#: entries of a connection's error queue
SCPI_ERROR_QUEUE_LEN = 32
#: a block's buffer holds what has arrived and room for as much again, or for this much more
SCPI_BLOCK_CHUNK = 64 << 10
