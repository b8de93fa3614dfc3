"""SCPI on the wire, sans I/O: a byte stream framed into program messages, a message parsed into commands.

:class:`Framer` takes one connection's bytes as they arrive, in pieces of any
size, and gives back events: a complete :class:`Message` (its text and its
IEEE 488.2 definite-length blocks, in order), an :class:`ScpiError` for the
error queue (the message it belongs to is dropped up to its newline), or an
:class:`Overflow` when a block header declares more than the cap, or more
than the blocks of one message may hold together: the stream cannot be
resynchronised without trusting that length, so the connection must close.
:func:`parse_message` turns a message into (header, query, arguments)
commands; :func:`answer_pieces` frames the answers to one message.
Nothing here reads a socket or a clock: the transport (:mod:`.scpi_bench`)
moves the bytes, times the messages and applies back-pressure.

Memory and time: a message's text outside block payloads (its block headers
included) is held up to :data:`~.limits.SCPI_MAX_MESSAGE_BYTES`, checked as
the bytes arrive and before anything parses them; beyond it the message is
dropped with -223 and the rest of it, up to its newline, is discarded as it
arrives, not held. A block's declared length is checked against the cap, and
against what the message's blocks may hold together
(:data:`~.limits.SCPI_MAX_MESSAGE_BLOCK_BYTES`), before anything is allocated
for it, and its buffer grows with the bytes that arrive (to twice what has
arrived, or :data:`~.limits.SCPI_BLOCK_CHUNK` more), never to the declared
length up front; while a block arrives, :meth:`Framer.buffer` is the block's
own memory, so the transport receives straight into it. So one connection's
framer holds at most the text cap, the blocks cap and one read
(:data:`READ_SIZE`), and every byte is scanned a bounded number of times.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from pnn_cluster.protocol.scpi import EMPTY_BLOCK, block_header, format_error
from pnn_cluster.servers.limits import SCPI_BLOCK_CHUNK, SCPI_MAX_MESSAGE_BYTES

__all__ = [
    "Block", "Command", "Framer", "Message", "Overflow", "Quoted", "ScpiError", "answer_pieces", "parse_message",
    "shown",
]

#: bytes received at a time outside blocks
READ_SIZE = 1 << 16

_SPECIAL = re.compile(rb"[\n#\"']")
_HEADER = re.compile(r"^:?(\*[A-Za-z]+|[A-Za-z][A-Za-z0-9]*(?::[A-Za-z][A-Za-z0-9]*)*)(\?)?$")
_MARK = re.compile("\x00(\\d+)\x00$")


class ScpiError(Exception):
    """An entry for the error queue: an SCPI code and a detail naming what was wrong."""

    def __init__(self, code: int, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(self.text())

    def text(self) -> str:
        return format_error(self.code, self.detail)


class Block:
    """An IEEE 488.2 block argument or answer: a bytes-like payload, never copied on the way out."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def pieces(self) -> list[Any]:
        view = memoryview(self.data)
        if not view.nbytes:
            return [EMPTY_BLOCK]
        return [block_header(view.nbytes), view.cast("B")]


class Quoted(str):
    """A parameter that was a quoted string (``"..."`` or ``'...'``): string data, not a number or mnemonic."""

    __slots__ = ()


class Message(NamedTuple):
    """A complete program message: text (``bytes``) and :class:`Block` pieces in order, and the bytes they hold."""

    parts: list[Any]
    nbytes: int


class Overflow(NamedTuple):
    """A block header declared more than the cap (``before`` None), or more than the blocks of one message may
    hold together (``before``: what the message's blocks already hold, ``cap``: their cap); nothing was
    allocated for it, and the connection must close."""

    length: int
    cap: int
    before: int | None = None

    def reason(self) -> str:
        if self.before is not None:
            return (f"blocks of one message: {self.before} bytes and a block of {self.length} more declared; "
                    f"allowed: at most {self.cap} bytes in all")
        return f"block of {self.length} bytes declared; allowed: at most {self.cap}"

    def error(self) -> ScpiError:
        return ScpiError(-223, f"{self.reason()}; closing the connection")


class Command(NamedTuple):
    """One command of a program message: its header as sent, whether it is a query, and its arguments."""

    header: str
    query: bool
    args: list[Any]


# -- framing --------------------------------------------------------------------------------------------------


