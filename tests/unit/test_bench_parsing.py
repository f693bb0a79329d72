"""The benchmark harness survives whatever its tools print (hey's tables come out short on a
slow machine)."""

from __future__ import annotations

import pytest

from benchmarks.clients import parse_hey
from benchmarks.procs import BenchError

FULL = """
Summary:
  Total:	3.0021 secs
  Slowest:	0.0412 secs
  Requests/sec:	1234.5600

Latency distribution:
  10% in 0.0011 secs
  50% in 0.0021 secs
  90% in 0.0051 secs
  99% in 0.0301 secs

Status code distribution:
  [200]	3700 responses
"""


def test_full_summary_is_read() -> None:
    result = parse_hey(FULL, 3)
    assert (result.requests, result.rps) == (3700, 1234.56)
    assert (result.p50_ms, result.p99_ms, result.max_ms) == pytest.approx((2.1, 30.1, 41.2))


def test_a_short_latency_table_falls_back_to_the_nearest_row_or_the_slowest() -> None:
    short = FULL.replace("  99% in 0.0301 secs\n", "").replace("  50% in 0.0021 secs\n", "")
    result = parse_hey(short, 3)
    assert result.p50_ms == pytest.approx(5.1)  # the 90 % row is the nearest above 50
    assert result.p99_ms == pytest.approx(41.2)  # no row above 99: the slowest request


def test_no_table_and_no_rate_still_gives_a_result() -> None:
    bare = "Summary:\n\nStatus code distribution:\n  [200]\t30 responses\n"
    result = parse_hey(bare, 3)
    assert (result.requests, result.rps, result.p99_ms) == (30, 10.0, 0.0)


def test_no_successful_request_is_an_error() -> None:
    with pytest.raises(BenchError):
        parse_hey("Error distribution:\n  [12]\tGet ...: dial tcp: refused\n", 3)
