"""The results table (plain text for stdout, Markdown for docs/benchmarks.md)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.peers import (
    LABELS,
    MITMPROXY,
    PEER_ORDER,
    SQUID,
    WARDEN_10,
    WARDEN_10_W2,
    WARDEN_100K,
)
from benchmarks.workloads import HIGHER, INFO, LOWER, REFERENCES, SUBJECTS, Row

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
RESULTS_START, RESULTS_END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"
POLICY_START, POLICY_END = "<!-- bench:policy:start -->", "<!-- bench:policy:end -->"
RATIOS = [(s, r) for s in SUBJECTS for r in REFERENCES]
_SHORT = {
    MITMPROXY: "mitmproxy",
    SQUID: "Squid",
    WARDEN_10: "w10",
    WARDEN_100K: "w100k",
    WARDEN_10_W2: "w10x2",
}
WORSE_BY = 0.05  # the stdout summary lists ratios to bare mitmproxy worse than this


@dataclass(frozen=True)
class RunInfo:
    command: str
    date: str
    machine: dict[str, str]
    settings: str


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio_value(row: Row, subject: str, reference: str) -> float | None:
    """subject / reference from the same run; None when either is missing or not positive."""
    s, r = row.values.get(subject), row.values.get(reference)
    if row.better == INFO or s is None or r is None or r <= 0 or s < 0:
        return None
    return s / r


def ratio(row: Row, subject: str, reference: str) -> str:
    value = ratio_value(row, subject, reference)
    return "—" if value is None else f"{value:.2f}x"


def header() -> list[str]:
    ratios = [f"{_SHORT[s]}/{_SHORT[r]}" for s, r in RATIOS]
    return ["workload", "metric", "better", *(LABELS[k] for k in PEER_ORDER), *ratios]


def cells(row: Row) -> list[str]:
    values = [fmt(row.values.get(k)) for k in PEER_ORDER]
    ratios = [ratio(row, s, r) for s, r in RATIOS]
    better = {HIGHER: "higher", INFO: ""}.get(row.better, "lower")
    return [row.workload, row.metric, better, *values, *ratios]


def text_table(rows: Sequence[Row]) -> str:
    table = [header(), *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]

    def render(line: list[str]) -> str:
        parts = [
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(parts)

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(table[0]), rule, *(render(line) for line in table[1:])])


def _worse(row: Row, subject: str) -> float | None:
    """subject / bare mitmproxy when that is more than WORSE_BY worse, else None."""
    value = ratio_value(row, subject, MITMPROXY)
    if value is None:
        return None
    worse = value < 1 - WORSE_BY if row.better == HIGHER else value > 1 + WORSE_BY
    return value if worse else None


def worse_summary(rows: Sequence[Row]) -> str:
    """For stdout after the table: w10 and w100k against bare mitmproxy, beyond WORSE_BY
    (`max` rows, a lottery of rare pauses, footprint rows and the policy rows left out)."""
    head = (
        f"rows where egress-warden is more than {WORSE_BY * 100:.0f} % worse than bare mitmproxy:"
    )
    lines = []
    for row in rows:
        if row.better not in (HIGHER, LOWER) or row.workload == "policy" or "max" in row.metric:
            continue
        if not row.per_use:
            continue
        worse = {s: v for s in (WARDEN_10, WARDEN_100K) if (v := _worse(row, s)) is not None}
        if worse:
            found = ", ".join(f"{_SHORT[s]} {v:.3f}x" for s, v in worse.items())
            lines.append(f"  {row.workload} / {row.metric}: {found}")
    return "\n".join([head, *lines]) if lines else f"{head} none"


# Issue 17's targets: (label, workload, metric prefix, reference or None for a figure, the
# target as text, a check of the achieved value). References: MITMPROXY, SQUID, or "self" for a
# ratio the row carries itself.
TARGETS: list[tuple[str, str, str, str | None, str, Callable[[float], bool]]] = [
    (
        "tunnel MB/s, 100 MB download, vs Squid",
        "HTTPS",
        "tunnel MB/s",
        SQUID,
        ">= 1.0x",
        lambda v: v >= 1.0,
    ),
    (
        "req/s inside 32 long-lived tunnels, vs Squid",
        "HTTPS",
        "req/s inside",
        SQUID,
        ">= 1.0x",
        lambda v: v >= 1.0,
    ),
    (
        "new CONNECT tunnels/s, vs Squid",
        "HTTPS",
        "new CONNECT tunnels/s",
        SQUID,
        ">= 0.5x",
        lambda v: v >= 0.5,
    ),
    (
        "added latency, new tunnel + TLS + request, p50 (ms)",
        "latency",
        "added new tunnel + TLS + request p50",
        None,
        "<= 0.7 ms",
        lambda v: v <= 0.7,
    ),
    (
        "RSS per 1,000 idle tunnels vs bare mitmproxy",
        "memory",
        "RSS per 1,000 idle TLS tunnels",
        MITMPROXY,
        "<= 0.7x",
        lambda v: v <= 0.7,
    ),
    (
        "RSS at start vs bare mitmproxy",
        "start-up",
        "RSS 1 s after ready",
        MITMPROXY,
        "<= 1.1x",
        lambda v: v <= 1.1,
    ),
    (
        "plain HTTP req/s vs bare mitmproxy",
        "plain HTTP",
        "keep-alive req/s",
        MITMPROXY,
        ">= 1.2x",
        lambda v: v >= 1.2,
    ),
    (
        "allowed p99 while 10,000 held, vs nothing held",
        "held 10k",
        "p99 while",
        None,
        "<= 1.2x",
        lambda v: v <= 1.2,
    ),
]


def target_summary(rows: Sequence[Row], subject: str = WARDEN_10) -> str:
    """Issue 17's target table for `subject` (default: the 10-rule egress-warden)."""
    lines = [f"issue 17 targets ({_SHORT[subject]}):"]
    for label, workload, prefix, reference, target, met in TARGETS:
        row = next(
            (r for r in rows if r.workload == workload and r.metric.startswith(prefix)), None
        )
        value = None
        if row is not None:
            value = (
                row.values.get(subject)
                if reference is None
                else ratio_value(row, subject, reference)
            )
        if row is None or value is None:
            lines.append(f"  {label}: target {target}, not measured")
            continue
        shown = f"{value:.2f}x" if reference is not None or "(x)" in row.metric else fmt(value)
        verdict = "met" if met(value) else "NOT met"
        lines.append(f"  {label}: target {target}, achieved {shown} ({verdict})")
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    head = header()
    align = ["---", "---", "---"] + ["---:"] * (len(head) - 3)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def results_block(info: RunInfo, rows: Sequence[Row]) -> str:
    m = info.machine
    return f"""{RESULTS_START}
Command: `{info.command}` (what `make bench` runs), {info.date}.

Machine: {m["nproc"]} cores, {m["cpu"]}, Linux {m["kernel"]}; Python {m["python"]},
mitmproxy {m["mitmproxy"]}, Squid {m["squid"]}, nginx {m["nginx"]}.
Settings: {info.settings}.

{markdown_table(rows)}

Ratios are egress-warden divided by the reference from the same run (`w10`: 10-rule policy,
`w100k`: 100,002 rules, `w10x2`: the 10-rule policy on `run --workers 2`, two proxy processes on
one port). Where higher is better a ratio below 1 means egress-warden is slower; where lower is
better a ratio above 1 means it costs more.
{RESULTS_END}"""


