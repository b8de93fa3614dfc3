"""``pnn-cluster sim-instrument``: a simulated lab bench serving SCPI instruments over TCP."""

from __future__ import annotations

import argparse
import sys

from pnn_cluster.commands.serve_device import StopSignals, add_device_options, simulated_device
from pnn_cluster.devices import SYSTEMS


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
    add_device_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.commands import UsageError
    from pnn_cluster.servers import BindError
    from pnn_cluster.servers.scpi_bench import SimBench

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
            bench = SimBench(device=device, host=args.host, port=args.port, allow_remote=args.allow_remote).start()
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
