"""Round-trip time of one forward of a (256, 64) batch: in process, over ZeroMQ, over the SCPI bench.

The same simulated system (zero latency, no noise) runs in this process, behind
a ZeroMQ device server, and behind the simulated SCPI bench reached through
pyvisa-py, all on 127.0.0.1; and behind ``pnn-cluster serve-device`` in a
process of its own (``zmq_process``), as a lab deploys it: the servers in this
process share its interpreter (and the GIL) with the client, which a deployed
server does not. The four are timed round-robin, so a change in machine load
hits all of them alike; each figure is the median of the repeats.

    python scripts/bench_transport.py --json
    {"batch": [256, 64], "rtt_ms": {"inprocess": A, "zmq": B, "visa": C, "zmq_process": D},
     "ratio_to_inprocess": {"zmq": B/A, "visa": C/A, "zmq_process": D/A}}
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    p.add_argument("--system", default="shg", help="simulated system (default %(default)s)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=64, help="input and output size of the device")
    p.add_argument("--repeats", type=int, default=40)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # the same single thread of compute for all three

    from pnn_cluster.devices import Imperfections, make_device
    from pnn_cluster.drivers.visa import VisaDevice
    from pnn_cluster.drivers.zmq_client import ZmqDevice
    from pnn_cluster.servers.scpi_bench import SimBench
    from pnn_cluster.servers.zmq_server import DeviceServer

    def device():
        # zero latency and no noise: what differs between the three is the transport
        return make_device(args.system, imperfections=Imperfections.ideal(seed=0), n_in=args.width,
                           n_out=args.width)

    local = device()
    spec = local.spec
    x = np.random.default_rng(0).uniform(spec.input.low, spec.input.high, (args.batch, spec.input.size))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = subprocess.Popen([sys.executable, "-m", "pnn_cluster.cli", "serve-device", "--system", args.system,
                               "--option", f"n_in={args.width}", "--option", f"n_out={args.width}", "--ideal",
                               "--bind", f"tcp://127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        with DeviceServer(device(), "tcp://127.0.0.1:0") as server, SimBench(device=device(), port=0) as bench:
            remote = ZmqDevice(server.endpoint, timeout_s=30).connect()
            visa = VisaDevice.from_config(bench.visa_config(timeout_s=30)).connect()
            # the server process starts while this one connects: the client's tries wait for it
            own = ZmqDevice(f"tcp://127.0.0.1:{port}", timeout_s=60, retries=0).connect()
            paths = {"inprocess": local, "zmq": remote, "visa": visa, "zmq_process": own}
            times = _timed(paths, x, args.repeats)
            if times is None:
                return 1
            for dev in (remote, visa, own):
                dev.close()
    finally:
        served.kill()
        served.wait(30)
    rtt = {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}
    result = {
        "batch": [args.batch, spec.input.size],
        "rtt_ms": rtt,
        "ratio_to_inprocess": {k: round(rtt[k] / rtt["inprocess"], 3) for k in ("zmq", "visa", "zmq_process")},
    }
    if not args.json:
        print(f"{args.system}, batch {args.batch} x {spec.input.size}, median of {args.repeats}:")
        for k, v in rtt.items():
            print(f"  {k:12s} {v:8.3f} ms  (+{v - rtt['inprocess']:.3f} ms transport)")
    print(json.dumps(result))
    return 0


def _timed(paths, x, repeats: int):
    """Each path's round-trip times, taken round-robin; None if one disagrees with the in-process device."""
    reference = paths["inprocess"].forward(x)
    for name, dev in paths.items():  # warm up, and check all measure the same thing
        for _ in range(3):
            y = dev.forward(x)
        if not np.allclose(y, reference, rtol=0, atol=1e-12):
            print(f"bench_transport: {name} disagrees with in-process", file=sys.stderr)
            return None
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):
        for name, dev in paths.items():
            t0 = time.perf_counter()
            dev.forward(x)
            times[name].append(time.perf_counter() - t0)
    return times


if __name__ == "__main__":
    sys.exit(main())
