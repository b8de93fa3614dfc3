"""One client's conversation with a simulated instrument, sans I/O: program messages in, responses out.

A :class:`ScpiSession` parses each program message
(:func:`~pnn_cluster.servers.scpi_wire.parse_message`), resolves its headers
against the instrument's table, runs the commands in order and frames the
answers to its queries as one response message. It keeps the connection's
error queue (:data:`~.limits.SCPI_ERROR_QUEUE_LEN` entries; on overflow the
last entry becomes ``-350,"Queue overflow"``) and event status register.

A query that fails produces no answer (as on real instruments), except the
data queries (``READ?``, ``FETCh?``), which answer an empty block ``#10`` so
a driver never waits out its timeout to learn that a measurement failed.

With a :class:`~pnn_cluster.servers.scpi_wire.Framer` in front of it, this is
the whole instrument protocol without sockets::

    session = ScpiSession(bench.source)
    for event in framer.feed(data):
        if isinstance(event, Message):
            response = session.respond(event.parts)
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from pnn_cluster.servers.limits import SCPI_ERROR_QUEUE_LEN
from pnn_cluster.servers.scpi_instruments import SimInstrument, TableEntry
from pnn_cluster.servers.scpi_wire import Command, ScpiError, answer_pieces, parse_message

__all__ = ["Resolved", "ScpiSession"]

#: a command and what runs it: a table entry, or None for a common command (``*IDN?``...) the instrument answers
Resolved = tuple[Command, TableEntry | None]


class ScpiSession:
    """The error queue and command dispatch of one connection to one instrument."""

    def __init__(self, inst: SimInstrument) -> None:
        self.inst = inst
        self.errors: collections.deque[str] = collections.deque()
        self.esr = 0

    # -- error queue -------------------------------------------------------------------------------

    def push_error(self, err: ScpiError) -> None:
        self.inst.bench.stats["errors"] += 1
        self.esr |= 32 if -199 <= err.code <= -100 else 16 if -299 <= err.code <= -200 else 8
        if len(self.errors) >= SCPI_ERROR_QUEUE_LEN:
            self.errors[-1] = ScpiError(-350, "").text()
        else:
            self.errors.append(err.text())

    def pop_error(self) -> str:
        return self.errors.popleft() if self.errors else '0,"No error"'

    # -- dispatch ----------------------------------------------------------------------------------

    def respond(self, parts: list[Any]) -> list[Any]:
        """One program message -> the pieces of its response (none if nothing was asked or answered)."""
        commands = self.parse(parts)
        return [] if commands is None else self.execute(commands)

    def parse(self, parts: list[Any]) -> list[Resolved] | None:
        """A program message -> its commands, resolved; None if it cannot be parsed (the error is queued).

        A header the instrument does not know is an error when its command
        runs, so that errors keep their order with what the others do.
        """
        commands, errors = parse_message(parts)
        for err in errors:
            self.push_error(err)
        if commands is None:
            return None
        return [(c, self._resolve(c)) for c in commands]

    @staticmethod
    def touches_device(commands: list[Resolved]) -> bool:
        """Whether running them takes the device (the transport runs those off its event loop)."""
        return any(entry is not None and entry.blocking for _, entry in commands)

    def execute(self, commands: list[Resolved]) -> list[Any]:
        """Run the commands in order: the pieces of the response to their queries."""
        answers: list[Any] = []
        for (header, query, args), entry in commands:
            try:
                if header.lstrip(":").startswith("*"):
                    r = self.inst.common(self, header, query, args)
                else:
                    assert entry is not None
                    fn = entry.on_query if query else entry.on_set
                    assert fn is not None
                    if entry.blocking:
                        with self.inst.bench.lock:
                            r = fn(self, args)
                    else:
                        r = fn(self, args)
            except ScpiError as err:
                self.push_error(err)
                continue
            except Exception as exc:  # a bug or a device failure must not kill the connection
                self.push_error(ScpiError(-200, f"{type(exc).__name__}: {exc}"))
                continue
            if query and r is not None:
                answers.append(r)
        return answer_pieces(answers)

    def _resolve(self, command: Command) -> TableEntry | None:
        header, query = command.header, command.query
        if header.lstrip(":").startswith("*"):
            # *RST touches the device: it runs where the device's other commands do
            return TableEntry((), blocking=True) if header.lstrip(":").upper() == "*RST" else None
        try:
            return self.inst.lookup(header, query)
        except ScpiError as err:
            return TableEntry((), on_set=_raiser(err), on_query=_raiser(err))


def _raiser(err: ScpiError) -> Callable[..., Any]:
    def fn(*_: Any) -> Any:
        raise err
    return fn
