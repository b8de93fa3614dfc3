"""The ``pnn-cluster`` command line.

Each command lives in its own module under ``pnn_cluster.commands`` and
provides ``add_parser(subparsers)`` (which sets ``func``) ; this file only
wires them together. Exit codes: 0 success, 1 the job failed, 2 bad usage or
configuration, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pnn_cluster.commands import UsageError
from pnn_cluster.devices.spec import LimitError

#: command modules, in the order ``--help`` lists them
COMMANDS = ["demo", "train", "evaluate", "calibrate", "devices", "serve-device", "sim-instrument", "bench"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130




def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pnn-cluster",
        description="Physics-aware training of physical neural networks, from a laptop to a lab cluster.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"pnn_cluster.commands.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import torch

    # device simulations and twins are small tensors: a second intra-op thread only adds
    # contention with device actors and servers on the same machine
    torch.set_num_threads(1)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, LimitError, FileNotFoundError) as exc:
        print(f"pnn-cluster {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK if rc is None else int(rc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
