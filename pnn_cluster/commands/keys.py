"""``pnn-cluster keys``: CURVE key pairs for device servers and their clients (``zmq.auth`` certificate files)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys", help="create CURVE key pairs for device servers and their clients",
        description="Creates a CURVE key pair per NAME in DIR: NAME.key (the public key, mode 644: hand it out) and "
                    "NAME.key_secret (the key pair, mode 600: copied over SSH only, where it is used). A device "
                    "server is started with --curve-secret DIR/SERVER.key_secret and --curve-allow ALLOWED, the "
                    "directory of the public keys of the clients it accepts; a client's configuration names its "
                    "own key pair and the server's public key (driver.curve.secret_key_file, "
                    "driver.curve.server_public_key_file). Existing keys are kept unless --force.",
    )
    p.add_argument("dir", metavar="DIR", type=Path, help="directory to write the key files to (created, mode 700)")
    p.add_argument("names", metavar="NAME", nargs="+", help="one key pair per name, e.g. optics or trainer")
    p.add_argument("--force", action="store_true", help="replace key files that already exist")
    p.set_defaults(func=run)


def create_key_pair(directory: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0644) and ``NAME.key_secret`` (0600) into ``directory``; returns (public, secret).

    The files are written in a private (0700) directory beside the target and moved in once their modes are
    set, so the secret key is never readable by others, whatever the umask.
    """
    import zmq.auth

    from pnn_cluster.commands import UsageError

    if not _NAME.fullmatch(name):
        raise UsageError(f"key name {name!r}; allowed: letters, digits, '_', '.', '-', starting with a letter "
                         "or digit")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not force:
        for path in (public, secret):
            if path.exists():
                raise UsageError(f"{path} exists; keep it, or pass --force to replace it (its clients or servers "
                                 "then need the new public key)")
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=directory))
    try:
        made_public, made_secret = (Path(p) for p in zmq.auth.create_certificates(scratch, name))
        os.chmod(made_secret, 0o600)
        os.chmod(made_public, 0o644)
        os.replace(made_secret, secret)
        os.replace(made_public, public)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return public, secret


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.commands import UsageError

    if len(set(args.names)) != len(args.names):
        raise UsageError("a NAME is given twice; allowed: each name once")
    directory: Path = args.dir
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
    elif not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    for name in args.names:
        public, secret = create_key_pair(directory, name, force=args.force)
        print(f"{name}: public key {public} (give it out), key pair {secret} (mode 600, stays here)", flush=True)
    return 0
