"""Telemetry: decision and lifecycle events, fanned out to structlog (and later OpenTelemetry)."""

from proxy.telemetry.events import DecisionEvent, PolicyEvent
from proxy.telemetry.hub import Telemetry

__all__ = ["DecisionEvent", "PolicyEvent", "Telemetry"]
