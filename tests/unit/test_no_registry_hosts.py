"""No tracked file names a public package registry's host (issue 21).

The machines this project runs on reach the Python package index (and its file host), the npm
registry and Debian's mirrors, and the project must not spell those hosts anywhere: sample data
uses names under `.test` / `.example`, deployment examples a marked placeholder. The list below is
kept as salted SHA-256 digests, so this file names none of them either; a failure reports the
file, line and column, not the name.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SALT = b"egress-warden/no-registry-hosts/v1\x00"

# sha256(SALT + host). A listed name also forbids every subdomain of it.
FORBIDDEN = frozenset(
    {
        "18f2ba4bb3b68a699ef2c589867aaf1849467a0aa151faace1d55323e4969d4c",  # Python index: domain
        "d2486959bbd34082f96472a35021a0949105aebdb02cdf7e67c8c7b128e3acec",  # its file host: domain
        "4ccbe3a2bf0fcd8ad27f16ef75e187a082da719d017128d7b2babee1aca2bd69",  # npm registry: domain
        "2348c07ec813d897a0d0b551de7b819540cbea14f56b709277950d7457ceb4a7",  # npm: 2nd usual host
        "0a8144b057fbb61c517fcf4bb444dea2894ac8af1765afd7db9f3ab47c7e684f",  # npm: the .com host
        "979235af5d3fd23dc6854b497820821c2fdfcb7b8926d7c4da274af23788fedd",  # Debian: deb mirror
        "047c09702911b46abfcce2af86d22ad6e3bc9160c009f3aa7a82bccd786be324",  # Debian: security
        "3e38d8a2e34a4151b99d6c6247b7152e96fad2121088afda928f1f0dc417cd3d",  # Debian: security CDN
        "a940f7a459ab0c7e75cb3cdce52a6e1224b833fbe91bf442b5c735a3b6fd1434",  # Debian: ftp mirror
        "d57ae06f17619d9fa9477b9e8e0ca996c8d48977739cf1122c68e29f6000c6c9",  # Debian: redirector
        "1badf06147a18416166bb2ad60db4646c2eb8934e5b61a188930a1992f2d9d03",  # Debian: old CDN host
        "b51aeaec44143825972831c38c9c76fe1d70fb3229bc9901003f0f769e96e664",  # Debian: old http
        "e397ab348829e7a6dd1a944113582fcbf464b14872a5b9721a1589418f4cbc58",  # Debian: deb CDN host
    }
)

# A host-like token in lower-cased text: two or more dot-separated DNS labels.
HOST_TOKEN = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+")


def digest(name: str) -> str:
    """The salted SHA-256 of a host name, as listed in FORBIDDEN."""
    return hashlib.sha256(SALT + name.encode()).hexdigest()


def candidates(token: str) -> Iterator[str]:
    """The token and each parent domain of it (two labels at least); for a country mirror
    (`name.xx.domain`, a two-letter second label) also the name without that label."""
    labels = token.split(".")
    for start in range(len(labels) - 1):
        tail = labels[start:]
        yield ".".join(tail)
        if len(tail) >= 3 and len(tail[1]) == 2 and tail[1].isalpha():
            yield ".".join([tail[0], *tail[2:]])


class Scanner:
    """Finds listed hosts in text; hashes each distinct candidate name once."""

    def __init__(self, forbidden: frozenset[str]) -> None:
        self._forbidden = forbidden
        self._seen: dict[str, bool] = {}

    def _listed(self, name: str) -> bool:
        hit = self._seen.get(name)
        if hit is None:
            hit = self._seen[name] = digest(name) in self._forbidden
        return hit

    def hits(self, text: str) -> Iterator[tuple[int, int]]:
        """(line, column), 1-based, of each host-like token that is or is under a listed host."""
        # `\.` is how a host is spelled inside a regular expression.
        for lineno, line in enumerate(text.lower().replace("\\.", ".").splitlines(), 1):
            for match in HOST_TOKEN.finditer(line):
                if any(self._listed(name) for name in candidates(match.group())):
                    yield lineno, match.start() + 1


def tracked_files() -> list[str]:
    """Paths of the tracked files, relative to the repository root."""
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
    ).stdout
    return [p for p in out.decode().split("\0") if p]


def text_of(path: Path) -> str | None:
    """The file as text, or None for a binary file (a NUL byte near the start) or a non-file."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def scan(paths: Iterable[str], scanner: Scanner) -> tuple[int, list[str]]:
    """How many text files were read, and `path:line:column` for each hit."""
    read, found = 0, []
    for rel in paths:
        text = text_of(REPO / rel)
        if text is None:
            continue
        read += 1
        found += [f"{rel}:{line}:{col}" for line, col in scanner.hits(text)]
    return read, found


def test_forbidden_list_is_salted_digests() -> None:
    assert len(FORBIDDEN) == 13
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in FORBIDDEN)


def test_scanner_finds_a_listed_host_its_subdomains_and_country_mirrors() -> None:
    scanner = Scanner(frozenset({digest("registry.example"), digest("ftp.mirror.test")}))
    text = "\n".join(
        [
            "allow: [registry.example]",  # 1: the host
            "url = 'https://Files.Registry.EXAMPLE/simple/'",  # 2: a subdomain, any case
            r"pattern = r'^(.+\.)?registry\.example$'",  # 3: spelled inside a regex
            "- ftp.de.mirror.test",  # 4: a country mirror
            "- ftp.mirror.test:443",  # 5: with a port
            "notregistry.example registry.example.org registry-example mirror.test",  # 6: none
            "ftp.mirror2.test ftp.d3.mirror.test other.registry.test",  # 7: none
            "self.registry.example_thing",  # 8: still a host-like token ending in the host
        ]
    )
    assert [line for line, _ in scanner.hits(text)] == [1, 2, 3, 4, 5, 8]
    assert next(scanner.hits("a registry.example")) == (1, 3)


def test_binary_files_are_skipped(tmp_path: Path) -> None:
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x89PNG\0\0registry.example")
    assert text_of(binary) is None
    assert text_of(tmp_path) is None
    textual = tmp_path / "notes.txt"
    textual.write_bytes(b"caf\xe9 registry.example\n")
    assert text_of(textual) is not None


def test_no_tracked_file_names_a_registry_host() -> None:
    paths = tracked_files()
    assert "README.md" in paths and "tests/unit/test_no_registry_hosts.py" in paths
    read, found = scan(paths, Scanner(FORBIDDEN))
    assert read >= len(paths) // 2, f"only {read} of {len(paths)} tracked files were read as text"
    assert not found, (
        "a package registry's host name appears in tracked files (use a name under .test or "
        ".example, or a REPLACE-WITH-YOUR-... placeholder):\n  " + "\n  ".join(found)
    )
