"""Policy load and match cost at 100,000 rules versus a 10-rule baseline.

Run: .venv/bin/python benchmarks/bench_policy.py
"""

from __future__ import annotations

import ipaddress
import random
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.hosts import Host
from proxy.policy.load import load_policies
from proxy.policy.model import EffectivePolicy

LOOKUPS = 200_000
SEED = 1234


def make_patterns(count: int, rng: random.Random) -> list[str]:
    """A mix of exact, '*.', '**.', in-label glob and CIDR patterns."""
    patterns: list[str] = []
    tlds = ["com", "net", "org", "io", "dev"]
    for i in range(count):
        domain = f"d{i}x{rng.randrange(10**6)}.{tlds[i % len(tlds)]}"
        kind = i % 10
        if kind < 5:
            patterns.append(f"api{i % 7}.{domain}")
        elif kind < 7:
            patterns.append(f"*.{domain}")
        elif kind < 8:
            patterns.append(f"**.{domain}")
        elif kind < 9:
            patterns.append(f"ec2.r{i % 5}-*.{domain}")
        else:
            patterns.append(f"10.{(i >> 8) & 255}.{i & 255}.0/24")
    return patterns


def write_policy(directory: Path, name: str, patterns: list[str]) -> Path:
    path = directory / name
    lines = ["version: 1", "default: ask", "allow:"]
    lines += [f'  - "{p}"' for p in patterns]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def hosts_for(patterns: list[str], rng: random.Random, n: int) -> tuple[list[Host], list[Host]]:
    """Hosts that hit some rule, and hosts that miss every rule."""
    hits: list[Host] = []
    for pattern in rng.sample(patterns, min(n, len(patterns))):
        if pattern[0].isdigit():
            ip = ipaddress.ip_address(pattern.split("/")[0].rsplit(".", 1)[0] + ".7")
            hits.append(Host(name=str(ip), ip=ip))
        else:
            hits.append(Host(name=pattern.replace("**.", "").replace("*", "www")))
    misses = [Host(name=f"www.unknown{i}.example.com") for i in range(n // 2)]
    misses += [
        Host(name=str(ip), ip=ip)
        for ip in (ipaddress.ip_address(f"172.16.{i % 256}.{i % 200}") for i in range(n // 2))
    ]
    return hits, misses


def ns_per_lookup(policy: EffectivePolicy, hosts: list[Host], expect_hit: bool) -> float:
    allow = policy.allow
    for host in hosts:  # sanity: the benchmark measures what it claims
        assert (allow.match(host, 443) is not None) is expect_hit, host
    count = max(1, LOOKUPS // len(hosts))
    seconds = min(
        timeit.repeat(lambda: [allow.match(h, 443) for h in hosts], number=count, repeat=3)
    )
    return seconds / (count * len(hosts)) * 1e9


def measure(directory: Path, rules: int, rng: random.Random) -> tuple[int, float, float, float]:
    patterns = make_patterns(rules, rng)
    path = write_policy(directory, f"policy-{rules}.yaml", patterns)
    start = time.perf_counter()
    policy = load_policies([path])
    load_seconds = time.perf_counter() - start
    assert len(policy.allow) == rules
    hits, misses = hosts_for(patterns, rng, 1000)
    return (
        rules,
        load_seconds,
        ns_per_lookup(policy, hits, True),
        ns_per_lookup(policy, misses, False),
    )


def main() -> None:
    rng = random.Random(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(Path(tmp), n, rng) for n in (10, 100_000)]
    print(f"{'rules':>8} {'load s':>8} {'hit ns':>8} {'miss ns':>8}")
    for rules, load_s, hit_ns, miss_ns in results:
        print(f"{rules:>8} {load_s:>8.3f} {hit_ns:>8.0f} {miss_ns:>8.0f}")
    (_, _, base_hit, base_miss), (_, _, big_hit, big_miss) = results
    print(f"ratio 100k/10: hit {big_hit / base_hit:.2f}x, miss {big_miss / base_miss:.2f}x")


if __name__ == "__main__":
    main()
