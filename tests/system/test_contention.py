"""Several runs wanting one instrument, on the session's Ray cluster (``ray_cluster``).

An instrument has one connection (its node declares one unit of
``instrument:NAME``). A run whose device wants an instrument another run holds
waits for it instead of failing after the connect timeout, and tells its
submitter what it waits for, held by which run since when; once it is free it
trains to its exact step count. The holder here is a placement this test
holds and lets go of when it chooses, so no figure depends on timing.
"""

from __future__ import annotations

import io
import math
import re
import threading

import pytest
import yaml
from helpers import tiny_config, wait_until

from pnn_cluster.config import ImperfectionsConfig, PlacementConfig, SimulatedDriver, parse_config
from pnn_cluster.devices import DeviceError
from pnn_cluster.runner import DeviceRecipe

ray = pytest.importorskip("ray")

INSTRUMENT = "shg-bench-1"  # declared by one lab PC of the session's cluster (conftest.LAB_PCS)


def recipe(name: str = "optics", instrument: str = INSTRUMENT) -> DeviceRecipe:
    driver = SimulatedDriver(kind="simulated", system="shg", options={"n_in": 4, "n_out": 4},
                             imperfections=ImperfectionsConfig(ideal=True))
    return DeviceRecipe(name, 0, driver, placement=PlacementConfig(instrument=instrument))


class Lines:
    """Report lines from another thread, readable while they arrive."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def having(self, text: str) -> list[str]:
        with self._lock:
            return [line for line in self._lines if text in line]


class Starting(threading.Thread):
    """``placement.start_devices(recipes)`` on a thread of its own: it blocks while it waits."""

    def __init__(self, placement, recipes) -> None:
        super().__init__(daemon=True)
        self.placement, self.recipes = placement, recipes
        self.refs = self.error = None
        self.start()

    def run(self) -> None:
        try:
            self.refs = self.placement.start_devices(self.recipes)
        except Exception as exc:  # handed to the test's thread
            self.error = exc


@pytest.fixture
def holder(ray_cluster):
    """A run's placement holding the instrument until the test closes it (closed at teardown in any case)."""
    from actors.placement import RayPlacement

    placement = RayPlacement(run="holder-run", report=Lines())
    placement.start_devices([recipe()])
    try:
        yield placement
    finally:
        placement.close()


def test_a_run_whose_instrument_another_run_holds_waits_says_who_holds_it_and_trains_exactly_once_free(
        ray_cluster, holder):
    from actors.launch import RayLauncher

    raw = tiny_config(name="second-run", system="shg", width=4, placement={"instrument": INSTRUMENT},
                      imperfections={"latency_call_s": 0, "latency_sample_s": 0},
                      twin={"kind": "physics", "groups": 4, "batch": 16, "epochs": 1},
                      schedule={"epochs": 2, "batch_size": 20})
    config = parse_config(yaml.safe_load(yaml.safe_dump(raw)), source="second.yaml")
    out = io.StringIO()  # what the submitter is shown (the launcher writes whole lines from one thread)
    outcome: dict = {}

    def submit() -> None:
        try:
            outcome["result"] = RayLauncher(out=out, poll_s=0.1).run(config)
        except Exception as exc:
            outcome["error"] = exc

    job = threading.Thread(target=submit, daemon=True)
    job.start()
    line = wait_until(lambda: next((x for x in out.getvalue().splitlines() if "waits for instrument" in x), None),
                      timeout=180, what="the second run to say it waits for the instrument")
    assert line.startswith(f"-- device circuit waits for instrument {INSTRUMENT} (Ray resource instrument:{INSTRUMENT}")
    assert f"held by run 'holder-run' (Ray job {ray.get_runtime_context().get_job_id()}, its device optics" in line
    assert job.is_alive() and "error" not in outcome  # waiting, not failed
    holder.close()  # the first run ends: its instrument is free
    job.join(timeout=300)
    assert not job.is_alive() and "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    train = int(re.search(r"on digits: (\d+) train", out.getvalue()).group(1))
    assert result.state == "finished" and result.steps == 2 * math.ceil(train / 20)  # every step of 2 epochs
    assert result.nodes == {"circuit": ray_cluster.lab_nodes[INSTRUMENT]}
    assert "is free after" in out.getvalue()
    # what it waited is in its result too (what `pnn-cluster train --json` prints), not only in a line
    assert set(result.instrument_waits) == {"circuit"} and result.instrument_waits["circuit"] > 0


def test_the_connect_timeout_does_not_run_while_the_instrument_is_held_and_runs_once_it_is_free(ray_cluster, holder):
    from actors.placement import RayPlacement

    lines = Lines()
    # the timeout leaves a device actor's process time to start once the instrument is free
    waiting = RayPlacement(run="patient-run", report=lines, connect_timeout_s=15.0, lease_poll_s=0.1,
                           wait_report_s=16.0)
    try:
        start = Starting(waiting, [recipe("optics2")])
        # a reminder after 16 s of waiting: more than the connect timeout has passed, and the start still waits
        wait_until(lambda: lines.having("still waits for instrument"), timeout=60, what="a reminder line")
        assert start.is_alive() and start.error is None
        assert "held by run 'holder-run'" in lines.having("still waits")[0]
        holder.close()
        start.join(timeout=120)
        assert start.error is None and [r.label for r in start.refs] == ["optics2"]
        assert waiting.waits["optics2"] >= 16.0
        assert lines.having(f"optics2: instrument {INSTRUMENT} is free after")
    finally:
        waiting.close()


def test_a_run_stopped_while_it_waits_for_an_instrument_ends_at_once_naming_the_device(ray_cluster, holder):
    from actors.placement import RayPlacement

    lines = Lines()
    waiting = RayPlacement(run="stopped-run", report=lines, lease_poll_s=0.1)
    try:
        start = Starting(waiting, [recipe("optics3")])
        wait_until(lambda: lines.having("waits for instrument"), timeout=60, what="the waiting line")
        waiting.cancel()
        start.join(timeout=30)
        assert isinstance(start.error, DeviceError) and "optics3" in str(start.error)
        assert "stopped while" in str(start.error)
    finally:
        waiting.close()


def test_two_devices_of_one_run_on_one_instrument_fail_at_once_instead_of_waiting_for_each_other(ray_cluster):
    from actors.placement import RayPlacement

    placement = RayPlacement(run="misplaced")
    with pytest.raises(DeviceError, match=f"devices a, b all ask for instrument {INSTRUMENT}, which has one "):
        placement.start_devices([recipe("a"), recipe("b")])
    assert placement.counts()["device_actors"] == 0
