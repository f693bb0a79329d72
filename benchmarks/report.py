"""The results table (plain text for stdout, Markdown for docs/benchmarks.md)."""

from __future__ import annotations

import re
from collections.abc import Sequence
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
