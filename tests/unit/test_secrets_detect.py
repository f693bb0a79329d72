"""Credential scanning: real credential shapes are found (also gzip/deflate-encoded), a
false-positive corpus passes, owners may receive their own credentials, and the scan is bounded."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import time
import uuid
import zlib

import brotli
import pytest

from proxy.hosts import Host, canonicalize_host
from proxy.policy.model import SecretRule
from proxy.secrets.detect import Scan, decode_body, entropy
from proxy.verdicts import Reason

PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
AWS = "AKIAZ7QK3VXB2MPLW4NH"
GITHUB = "ghp_" + "Zq3Xv7Wm4Tn6Rb1Yc5Hd0Js3G8f3Kq9zLp2X"


def host(name: str) -> Host:
    return canonicalize_host(name)


def paste() -> Scan:
    return Scan(host("paste.test"), 443)


@pytest.mark.parametrize(
    ("body", "detector"),
    [
        (PRIVATE_KEY, "Private Key"),
        (json.dumps({"key": PRIVATE_KEY}), "Private Key"),
        (f"aws_access_key_id={AWS}\n", "AWS Access Key"),
        (f"token: {GITHUB}", "GitHub Token"),
        ('{"api_key": "8f3Kq9zLp2Xv7Wm4Tn6Rb1Yc5Hd0Js3G"}', "Secret Keyword"),
        ("deploy https://admin:hunter2secret@db.internal.test/x", "Basic Auth Credentials"),
    ],
)
def test_credentials_in_bodies_are_detected(body: str, detector: str) -> None:
    found = paste().body(body.encode(), None, "application/json")
    assert found is not None and found.reason is Reason.SECRET_DETECTED
    assert found.subject == detector and found.where == "body"


def test_encoded_bodies_are_decoded_before_scanning() -> None:
    raw = PRIVATE_KEY.encode()
    for encoding, data in (
        ("gzip", gzip.compress(raw)),
        ("deflate", zlib.compress(raw)),
        ("deflate", zlib.compress(raw)[2:-4]),  # raw deflate, as some clients send it
        ("br", brotli.compress(raw)),
        ("gzip, br", brotli.compress(gzip.compress(raw))),
    ):
        found = paste().body(data, encoding, None)
        assert found is not None and found.subject == "Private Key", encoding
    form = "key=" + PRIVATE_KEY.replace("\n", "%0A").replace(" ", "+")
    assert paste().body(form.encode(), None, "application/x-www-form-urlencoded") is not None


def test_decompression_is_bounded() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))
    assert len(decode_body(bomb, "gzip", 1 << 20)) == 1 << 20
    assert len(decode_body(brotli.compress(b"\0" * (64 << 20)), "br", 1 << 20)) <= 2 << 20


def test_url_and_headers_are_scanned_but_keyword_only_outside_headers() -> None:
    assert paste().text(f"/upload?t={GITHUB}", "url") is not None
    found = paste().headers([("X-Leak", AWS)])
    assert found is not None and found.where == "header x-leak"
    assert paste().headers([("X-Api-Key", "8f3Kq9zLp2Xv7Wm4Tn6Rb1Yc5Hd0Js3G")]) is None


def test_vendor_credentials_may_go_to_their_vendor() -> None:
    assert Scan(host("api.github.com"), 443).headers([("Authorization", f"token {GITHUB}")]) is None
    assert Scan(host("s3.amazonaws.com"), 443).text(AWS, "body") is None
    assert Scan(host("github.com.paste.test"), 443).text(GITHUB, "body") is not None


def test_brokered_value_is_detected_off_its_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_DETECT_VALUE", "plain-looking-value-42")
    rule = SecretRule("svc", ("svc.test",), "p.yaml:1", env="TEST_DETECT_VALUE", header="X")
    found = Scan(host("paste.test"), 443, [rule]).text("v=plain-looking-value-42", "body")
    assert found is not None and found.subject == "brokered secret svc"
    assert "plain-looking" not in repr(found)
    assert Scan(host("svc.test"), 443, [rule]).text("plain-looking-value-42", "body") is None


def _lock_file() -> str:
    packages = {
        f"node_modules/p{i}": {
            "version": f"1.{i}.0",
            "resolved": f"https://registry.example/p{i}/-/p{i}-1.{i}.0.tgz",
            "integrity": "sha512-" + base64.b64encode(os.urandom(64)).decode(),
        }
        for i in range(200)
    }
    return json.dumps({"lockfileVersion": 3, "packages": packages}, indent=2)


FALSE_POSITIVES = {
    "package lock": _lock_file(),
    "poetry lock": "\n".join(
        f'{{file = "p{i}-1.0.tar.gz", hash = "sha256:{hashlib.sha256(os.urandom(8)).hexdigest()}"}}'
        for i in range(200)
    ),
    "minified js": (
        "!function(e,t){var n=e.token||t.secretName,r=function(o){return o.apiKeyField}};"
        "var a=document.getElementById('password');a.type='password';"
    )
    * 500,
    "base64 image": '{"avatar": "data:image/png;base64,'
    + base64.b64encode(os.urandom(20000)).decode()
    + '"}',
    "uuids": "\n".join(str(uuid.uuid4()) for _ in range(500)),
    "hashes in urls": "\n".join(
        f"https://cdn.example/objects/{hashlib.sha1(os.urandom(4)).hexdigest()}/"
        f"{hashlib.sha256(os.urandom(4)).hexdigest()}.tar.gz"
        for _ in range(300)
    ),
    "weak password assignment": 'password = "changeme"\nsecret: "example"\n',
    "git pack negotiation": "0032want " + hashlib.sha1(b"x").hexdigest() + "\n00000009done\n",
}


@pytest.mark.parametrize("name", sorted(FALSE_POSITIVES))
def test_false_positive_corpus_passes(name: str) -> None:
    assert paste().body(FALSE_POSITIVES[name].encode(), None, "application/json") is None


def test_scan_is_bounded_in_time_and_bytes() -> None:
    body = (b"x" * 100 + b"\n") * 40_000 + PRIVATE_KEY.encode()  # the key past 4 MB
    scan = Scan(host("paste.test"), 443, max_seconds=0.05)
    start = time.perf_counter()
    assert scan.body(body, None, None) is None  # past the byte bound: not seen
    assert time.perf_counter() - start < 0.5


def test_entropy() -> None:
    assert entropy("aaaa") == 0.0
    assert entropy("8f3Kq9zLp2Xv7Wm4Tn6Rb1Yc5Hd0Js3G") > 4
