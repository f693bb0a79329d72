"""Credential scanning of inspected requests, bounded in bytes and time.

The detectors are `detect-secrets` plugins (a maintained set: private key blocks, cloud keys,
vendor token formats), called through `analyze_string` only, so nothing is ever verified
against a remote service. Its keyword plugin counts only when the value next to the key-like
name is long and high-entropy (`password = "changeme"` is not a credential worth refusing).
The generic high-entropy plugins are not used: lock-file hashes, minified code and base64
images trip them. JSON Web Tokens are not scanned either: they are session tokens a host hands
out for itself.

A hit is a credential only where it does not belong: a vendor token to that vendor's hosts, or
a brokered secret's value to its owner hosts, passes.

`detect-secrets` (and the `requests` stack it pulls in) is imported only by a policy that scans
(the service builds the detectors off the event loop when such a policy is loaded): only
inspected hosts are scanned, and most proxies inspect none (~60 ms, several MiB).
"""

from __future__ import annotations

import functools
import math
import time
import urllib.parse
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import brotli  # type: ignore[import-untyped]  # mitmproxy's dependency; no stubs

from proxy.hosts import Host
from proxy.policy.model import SecretRule
from proxy.secrets import Finding
from proxy.secrets.broker import SecretUnavailable, owns, read_value
from proxy.verdicts import Reason

if TYPE_CHECKING:
    from detect_secrets.plugins.base import BasePlugin

MAX_BODY_BYTES = 1 << 20  # scanned per request (decoded); the rest passes unscanned
MAX_SCAN_SECONDS = 0.1  # per request (~50 ms per MiB measured); past it the rest passes
# The pattern detectors run over 64 KiB windows (overlapping, so a token on a boundary is
# seen whole); the keyword detector, which looks at one assignment at a time, runs only on lines
# (cut at 4 KiB) that name a key-like word: ~10 ms per MiB instead of ~50 line by line.
_WINDOW = 1 << 16
_LINE = 4096
_OVERLAP = 512
# Every keyword contains one of these: a substring test on the lower-cased text (memchr-fast)
# decides whether the keyword regex runs at all (the regex itself costs ~9 ms per 64 KiB).
_KEYWORD_WORDS = ("key", "pass", "pwd", "secret", "contras")


def _has_keyword(text: str) -> bool:
    low = text.lower()
    return any(word in low for word in _KEYWORD_WORDS)


_KEYWORD_MIN_LENGTH = 16
_KEYWORD_MIN_ENTROPY = 3.5  # bits per character


@dataclass(frozen=True, slots=True)
class _Detector:
    name: str  # the plugin's secret type, as events show it
    plugin: BasePlugin
    owners: tuple[str, ...]  # host suffixes a hit may go to ("github.com" covers subdomains)
    keyword: bool = False  # the keyword detector: bodies and URLs only, on key-like lines


@functools.cache
def detectors() -> tuple[_Detector, ...]:
    """The detectors, built (and `detect-secrets` imported) on first use."""
    from detect_secrets.plugins.aws import AWSKeyDetector
    from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
    from detect_secrets.plugins.basic_auth import BasicAuthDetector
    from detect_secrets.plugins.discord import DiscordBotTokenDetector
    from detect_secrets.plugins.github_token import GitHubTokenDetector
    from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
    from detect_secrets.plugins.keyword import DENYLIST as KEYWORDS
    from detect_secrets.plugins.keyword import KeywordDetector
    from detect_secrets.plugins.npm import NpmDetector
    from detect_secrets.plugins.openai import OpenAIDetector
    from detect_secrets.plugins.private_key import PrivateKeyDetector
    from detect_secrets.plugins.pypi_token import PypiTokenDetector
    from detect_secrets.plugins.sendgrid import SendGridDetector
    from detect_secrets.plugins.slack import SlackDetector
    from detect_secrets.plugins.stripe import StripeDetector
    from detect_secrets.plugins.twilio import TwilioKeyDetector

    assert all(any(w in k for w in _KEYWORD_WORDS) for k in KEYWORDS)
    vendor = (
        (PrivateKeyDetector(), ()),
        (AWSKeyDetector(), ("amazonaws.com", "aws.amazon.com")),
        (AzureStorageKeyDetector(), ("core.windows.net",)),
        (GitHubTokenDetector(), ("github.com", "githubusercontent.com")),
        (GitLabTokenDetector(), ("gitlab.com",)),
        (SlackDetector(), ("slack.com",)),
        (StripeDetector(), ("stripe.com",)),
        (OpenAIDetector(), ("openai.com",)),
        (SendGridDetector(), ("sendgrid.com",)),
        (TwilioKeyDetector(), ("twilio.com",)),
        (DiscordBotTokenDetector(), ("discord.com",)),
        # Package registry tokens: their registries are not named here; a `secrets:` entry
        # (the token brokered) or `scan: report|off` on the registry's inspect entry lets
        # them through.
        (NpmDetector(), ()),
        (PypiTokenDetector(), ()),
        (BasicAuthDetector(), ()),
    )
    found = [_Detector(str(p.secret_type), p, owners) for p, owners in vendor]
    found.append(_Detector("Secret Keyword", KeywordDetector(), (), keyword=True))
    return tuple(found)


