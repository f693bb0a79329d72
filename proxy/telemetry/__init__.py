"""Telemetry: decision and lifecycle events, fanned out to structlog (and later OpenTelemetry)."""

from proxy.telemetry.events import (
    ApprovalEvent,
    ConnectionCloseEvent,
    DecisionEvent,
    NotificationEvent,
    PolicyEvent,
)
from proxy.telemetry.hub import Event, Sink, Telemetry

__all__ = [
    "ApprovalEvent",
    "ConnectionCloseEvent",
    "DecisionEvent",
    "Event",
    "NotificationEvent",
    "PolicyEvent",
    "Sink",
    "Telemetry",
]
