"""Instrument leases: when a device waits for an instrument another run holds, and what its run is told."""

from pnn_cluster.runner.leases import GOT, WAITS, Lease, got_line, still_waiting_line, waiting_for, waiting_line

HELD = Lease(instrument="shg-bench-1", run="vowels-pat", device="optics", job="03000000", node="a1b2c3d4e5f6a7b8",
             since=1_700_000_000.0, token="theirs")


def test_a_device_waits_while_another_runs_lease_holds_the_only_unit():
    assert waiting_for("ours", HELD, units_free=0.0)


def test_a_free_unit_means_nobody_holds_the_instrument_whatever_lease_is_on_record():
    assert not waiting_for("ours", HELD, units_free=1.0)
    assert not waiting_for("ours", None, units_free=1.0)


def test_a_device_does_not_wait_for_its_own_lease():
    ours = Lease(**{**HELD.as_dict(), "token": "ours"})
    assert not waiting_for("ours", ours, units_free=0.0)


def test_a_released_lease_with_the_unit_taken_is_the_next_device_starting_not_a_wait():
    released = Lease(**{**HELD.as_dict(), "released": HELD.since + 60})
    assert not waiting_for("ours", released, units_free=0.0)


def test_a_unit_held_with_no_lease_on_record_is_no_wait_it_may_be_this_device_starting():
    # its process has the unit but has not recorded its lease yet: a wait reported then would be false
    assert not waiting_for("ours", None, units_free=0.0)


def test_the_waiting_line_names_the_instrument_the_holding_run_its_job_device_node_and_since_when():
    line = waiting_line("optics", "shg-bench-1", "instrument:shg-bench-1", HELD, HELD.since + 75)
    assert line.startswith("-- device optics waits for instrument shg-bench-1 (Ray resource instrument:shg-bench-1")
    assert "run 'vowels-pat' (Ray job 03000000, its device optics, on node a1b2c3d4e5f6)" in line
    assert "since 22:13:20 UTC" in line and "waiting since 22:14:35 UTC" in line


def test_the_waiting_line_names_who_submitted_the_holding_run_when_known():
    theirs = Lease(**{**HELD.as_dict(), "submitter": "ada"})
    line = waiting_line("optics", "shg-bench-1", "instrument:shg-bench-1", theirs, HELD.since)
    assert "run 'vowels-pat' (submitted by ada, Ray job 03000000, its device optics" in line


def test_the_later_lines_say_how_long_and_when_it_is_free():
    assert still_waiting_line("optics", "shg-bench-1", HELD, 61.2).endswith("held by run 'vowels-pat' "
                                                                             "(Ray job 03000000): 61 s so far")
    assert got_line("optics", "shg-bench-1", 12.34) == ("-- device optics: instrument shg-bench-1 is free after "
                                                        "12.3 s of waiting; connecting")


def test_a_lease_travels_as_a_plain_dict_and_back():
    assert Lease.from_dict({**HELD.as_dict(), "extra": 1}) == HELD


def test_what_a_reader_of_a_runs_output_looks_for_matches_the_lines():
    assert WAITS in waiting_line("optics", "shg-bench-1", "instrument:shg-bench-1", HELD, HELD.since)
    assert GOT.search(got_line("optics", "shg-bench-1", 12.34)).groups() == ("shg-bench-1", "12.3")
