"""The benchmark harness's own parts: wrk's summary read defensively, a failing workload does
not end the run, and the plain ws:// client against the real WebSocket upstream."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from benchmarks import run as bench_run
from benchmarks.clients import parse_wrk
from benchmarks.procs import BenchError, free_port, port_open
from benchmarks.report import target_summary
from benchmarks.websocket import WS_PATH, ws_download
from benchmarks.workloads import HIGHER, INFO, Bench, Row
from tests.support.otlp import wait_for
from tests.support.proxy import REPO

WRK_LINE = (
    'WRKJSON {"requests": 3000, "duration_us": 1500000, "errors": 0, "status": 0, '
    '"p50_us": 800, "p99_us": 2500, "max_us": 9000}'
)


def test_wrk_summary_is_read() -> None:
    result = parse_wrk(f"Running 1s test\n{WRK_LINE}\n")
    assert (result.requests, result.rps) == (3000, 2000.0)
    assert (result.p50_ms, result.p99_ms, result.max_ms) == (0.8, 2.5, 9.0)


@pytest.mark.parametrize(
    "out",
    [
        "",  # nothing printed
        "Running 1s test\n",  # no summary line
        WRK_LINE[:40],  # cut short
        WRK_LINE.replace('"p99_us": 2500, ', ""),  # a field missing
        WRK_LINE.replace("1500000", "0"),  # no duration
        WRK_LINE.replace('"requests": 3000', '"requests": "many"'),  # not a number
    ],
)
def test_odd_wrk_output_is_a_bench_error(out: str) -> None:
    with pytest.raises(BenchError):
        parse_wrk(out)


def test_a_failing_workload_is_reported_and_the_others_still_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(_bench: Bench) -> list[Row]:
        raise BenchError("hey printed nothing")

    def fine(_bench: Bench) -> list[Row]:
        return [Row("w", "m", HIGHER, {"ew10": 1.0})]

    monkeypatch.setattr(bench_run, "WORKLOADS", {"broken": ("b", broken), "fine": ("f", fine)})
    rows, failed = bench_run.run_workloads(None, ["broken", "fine"])  # type: ignore[arg-type]
    assert [r.metric for r in rows] == ["m"]
    assert failed == ["broken: hey printed nothing"]


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.websocket", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: port_open(port), 15)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("total", [0, 1, 65536, 3 * 65536 + 7])
def test_ws_client_reads_exactly_the_payload(ws_upstream: int, total: int) -> None:
    speed = ws_download(
        connect_port=ws_upstream,
        target=WS_PATH,
        host=f"127.0.0.1:{ws_upstream}",
        total=total,
        message_size=65536,
    )
    assert speed >= 0


def test_ws_answer_other_than_101_is_a_bench_error(ws_upstream: int) -> None:
    with pytest.raises(BenchError, match="not 101"):
        ws_download(
            connect_port=ws_upstream,
            target="/not-ws",
            host=f"127.0.0.1:{ws_upstream}",
            total=10,
            message_size=65536,
        )


def test_target_summary_reads_ratios_figures_and_missing_rows() -> None:
    rows = [
        Row(
            "HTTPS",
            "tunnel MB/s, 100 MB download (median of 1)",
            HIGHER,
            {"ew10": 900.0, "squid": 1000.0},
        ),
        Row(
            "plain HTTP",
            "keep-alive req/s (32 conns)",
            HIGHER,
            {"ew10": 1500.0, "mitmproxy": 1000.0},
        ),
        Row(
            "held 10k", "p99 while 10,000 are held / p99 with nothing held (x)", INFO, {"ew10": 1.1}
        ),
    ]
    text = target_summary(rows)
    assert (
        "tunnel MB/s, 100 MB download, vs Squid: target >= 1.0x, achieved 0.90x (NOT met)" in text
    )
    assert "plain HTTP req/s vs bare mitmproxy: target >= 1.2x, achieved 1.50x (met)" in text
    assert "vs nothing held: target <= 1.2x, achieved 1.10x (met)" in text
    assert "RSS at start vs bare mitmproxy: target <= 1.1x, not measured" in text