def entropy(text: str) -> float:
    """Shannon entropy of `text` in bits per character."""
    if not text:
        return 0.0
    counts = Counter(text)
    size = len(text)
    return -sum(n / size * math.log2(n / size) for n in counts.values())


def _vendor_owns(detector: _Detector, host: Host | None) -> bool:
    if host is None or host.ip is not None:
        return False
    name = host.name
    return any(name == suffix or name.endswith("." + suffix) for suffix in detector.owners)


class Scan:
    """One request's scan: call `text` for the request line and headers, `body` for the body;
    stops at the first credential that may not go to `host`, and at the budget."""

    def __init__(
        self,
        host: Host | None,
        port: int,
        secrets: Sequence[SecretRule] = (),
        *,
        max_bytes: int = MAX_BODY_BYTES,
        max_seconds: float = MAX_SCAN_SECONDS,
    ) -> None:
        self.host = host
        self.port = port
        self.max_bytes = max_bytes
        self._deadline = time.monotonic() + max_seconds
        self.exhausted = False  # the time budget ran out before the end
        self._brokered: list[tuple[SecretRule, str]] = []
        for rule in secrets:
            try:
                self._brokered.append((rule, read_value(rule)))
            except SecretUnavailable:
                continue

    def _allowed(self, detector: _Detector, value: str) -> bool:
        if _vendor_owns(detector, self.host):
            return True
        # A brokered secret's own value, going to one of its owners (the swap put it there).
        return any(real in value or value in real for rule, real in self._owned())

    def _owned(self) -> Iterator[tuple[SecretRule, str]]:
        return ((r, v) for r, v in self._brokered if owns(r, self.host, self.port))

    def _out_of_time(self) -> bool:
        if time.monotonic() > self._deadline:
            self.exhausted = True
        return self.exhausted

    def text(self, text: str, where: str, *, header: bool = False) -> Finding | None:
        """Scan one piece of text (a request line, a header value, a decoded body)."""
        for rule, real in self._brokered:
            if real in text and not owns(rule, self.host, self.port):
                return Finding(Reason.SECRET_DETECTED, f"brokered secret {rule.id}", where)
        for window in _windows(text, _WINDOW):
            if self._out_of_time():
                return None
            for detector in detectors():
                if detector.keyword:
                    if header or not _has_keyword(window):
                        continue
                    values: Iterable[str] = (
                        value
                        for line in window.splitlines()
                        if _has_keyword(line)
                        for piece in _windows(line, _LINE)
                        for value in detector.plugin.analyze_string(piece)
                        if _strong(value)
                    )
                else:
                    values = detector.plugin.analyze_string(window)
                for value in values:
                    if not self._allowed(detector, value):
                        return Finding(Reason.SECRET_DETECTED, detector.name, where)
        return None

    def headers(self, headers: Iterable[tuple[str, str]]) -> Finding | None:
        for name, value in headers:
            found = self.text(value, f"header {name.lower()}", header=True)
            if found is not None:
                return found
        return None

    def body(
        self, raw: bytes, content_encoding: str | None, content_type: str | None
    ) -> Finding | None:
        """Scan the body's first `max_bytes` (decoded from gzip/deflate first)."""
        data = decode_body(raw, content_encoding, self.max_bytes)
        found = self.text(data.decode("utf-8", "replace"), "body")
        # Form bodies are scanned decoded too (on bytes: unquoting 1 MiB of text costs ~0.25 s).
        if found is None and _is_form(content_type) and b"%" in data and not self._out_of_time():
            decoded = urllib.parse.unquote_to_bytes(data.replace(b"+", b" "))
            found = self.text(decoded.decode("utf-8", "replace"), "body")
        return found


def _is_form(content_type: str | None) -> bool:
    return (content_type or "").lower().startswith("application/x-www-form-urlencoded")


def _strong(value: str) -> bool:
    value = value.strip("'\"")
    return len(value) >= _KEYWORD_MIN_LENGTH and entropy(value) >= _KEYWORD_MIN_ENTROPY


def _windows(text: str, size: int) -> Iterator[str]:
    if len(text) <= size:
        yield text
        return
    for start in range(0, len(text), size - _OVERLAP):
        yield text[start : start + size]


def decode_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body's first `limit` bytes, decoded from the content codings gzip, deflate (zlib
    or raw), br and identity; a coding it cannot decode gives the raw bytes (scanned as they are).
    Decompression is bounded: a small bomb never inflates past `limit`."""
    data = raw
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    for coding in reversed(codings):
        if coding in ("identity", ""):
            continue
        if coding in ("gzip", "x-gzip"):
            data = _inflate(data, 16 + zlib.MAX_WBITS, limit)
        elif coding == "deflate":
            try:
                data = _inflate(data, zlib.MAX_WBITS, limit, strict=True)
            except zlib.error:
                data = _inflate(data, -zlib.MAX_WBITS, limit)
        elif coding == "br":
            data = _unbrotli(data, limit)
        else:
            break  # zstd and others: scanned as sent
    return data[:limit]


def _unbrotli(data: bytes, limit: int) -> bytes:
    try:
        return bytes(brotli.Decompressor().process(data, output_buffer_limit=limit))
    except brotli.error:
        return data


def _inflate(data: bytes, wbits: int, limit: int, *, strict: bool = False) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        return inflater.decompress(data, limit)
    except zlib.error:
        if strict:
            raise
        return data