def policy_block(results: Sequence[tuple[int, float, float, float]]) -> str:
    lines = ["| rules | load (s) | lookup hit (ns) | lookup miss (ns) |", "|---:|---:|---:|---:|"]
    for rules, load_s, hit_ns, miss_ns in results:
        lines.append(f"| {rules:,} | {load_s:.3f} | {hit_ns:.0f} | {miss_ns:.0f} |")
    if len(results) == 2:
        (_, _, h0, m0), (_, _, h1, m1) = results
        lines.append(f"| ratio 100k / 10 | | {h1 / h0:.2f}x | {m1 / m0:.2f}x |")
    return f"{POLICY_START}\n" + "\n".join(lines) + f"\n{POLICY_END}"


def _replace(text: str, start: str, end: str, block: str) -> str:
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    return pattern.sub(lambda _: block, text, count=1)


def update_doc(
    info: RunInfo, rows: Sequence[Row], policy: Sequence[tuple[int, float, float, float]]
) -> Path:
    """Replace the generated blocks of docs/benchmarks.md; the prose around them stays."""
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    if RESULTS_START not in text or POLICY_START not in text:
        text = template()
    text = _replace(text, RESULTS_START, RESULTS_END, results_block(info, rows))
    if policy:
        text = _replace(text, POLICY_START, POLICY_END, policy_block(policy))
    DOC.write_text(text, encoding="utf-8")
    return DOC


def template() -> str:
    """The document's skeleton, used when the generated-block markers are missing."""
    return f"""# Benchmarks

## Proxy benchmarks (`make bench`)

{RESULTS_START}
{RESULTS_END}

## Policy load and lookup

{POLICY_START}
{POLICY_END}
"""
