"""benchmarks/decode_throughput.py reports the decoder's FLOP rate against a limit the machine did not exceed."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def flop_limit(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from decode_throughput import flop_limit

    return flop_limit


def test_the_flop_limit_is_the_measured_matmul_peak_where_the_nominal_one_is_below_it(flop_limit):
    # An EPYC Zen 4 VM reported 2.6 GHz (nominal 2 cores x 2 x 8 lanes x 2 x 2.6 GHz = 166.4 GFLOP/s) and
    # ran a 2048^3 matmul at 200.5: against the nominal figure the decoder ran at 1.12 of its "limit".
    limit, how = flop_limit(166.4e9, 200.5e9)
    assert limit == 200.5e9 and how.startswith("measured") and "166" in how
    assert 186.4e9 / limit < 1  # the decoder's rate on that machine
    # Where the reported clock is right, the nominal peak is above the matmul's and is the limit.
    limit, how = flop_limit(332.8e9, 200.5e9)
    assert limit == 332.8e9 and how.startswith("nominal")
    # No nominal figure (bf16 on AMX tiles): the matmul's.
    assert flop_limit(None, 150e9)[0] == 150e9
