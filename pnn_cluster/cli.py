"""The ``pnn-cluster`` command line.

Each command lives in its own module under ``pnn_cluster.commands`` and
provides ``add_parser(subparsers)`` (which sets ``func``) ; this file only
wires them together. Exit codes: 0 success, 1 the job failed, 2 bad usage or
configuration, 130 interrupted.

Every failure is reported on one line of standard error, ``pnn-cluster
COMMAND: error: ...``, naming what failed and what to do (a configuration
with several mistakes gives one such line per mistake):

====  ==========================================================================
code  when
====  ==========================================================================
0     done
1     the job failed: a device or its server failed or could not be reached, a
      Ray worker died, the tracking server failed, out of memory, or an
      internal error (``internal error: TYPE: message``; ``--traceback`` or
      ``PNN_TRACEBACK=1`` prints the traceback as well)
2     bad usage or configuration: arguments, a configuration key (named with
      its value and what is allowed), a value a device refuses, a missing file,
      a checkpoint or saved twin that is not one or comes from another
      configuration
130   interrupted (Ctrl-C); a training run can be resumed
====  ==========================================================================

An error raised in a Ray actor is reported as its cause.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Any

from pnn_cluster.commands import UsageError
from pnn_cluster.devices.spec import LimitError

#: command modules, in the order ``--help`` lists them
COMMANDS = ["demo", "train", "evaluate", "twins", "calibrate", "devices", "serve-device", "sim-instrument", "keys",
            "check-secrets", "submit", "sync", "bench"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130




def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pnn-cluster",
        description="Physics-aware training of physical neural networks, from a laptop to a lab cluster.",
    )
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, print the traceback as well as the one-line message (or PNN_TRACEBACK=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"pnn_cluster.commands.{name.replace('-', '_')}").add_parser(sub)
    for command in sub.choices.values():  # also after the command: pnn-cluster train CONFIG --traceback
        if "--traceback" not in command._option_string_actions:
            command.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                                 help="on an error, print the traceback as well (or PNN_TRACEBACK=1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import torch

    # device simulations and twins are small tensors: a second intra-op thread only adds
    # contention with device actors and servers on the same machine
    torch.set_num_threads(1)
    parser = build_parser()
    args = parser.parse_args(argv)
    show_traceback = bool(getattr(args, "traceback", False)) or _env_flag("PNN_TRACEBACK")
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print(f"pnn-cluster {args.command}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # every failure becomes one line and an exit code
        if show_traceback:
            traceback.print_exception(exc, file=sys.stderr)
        code, lines = explain(exc, args)
        for line in lines:
            print(f"pnn-cluster {args.command}: {line}", file=sys.stderr, flush=True)
        return code
    return EXIT_OK if rc is None else int(rc)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _one_line(text: Any, limit: int = 400) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _loaded(module: str, *names: str) -> tuple[type, ...]:
    """Exception classes of ``module`` if it is imported: an exception of a module never imported cannot occur,
    and the command line need not import Ray, MLflow or ZeroMQ to recognise theirs."""
    mod = sys.modules.get(module)
    return tuple(c for c in (getattr(mod, n, None) for n in names) if isinstance(c, type)) if mod else ()


def unwrap(exc: BaseException) -> BaseException:
    """The error itself, not its Ray wrapping: a ``RayTaskError`` raised in an actor carries it as ``cause``."""
    for _ in range(10):
        task_errors = _loaded("ray.exceptions", "RayTaskError")
        cause = getattr(exc, "cause", None)
        if not (task_errors and isinstance(exc, task_errors) and isinstance(cause, BaseException)):
            return exc
        exc = cause
    return exc


#: what to do when a device fails or cannot be reached
DEVICE_HINT = ("check that the instrument, or the device server serving it (pnn-cluster serve-device / "
               "sim-instrument), is running and reachable at the address in the configuration, then run again")


def explain(exc: BaseException, args: argparse.Namespace | None = None) -> tuple[int, list[str]]:
    """The exit code and the line(s) (without the ``pnn-cluster COMMAND:`` prefix) that report ``exc``."""
    exc = unwrap(exc)
    msg = _one_line(exc)
    config_errors = _loaded("pnn_cluster.config", "ConfigError")
    if isinstance(exc, (UsageError, *config_errors)):
        # a configuration names one mistake a line
        return EXIT_USAGE, [f"error: {_one_line(line)}" for line in str(exc).splitlines() if line.strip()] or \
            [f"error: {type(exc).__name__}"]
    if isinstance(exc, _loaded("pnn_cluster.training.trainer", "CheckpointError")):
        given = getattr(args, "source", None) or (f"run {args.resume}" if getattr(args, "resume", None) else None)
        where = f"{given}: " if getattr(exc, "path", None) is None and given else ""
        return EXIT_USAGE, [f"error: {where}{msg}"]
    if isinstance(exc, (LimitError, *_loaded("pnn_cluster.twins.store", "TwinFileError"))):
        return EXIT_USAGE, [f"error: {msg}"]
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        what = f"{exc.strerror}: {exc.filename}" if exc.filename and exc.strerror else msg
        return EXIT_USAGE, [f"error: {what}"]
    if isinstance(exc, _loaded("pydantic", "ValidationError")):
        errors = exc.errors()
        parts = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')} (got {_one_line(repr(e.get('input')), 60)})"
                 for e in errors[:3]]
        more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
        return EXIT_USAGE, [f"error: invalid {exc.title}: {'; '.join(parts)}{more}"]
    if isinstance(exc, _loaded("pnn_cluster.training.faults", "TrainingAborted")):
        return EXIT_FAILED, [f"error: {msg}"]
    remote = _loaded("pnn_cluster.drivers.zmq_client", "RemoteError")
    if remote and isinstance(exc, remote):
        return EXIT_FAILED, [f"error: device server error: {msg}; the server answered, but refused the request "
                             "(see its log)"]
    device_errors = (*_loaded("pnn_cluster.devices.base", "DeviceError"),
                     *_loaded("pnn_cluster.training.pipeline", "CallTimeout"))
    if isinstance(exc, device_errors):
        return EXIT_FAILED, [f"error: device failure: {msg}; {DEVICE_HINT}"]
    unreachable = (ConnectionError, TimeoutError, *_loaded("zmq", "ZMQError"), *_loaded("pyvisa.errors", "Error"))
    if isinstance(exc, unreachable):
        return EXIT_FAILED, [f"error: cannot reach a device ({type(exc).__name__}: {msg}); {DEVICE_HINT}"]
    ray_errors = _loaded("ray.exceptions", "RayError")
    if ray_errors and isinstance(exc, ray_errors):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return EXIT_FAILED, [f"error: Ray: {type(exc).__name__}: {_one_line(first, 300)}; check the cluster "
                             "(`ray status`) and the worker's log, then run again (or --resume)"]
    mlflow_errors = _loaded("mlflow.exceptions", "MlflowException")
    if mlflow_errors and isinstance(exc, mlflow_errors):
        return EXIT_FAILED, [f"error: tracking failed: {msg}; check --tracking-uri (or MLFLOW_TRACKING_URI) and "
                             "that the tracking server is up, or run with --no-track"]
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return EXIT_FAILED, [f"error: out of memory ({type(exc).__name__}: {msg}); reduce schedule.batch_size, "
                             "schedule.micro_batch, layer widths or twin sizes"]
    if isinstance(exc, BrokenPipeError):
        return EXIT_FAILED, ["error: the output was closed before the command finished (broken pipe)"]
    return EXIT_FAILED, [f"internal error: {type(exc).__name__}: {msg} (rerun with --traceback or PNN_TRACEBACK=1 "
                         "for the traceback)"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
