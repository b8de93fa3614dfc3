"""``pnn-cluster sim-instrument``: a simulated lab bench serving SCPI instruments over TCP."""

from __future__ import annotations

import argparse
import sys

from pnn_cluster.commands.serve_device import (
    StopSignals,
    add_device_options,
    int_flag,
    mib_flag,
    mib_range,
    seconds_flag,
    seconds_or_never_flag,
    simulated_device,
)
from pnn_cluster.devices import SYSTEMS
from pnn_cluster.servers.limits import (  # the bench's limits, stated there; no server is imported for --help
    MIB,
    SCPI_BLOCK_CAP_MAX,
    SCPI_BLOCK_CAP_MIN,
    SCPI_COMMAND_TIMEOUT_S,
    SCPI_IDLE_TIMEOUT_S,
    SCPI_MAX_BLOCK_BYTES,
    SCPI_MAX_CONNECTIONS,
    SCPI_MAX_UNREAD_BYTES,
)

MAX_CONNECTIONS = SCPI_MAX_CONNECTIONS.default
IDLE_TIMEOUT_S = SCPI_IDLE_TIMEOUT_S.default
COMMAND_TIMEOUT_S = SCPI_COMMAND_TIMEOUT_S.default
MAX_UNREAD_BYTES = SCPI_MAX_UNREAD_BYTES.default
#: the longest block a header can declare, in whole MiB
MAX_BLOCK_MB = mib_range(SCPI_MAX_BLOCK_BYTES)[1]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim-instrument", help="serve a simulated system as SCPI instruments over TCP (for pyvisa)",
        description="Serves a simulated system as two SCPI instruments until SIGINT or SIGTERM: the source "
                    "(waveform generator, or pulse shaper for optical systems) on PORT and the sink "
                    "(oscilloscope, or spectrometer) on PORT+1, raw sockets terminated by newlines, as LAN "
                    "instruments do. Reach them with pyvisa-py as TCPIP::HOST::PORT::SOCKET. Like a LAN "
                    "instrument, the bench has neither authentication nor encryption: it listens on loopback, "
                    "and on a network only with --allow-remote --insecure.",
    )
    p.add_argument("--system", required=True, choices=sorted(SYSTEMS), help="simulated system behind the bench")
    p.add_argument("--port", type=int, default=5025,
                   help="source instrument's TCP port; the sink listens on PORT+1 (0: the OS chooses both)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow listening on a non-loopback address (with --insecure only)")
    p.add_argument("--insecure", action="store_true",
                   help="with --allow-remote: accept that anyone who reaches the ports may drive the bench (SCPI "
                        "has no authentication or encryption; a closed test network only)")
    p.add_argument("--max-block-mb", default=None, metavar="MB",
                   help="longest data block a header may declare, in MiB (default: the device's largest "
                        "legitimate block, max_batch x input_size float64 or its largest parameter, "
                        f"{SCPI_BLOCK_CAP_MIN // MIB} .. {SCPI_BLOCK_CAP_MAX // MIB} "
                        "MiB); a header declaring more closes the connection before anything is allocated")
    p.add_argument("--max-connections", default=MAX_CONNECTIONS, metavar="N",
                   help="clients per instrument (default %(default)s); one more is closed at once")
    p.add_argument("--idle-timeout-s", default=IDLE_TIMEOUT_S, metavar="S",
                   help="seconds a connection may sit with nothing in progress before it is closed (default "
                        "%(default)s; 0: never)")
    p.add_argument("--command-timeout-s", default=COMMAND_TIMEOUT_S, metavar="S",
                   help="seconds a message, block included, may take to arrive from its first byte, and a client "
                        "to start reading waiting answers (default %(default)s); then the connection is closed")
    p.add_argument("--max-unread-mb", default=MAX_UNREAD_BYTES / MIB, metavar="MB",
                   help="MiB of answers that may wait for a client to read them (default %(default)s); beyond it "
                        "the client's further commands wait, and a client that does not read for "
                        "--command-timeout-s is disconnected")
    add_device_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.commands import UsageError
    from pnn_cluster.servers import BindError
    from pnn_cluster.servers.scpi_bench import SimBench

    max_block_bytes = (None if args.max_block_mb is None else
                       mib_flag("--max-block-mb", args.max_block_mb, *mib_range(SCPI_MAX_BLOCK_BYTES),
                                f" (a block header declares at most {SCPI_MAX_BLOCK_BYTES.high} bytes)"))
    max_connections = int_flag("--max-connections", args.max_connections, SCPI_MAX_CONNECTIONS.low,
                               SCPI_MAX_CONNECTIONS.high)
    # the bench takes any finite timeout; a flag takes at most a day (seconds_flag's bound)
    idle_timeout_s = seconds_or_never_flag("--idle-timeout-s", args.idle_timeout_s)
    command_timeout_s = seconds_flag("--command-timeout-s", args.command_timeout_s)
    max_unread_bytes = mib_flag("--max-unread-mb", args.max_unread_mb, *mib_range(SCPI_MAX_UNREAD_BYTES))
    if args.allow_remote and not args.insecure:
        raise UsageError("--allow-remote: the SCPI bench has no authentication or encryption, so anyone who reaches "
                         "its ports could drive it; keep it on loopback (device actors run on the PC that has the "
                         "instrument), or add --insecure on a closed test network")
    if args.allow_remote:
        print("pnn-cluster sim-instrument: warning: --insecure: listening on the network without authentication",
              file=sys.stderr, flush=True)
    device = simulated_device(args)
    with StopSignals() as signals:
        try:
            bench = SimBench(device=device, host=args.host, port=args.port, allow_remote=args.allow_remote,
                             max_block_bytes=max_block_bytes, max_connections=max_connections,
                             idle_timeout_s=idle_timeout_s, command_timeout_s=command_timeout_s,
                             max_unread_bytes=max_unread_bytes).start()
        except BindError as exc:
            raise UsageError(str(exc)) from None
        for role, resource in bench.resources.items():
            inst = bench.source if role == "source" else bench.sink
            print(f"{role} ({inst.kind}): {resource}", flush=True)
        print(f"serving simulated {args.system}; SIGINT or SIGTERM to stop", flush=True)
        sig = signals.wait()
        print(f"{sig}: shutting down", file=sys.stderr, flush=True)
        bench.stop()
    print(f"stopped after {bench.stats['messages']} messages ({bench.stats['errors']} errors)", flush=True)
    return 0
