"""scripts/bench_servers.py with a reduced flood: one JSON line with both servers' figures; both bounds hold.

The reduced flood still means something: each ZeroMQ flood message is 64 MiB (against the server's 1 MiB
limit), so a server that buffered it would grow by 64 MiB for one and 128 MiB for two at once; the bound
asserted is 16 MiB. Full size: ``python scripts/bench_servers.py --json --check``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT

SCRIPT = ROOT / "scripts" / "bench_servers.py"

#: 1 MiB frames in each ZeroMQ flood message, and the RSS growth allowed to either server (MiB)
FRAMES = 64
BOUND_MB = 16


@pytest.mark.timeout(180)
def test_bench_servers_json_and_both_bounds():
    cmd = [sys.executable, str(SCRIPT), "--json", "--frames", str(FRAMES), "--frame-mb", "1", "--connections", "2",
           "--flood-timeout-s", "20", "--bound-mb", str(BOUND_MB), "--check"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # --json: one line, nothing else
    out = json.loads(lines[0])
    assert "errors" not in out, out
    for key in ("zmq_flood_rss_mb", "scpi_flood_rss_mb", "zmq_single_flood_rss_mb", "zmq_baseline_rss_mb",
                "zmq_peak_rss_mb", "scpi_baseline_rss_mb", "scpi_peak_rss_mb", "bound_mb", "seconds",
                "zmq_seconds", "scpi_seconds"):
        assert isinstance(out[key], (int, float)), key
    for key in ("answers_after_flood", "zmq_answers_after_flood", "scpi_answers_after_flood",
                "scpi_answers_during_flood", "within_bound"):
        assert isinstance(out[key], bool), key
    assert out["flood"] == {"zmq_frames": FRAMES, "zmq_frame_mb": 1.0, "connections": 2,
                            "scpi_declared_bytes": 268435456, "system": "shg"}
    assert out["zmq_baseline_rss_mb"] > 10 and out["scpi_baseline_rss_mb"] > 10  # real processes were measured
    assert out["zmq_peak_rss_mb"] >= out["zmq_baseline_rss_mb"] - 1
    assert out["bound_mb"] == BOUND_MB and out["within_bound"] is True and out["answers_after_flood"] is True, out
    # the ZeroMQ server: requests of 64 MiB against its 1 MiB limit are cut off at a frame header, one at a time and
    # two at once; none gets a reply, and a fresh client is answered afterwards
    assert out["zmq_single_flood_rss_mb"] <= BOUND_MB, out
    assert out["zmq_flood_rss_mb"] <= BOUND_MB, out
    assert out["zmq_flood_replies"] == 0, out
    assert out["zmq_answers_after_flood"] is True, out
    # the attacks of issue #20 on serve-device's defaults: strangers churning through the handshakes (an allowed
    # CURVE client answered within 2 s each time), 16 frame headers declaring nearly the request cap, PONGs never
    # read; each within the bound
    churn = out["zmq_handshake_churn"]
    assert churn["churners"] == 64 and churn["answered"] == churn["requests"] == 5 and churn["pass"], churn
    assert churn["evicted"] + churn["refused"] > 64, churn  # they did churn
    headers = out["zmq_header_only"]
    assert headers["connections"] == 16 and headers["declared_mb"] > 64 and headers["answered"], headers
    assert headers["rss_growth_mb"] <= BOUND_MB, headers  # before: 16 x the declared size, zero-filled
    pongs = out["zmq_pong_flood"]
    assert pongs["answered"] and pongs["pings_taken_mb"] < pongs["ping_mb"] and pongs["pass"], pongs
    assert pongs["rss_growth_mb"] <= 64, pongs  # the 16 MiB cap on unread replies, counted as memory held
    # and on the SCPI bench: a 1 MiB numeric line, 8 idle connections, 400 blocks in one message
    assert out["scpi_numeric_line"]["other_latency_s"] <= 0.5 and out["scpi_numeric_line"]["pass"], out
    assert out["scpi_idle_eviction"]["served"] and out["scpi_idle_eviction"]["pass"], out
    assert out["scpi_block_flood"]["closed"] and out["scpi_block_flood"]["rss_growth_mb"] <= 64, out
    assert set(out["attacks_pass"]) == {"zmq_handshake_churn", "zmq_header_only", "zmq_pong_flood",
                                        "scpi_numeric_line", "scpi_idle_eviction", "scpi_block_flood"}
    assert all(out["attacks_pass"].values()), out["attacks_pass"]
    # the SCPI bench: 2 headers declaring 256 MiB each cost it (almost) nothing, and it keeps answering
    assert out["scpi_flood_rss_mb"] <= BOUND_MB, out
    assert out["scpi_answers_during_flood"] and out["scpi_answers_after_flood"]
    assert out["scpi_flood_closed_by_server"] == 2  # 256 MiB is over the shg bench's cap: refused at once
    assert out["answers_after_flood"] == (out["zmq_answers_after_flood"] and out["scpi_answers_after_flood"])
