"""Brokered credentials and credential scanning, as pure functions over what the edge saw.

`broker`: per-agent placeholders (`ewph_...`), swapping them for the real value on the secret's
owner hosts, and spotting them anywhere else. `detect`: a bounded scan of request lines,
headers and bodies with the `detect-secrets` plugins. Both return `Finding`s; the gate turns a
finding into a decision (`Gate.admit_secrets`). A finding names a secret's id or a detector,
never a value.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.verdicts import Reason


@dataclass(frozen=True, slots=True)
class Finding:
    """Something a request carried that may not leave for this host."""

    reason: Reason  # SECRET_MISUSE or SECRET_DETECTED
    subject: str  # the secret's id (misuse) or the detector's name (detected)
    where: str  # "header authorization", "url", "body"...
    source: str | None = None  # the `secrets:` entry's file:line, when one is known
