"""edge-gateway: PLC data to machine-health alarms at the edge."""

from __future__ import annotations

__version__ = "0.1.0"
