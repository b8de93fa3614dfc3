"""CURVE keys for the device server: ``zmq.auth`` certificate files read strictly, and the clients' allow-list.

A key file that cannot be used stops the server from starting (a
:class:`CurveKeyError` naming the file, the line and the problem) rather than
locking clients out, or admitting one that should not be. So does a secret key
file that its group or others may read (whoever reads it can pose as the
server), and an allow-list that they may write to (whoever writes to it can
let themselves in).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import nacl.public
import zmq.utils.z85

from pnn_cluster.secret_files import SharedSecretFile, check_not_writable_by_others, check_owner_only
from pnn_cluster.servers import BindError

__all__ = ["CurveKeyError", "CurveKeys", "load_curve_keys", "read_key_file"]


class CurveKeyError(BindError):
    """A CURVE key file that cannot be used: the server refuses to start rather than lock clients out."""


_Z85_ALPHABET = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
_KEY_LINE = re.compile(r'(public-key|secret-key)\s*=\s*"([^"]*)"')


def _z85_key(path: Path, what: str, lineno: int, text: str) -> bytes:
    where = f"curve: key file {path} line {lineno}: {what}"
    if len(text) != 40:
        raise CurveKeyError(f"{where} has {len(text)} characters; allowed: a 40-character Z85 key "
                            "(as written by zmq.auth.create_certificates)")
    bad = sorted(set(text) - _Z85_ALPHABET)
    if bad:
        raise CurveKeyError(f"{where} has character(s) {''.join(bad)!r} outside Z85; allowed: a 40-character Z85 key")
    try:
        key = zmq.utils.z85.decode(text)
    except Exception as exc:  # an out-of-range group
        raise CurveKeyError(f"{where} is not valid Z85 ({exc}); allowed: a 40-character Z85 key") from None
    return key


def read_key_file(path: str | Path, *, secret: bool = False) -> tuple[bytes, bytes | None]:
    """A ``zmq.auth`` certificate file -> (public key, secret key or None), 32 raw bytes each.

    Anything wrong (unreadable, no key, a key that is not 40 Z85 characters,
    a key given twice, a secret that does not match the public key) raises
    :class:`CurveKeyError` naming the file, the line and the problem.
    """
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CurveKeyError(f"curve: key file {path}: cannot read it ({exc})") from None
    found: dict[str, tuple[int, str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = _KEY_LINE.fullmatch(s)
        if m is None:
            if s.startswith(("public-key", "secret-key")):
                raise CurveKeyError(f"curve: key file {path} line {lineno}: cannot parse {s[:60]!r}; "
                                    'allowed: public-key = "<40 Z85 characters>"')
            continue
        if m[1] in found:
            raise CurveKeyError(f"curve: key file {path} line {lineno}: a second {m[1]} "
                                f"(the first is on line {found[m[1]][0]}); allowed: one")
        found[m[1]] = (lineno, m[2])
    if "public-key" not in found:
        raise CurveKeyError(f'curve: key file {path}: no public-key = "..." line; allowed: a certificate file '
                            "written by zmq.auth.create_certificates")
    public = _z85_key(path, "public-key", *found["public-key"])
    if not secret:
        return public, None
    if "secret-key" not in found:
        raise CurveKeyError(f'curve: key file {path}: no secret-key = "..." line; allowed: the <name>.key_secret '
                            "file written by zmq.auth.create_certificates")
    secret_key = _z85_key(path, "secret-key", *found["secret-key"])
    if bytes(nacl.public.PrivateKey(secret_key).public_key) != public:
        raise CurveKeyError(f"curve: key file {path}: its secret-key does not belong to its public-key")
    return public, secret_key


@dataclass(frozen=True)
class CurveKeys:
    """The server's long-term key pair and the long-term public keys of the clients it admits."""

    public: bytes
    secret: bytes
    allowed: frozenset[bytes]
    sources: tuple[str, ...] = field(default=(), compare=False)


def load_curve_keys(secret_key_file: str | Path, allowed_clients_dir: str | Path) -> CurveKeys:
    """Read the server's key pair and every ``*.key`` file of the allow-list; a bad file is an error, not a skip.

    The key pair's file must be its owner's alone (mode 600), the allow-list and its files written by their
    owner only; else :class:`CurveKeyError` in one line, with the ``chmod`` that fixes it.
    """
    public, secret = read_key_file(secret_key_file, secret=True)
    assert secret is not None
    directory = Path(allowed_clients_dir)
    if not directory.is_dir():
        raise CurveKeyError(f"curve: allowed clients directory {directory} does not exist")
    files = sorted(p for p in directory.glob("*.key") if p.is_file())
    if not files:
        raise CurveKeyError(f"curve: no client public keys (*.key) in {directory}")
    try:
        check_owner_only(secret_key_file, "curve: server secret key file")
        for path in (directory, *files):
            check_not_writable_by_others(path, "curve: allowed clients")
    except SharedSecretFile as exc:
        raise CurveKeyError(str(exc)) from None
    allowed = frozenset(read_key_file(p)[0] for p in files)
    return CurveKeys(public, secret, allowed, tuple(str(p) for p in files))