class Framer:
    """One connection's byte stream -> program messages: newline-terminated text and definite-length blocks.

    Feed it with :meth:`feed` (a copy), or receive into :meth:`buffer` and
    report with :meth:`received` (no copy). :attr:`ended` counts the
    newlines passed (messages complete, refused or dropped), so that the
    transport can time each message from its first byte.

    ``max_block_bytes`` caps one block, ``max_message_block_bytes`` (None: the
    same) all blocks of one message together, ``max_message_bytes`` the
    message's text outside block payloads.
    """

    def __init__(self, max_block_bytes: int, max_message_bytes: int = SCPI_MAX_MESSAGE_BYTES,
                 max_message_block_bytes: int | None = None) -> None:
        self.max_block_bytes = max_block_bytes
        self.max_message_bytes = max_message_bytes
        self.max_message_block_bytes = max_block_bytes if max_message_block_bytes is None else max_message_block_bytes
        self.ended = 0
        self.closed = False  # after an overflow, or once the transport gave up on the stream: input is ignored
        self._scratch = memoryview(bytearray(READ_SIZE))
        self._text = bytearray()
        self._pos = 0  # where scanning the text resumes
        self._parts: list[Any] = []  # of the message in progress
        self._parts_bytes = 0
        self._text_bytes = 0  # the text of those parts, block headers included: counted against the text cap
        self._block_bytes = 0  # the lengths their blocks, and the one arriving, declared: against the blocks cap
        self._discarding = False  # until the next newline
        self.block: bytearray | None = None  # the block being received: what has arrived, then room for more
        self.block_len = 0  # its declared length
        self.block_fill = 0

    @property
    def in_progress(self) -> bool:
        """Part of a message has arrived and its newline has not."""
        return bool(self._text) or self.block is not None or bool(self._parts) or self._discarding

    @property
    def held(self) -> int:
        """Bytes held for the message in progress: its text so far and its blocks' buffers (not the scratch)."""
        parts = sum(len(p.data) if isinstance(p, Block) else len(p) for p in self._parts)
        return len(self._text) + parts + (len(self.block) if self.block is not None else 0)

    def buffer(self) -> memoryview:
        """Where the next bytes go: the rest of the block being received, or a scratch buffer for text."""
        if self.block is not None:
            if self.block_fill == len(self.block):
                self._grow_block()
            return memoryview(self.block)[self.block_fill:]
        return self._scratch

    def received(self, nbytes: int) -> list[Any]:
        """``nbytes`` were written to :meth:`buffer`: the messages, errors and overflow they complete."""
        if self.closed:
            return []
        if self.block is not None:
            self.block_fill += nbytes
            if self.block_fill == self.block_len:
                self._parts.append(Block(self.block))
                self._parts_bytes += self.block_len
                self.block = None
            return []
        self._text += self._scratch[:nbytes]
        events: list[Any] = []
        self._scan(events)
        return events

    def feed(self, data: Any) -> list[Any]:
        """Take ``data`` (any bytes-like piece of the stream): the events it completes, in order."""
        view = memoryview(data).cast("B")
        events: list[Any] = []
        while view.nbytes and not self.closed:
            buf = self.buffer()
            n = min(buf.nbytes, view.nbytes)
            buf[:n] = view[:n]
            del buf  # a block can grow in place only when no view of it is alive
            events += self.received(n)
            view = view[n:]
        return events

    def close(self) -> None:
        """Let go of everything held and ignore what still arrives."""
        self.closed = True
        self._text = bytearray()
        self._pos = 0
        self._parts = []
        self._parts_bytes = 0
        self._text_bytes = 0
        self._block_bytes = 0
        self._discarding = False
        self.block = None

    def _grow_block(self) -> None:
        """Make room for more of the block: double its buffer, never beyond the declared length."""
        buf = self.block
        assert buf is not None
        size = block_room(len(buf), self.block_len)
        try:
            buf.extend(bytes(size - len(buf)))  # realloc: large buffers grow in place (mremap), no copy
        except BufferError:  # a view of it is still alive: copy into a new buffer instead
            grown = bytearray(size)
            grown[: len(buf)] = buf
            self.block = grown

    def _scan(self, events: list[Any]) -> None:
        text = self._text
        while True:
            m = _SPECIAL.search(text, self._pos)
            if m is None:
                if self._discarding:  # the rest of a dropped message is not held
                    del text[:]
                    self._pos = 0
                    return
                self._pos = len(text)
                self._check_length(events)
                return
            i = m.start()
            c = text[i]
            if c == 0x0A:  # end of a program message
                piece = bytes(text[:i])
                del text[: i + 1]
                self._pos = 0
                if self._discarding:
                    self._discarding = False
                elif self._text_bytes + i > self.max_message_bytes:  # arrived whole in one read: same limit
                    events.append(ScpiError(-223, f"message of {self._text_bytes + i} bytes; allowed: at most "
                                                  f"{self.max_message_bytes} outside blocks"))
                else:
                    self._parts.append(piece)
                    events.append(Message(self._parts, self._parts_bytes + len(piece)))
                self._new_message()
                self.ended += 1
                continue
            if self._discarding:
                self._pos = i + 1
                continue
            if self._text_bytes + i > self.max_message_bytes:
                # the text before this quote or block header already passed the cap: the same error as when the
                # stream was cut just before it (judged before the header, whatever the header holds)
                events.append(ScpiError(-223, f"message longer than {self.max_message_bytes} bytes without a "
                                              "newline; dropped up to the next newline"))
                del text[:i]
                self._discard_message(0)
                continue
            if c in (0x22, 0x27):  # a quoted string: '#' inside it is text; a newline still ends the message
                j = text.find(bytes([c]), i + 1)
                nl = text.find(b"\n", i + 1, j if j >= 0 else len(text))  # only up to the quote: linear time
                if nl >= 0:
                    self._pos = nl  # unterminated: the parser reports it
                    continue
                if j < 0:
                    self._pos = i
                    self._check_length(events)
                    return
                self._pos = j + 1
                continue
            # '#': a block, or a non-decimal number (#H1F) that the parser judges later
            if i + 1 >= len(text):
                self._pos = i  # the text before it is within the cap (above), the header at most 11 bytes
                return
            d = text[i + 1]
            if d == 0x30:
                events.append(ScpiError(-161, "indefinite-length blocks (#0) are not accepted; "
                                              "allowed: definite-length #<n><len><data>"))
                self._discard_message(i + 2)
                continue
            if not 0x31 <= d <= 0x39:
                self._pos = i + 1
                continue
            n = d - 0x30
            digits = bytes(text[i + 2: i + 2 + n])
            if i + 2 + n > len(text) and (not digits or digits.isdigit()):
                # the length's digits still arriving (a non-digit among those here is an error now, not a wait:
                # a newline there would otherwise hold the message, and the ones after it, for good); judged
                # once the header is whole, as when it arrives in one piece
                self._pos = i
                return
            if not digits.isdigit():
                # named up to its first non-digit: the same error however the stream was cut
                bad = next(k for k, b in enumerate(digits) if not 0x30 <= b <= 0x39)
                events.append(ScpiError(-161, f"block length {digits[:bad + 1]!r}... is not {n} decimal digits"))
                self._discard_message(i + 2)
                continue
            length = int(digits)
            start = i + 2 + n
            if self._text_bytes + start > self.max_message_bytes:  # the text, header included, comes first
                events.append(ScpiError(-223, f"message of {self._text_bytes + start} bytes before a block's data; "
                                              f"allowed: at most {self.max_message_bytes} outside blocks"))
                self._discard_message(start)
                continue
            # both checked before anything is allocated for the block
            if length > self.max_block_bytes:
                events.append(Overflow(length, self.max_block_bytes))
                self.close()
                return
            if self._block_bytes + length > self.max_message_block_bytes:
                events.append(Overflow(length, self.max_message_block_bytes, self._block_bytes))
                self.close()
                return
            self._parts.append(bytes(text[:i]))
            self._parts_bytes += i
            self._text_bytes += start
            self._block_bytes += length
            avail = len(text) - start
            if avail >= length:
                self._parts.append(Block(bytearray(text[start: start + length])))  # writable, like a big one
                self._parts_bytes += length
                del text[: start + length]
                self._pos = 0
                continue
            # the block is still arriving: its buffer grows with it (buffer()), from what is here already
            block = bytearray(block_room(avail, length))
            block[:avail] = text[start:]
            del text[:]
            self._pos = 0
            self.block, self.block_len, self.block_fill = block, length, avail
            return

    def _new_message(self) -> None:
        self._parts = []
        self._parts_bytes = 0
        self._text_bytes = 0
        self._block_bytes = 0

    def _discard_message(self, pos: int) -> None:
        self._discarding = True
        self._new_message()
        self._pos = pos

    def _check_length(self, events: list[Any]) -> None:
        """The message's text so far passed the cap: -223, and the message dropped up to its newline."""
        if self._text_bytes + len(self._text) > self.max_message_bytes:
            events.append(ScpiError(-223, f"message longer than {self.max_message_bytes} bytes without a "
                                          "newline; dropped up to the next newline"))
            del self._text[:]
            self._discard_message(0)


