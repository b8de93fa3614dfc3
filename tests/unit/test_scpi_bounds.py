"""The simulated SCPI bench's strict SCPI numbers and its limits, without a bench listening: numbers are
parsed by the SCPI rules, the block cap follows from the device, nonsense limits are refused at construction
(the bounds acting on a bench on loopback: ``tests/system/test_scpi_bounds.py``).
"""

from __future__ import annotations

import time

import pytest

from pnn_cluster.devices import Imperfections, make_device
from pnn_cluster.protocol.scpi import Ints, Range, is_decimal_number, parse_decimal
from pnn_cluster.servers import BindError
from pnn_cluster.servers.scpi_bench import (
    MAX_BLOCK_BYTES,
    SimBench,
    default_max_block_bytes,
    default_max_message_block_bytes,
)

IDEAL = Imperfections.ideal(seed=3)


@pytest.mark.parametrize("text", ["1", "-1.5", "+2.0E-3", ".5", "5.", "0", "007", "1e3", "-.25e+2", "1E999"])
def test_decimal_numeric_data_accepted(text):
    assert is_decimal_number(text)
    assert parse_decimal(text) == float(text)


@pytest.mark.parametrize("text", ["1_0", "0x10", "1e", "1E+", " 1", "1 ", "1 0", "inf", "nan", "infinity",
                                  "-inf", "+", "-", ".", "", "1.2.3", "--1", "#H10", "1,0", "١", "1e1_0",
                                  "0x1p3", "1d3"])
def test_not_decimal_numeric_data_refused(text):
    assert not is_decimal_number(text)
    with pytest.raises(ValueError, match="not SCPI decimal numeric data"):
        parse_decimal(text)
    with pytest.raises(ValueError):
        Range(-10, 10).from_scpi(text)
    with pytest.raises(ValueError):
        Ints(-10, 10).from_scpi(text)


@pytest.mark.parametrize("text", ["1" * 200_000 + "x", "1." + "1" * 200_000 + "x", "1e" + "1" * 200_000 + "x",
                                  "-" + "1" * 200_000 + "e+"])
def test_a_long_run_of_digits_that_is_not_a_number_is_refused_in_linear_time(text):
    # the former pattern tried every split of the run between two digit quantifiers: 20,000 digits took ~10 s
    t0 = time.perf_counter()
    assert not is_decimal_number(text)
    assert time.perf_counter() - t0 < 0.5


def test_default_block_cap_is_the_largest_legitimate_block_within_the_default_bounds():
    spec = make_device("shg", imperfections=IDEAL).spec
    assert spec.max_batch * spec.input.size * 8 == 96_000_000  # a batch of 10**6 samples: over the 32 MiB at most
    assert default_max_block_bytes(spec) == MAX_BLOCK_BYTES == 32 << 20
    small = spec.__class__.from_dict({**spec.to_dict(), "max_batch": 100_000})
    assert default_max_block_bytes(small) == 100_000 * spec.input.size * 8  # between the bounds: its own
    assert default_max_block_bytes(spec.__class__.from_dict({**spec.to_dict(), "max_batch": 10**8})) \
        == MAX_BLOCK_BYTES
    assert default_max_block_bytes(spec.__class__.from_dict({**spec.to_dict(), "max_batch": 1})) == 1 << 20
    assert SimBench("shg", port=0, imperfections=IDEAL).max_block_bytes == 32 << 20
    assert SimBench("shg", port=0, imperfections=IDEAL, max_block_bytes=5000).max_block_bytes == 5000


def test_default_cap_on_the_blocks_of_one_message_is_one_block_and_every_parameter():
    spec = make_device("oscillators", imperfections=IDEAL).spec  # parameters: angle (12), coupling (11)
    assert default_max_message_block_bytes(spec, 96_000_000) == 96_000_000 + 23 * 8
    bench = SimBench("oscillators", port=0, imperfections=IDEAL, max_block_bytes=5000)
    assert bench.max_message_block_bytes == 5000 + 23 * 8  # follows the block cap it is given
    assert SimBench("shg", port=0, imperfections=IDEAL, max_message_block_bytes=7).max_message_block_bytes == 7


@pytest.mark.parametrize("option", [{"max_connections": 0}, {"max_block_bytes": 10**9}, {"max_block_bytes": 1.5},
                                    {"idle_timeout_s": 0}, {"command_timeout_s": float("nan")},
                                    {"command_timeout_s": None}, {"max_unread_bytes": True},
                                    {"max_message_block_bytes": 0}, {"max_message_block_bytes": 2.5}])
def test_bench_refuses_nonsense_limits(option):
    with pytest.raises(BindError, match=next(iter(option))):
        SimBench("shg", port=0, imperfections=IDEAL, **option)