def block_room(arrived: int, length: int) -> int:
    """Buffer size for a block of ``length`` bytes of which ``arrived`` are here: twice that, or 64 KiB more."""
    return min(length, max(2 * arrived, arrived + SCPI_BLOCK_CHUNK))


# -- parsing ---------------------------------------------------------------------------------------------------


def parse_message(parts: list[Any]) -> tuple[list[Command] | None, list[ScpiError]]:
    """A program message -> its commands (None if it cannot be parsed at all) and the errors found on the way.

    The errors come before anything the commands do, in the order found; a
    command with a malformed header or argument is left out.
    """
    blocks: list[Block] = []
    chunks: list[str] = []
    for p in parts:
        if isinstance(p, Block):
            chunks.append(f"\x00{len(blocks)}\x00")
            blocks.append(p)
            continue
        try:
            s = p.decode("ascii")
        except UnicodeDecodeError:
            bad = next(b for b in p if b > 0x7F)
            return None, [ScpiError(-101, f"byte 0x{bad:02X}; allowed: 7-bit ASCII outside blocks")]
        if "\x00" in s:
            return None, [ScpiError(-101, "byte 0x00; allowed: 7-bit ASCII text outside blocks")]
        chunks.append(s)
    text = "".join(chunks)
    if _open_quote(text):
        return None, [ScpiError(-151, "unterminated quoted string; allowed: \"...\" or '...'")]
    out: list[Command] = []
    errors: list[ScpiError] = []
    for command in _split_outside_quotes(text, ";"):
        command = command.strip(" \t\r")
        if not command:
            continue
        header, _, rest = command.replace("\t", " ").partition(" ")
        m = _HEADER.match(header)
        if not m:
            errors.append(ScpiError(-102 if "\x00" not in header else -103,
                                    f"header {shown(header)}; allowed: NODE[:NODE...][?] or *CMD[?]"))
            continue
        query = bool(m.group(2))
        args: list[Any] = []
        rest = rest.strip(" \r")
        if rest:
            for a in _split_outside_quotes(rest, ","):
                a = a.strip(" \r")
                mk = _MARK.fullmatch(a) if a.startswith("\x00") else None
                if mk:
                    args.append(blocks[int(mk.group(1))])
                elif "\x00" in a:
                    errors.append(ScpiError(-161, f"{m.group(1)}: text around a block; allowed: a block alone"))
                    break
                elif not a:
                    errors.append(ScpiError(-109, f"{m.group(1)}: empty parameter"))
                    break
                else:
                    args.append(Quoted(a[1:-1]) if len(a) >= 2 and a[0] == a[-1] and a[0] in "\"'" else a)
            else:
                out.append(Command(m.group(1), query, args))
            continue
        out.append(Command(m.group(1), query, args))
    return out, errors


def answer_pieces(answers: list[Any]) -> list[Any]:
    """The answers to one message's queries -> the pieces of one response message (blocks not copied)."""
    if not answers:
        return []
    out: list[Any] = []
    for k, r in enumerate(answers):
        if k:
            out.append(b";")
        if isinstance(r, Block):
            out.extend(r.pieces())
        else:
            out.append(str(r).encode("ascii", "replace"))
    out.append(b"\n")
    return out


def shown(s: str) -> str:
    """A piece of a message for an error's detail: blocks marked, at most 40 characters."""
    s = s.replace("\x00", "<block>")
    return repr(s if len(s) <= 40 else s[:40] + "...")


def _open_quote(s: str) -> bool:
    quote = ""
    for ch in s:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
    return bool(quote)


def _split_outside_quotes(s: str, sep: str) -> list[str]:
    out, cur, quote = [], [], ""
    for ch in s:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            cur.append(ch)
        elif ch == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out
