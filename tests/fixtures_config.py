"""A small valid GatewayConfig for tests that need rules and assets but no running PLC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.config import GatewayConfig


def pumps_config(
    names: Sequence[str] = ("P-101", "P-102"), *, source: dict[str, Any] | None = None, **sections: Any
) -> GatewayConfig:
    """One PLC `plc1` (its extra settings in `source`), one-tag pumps `names`, and the given top-level sections."""
    return GatewayConfig.model_validate(
        {
            "sources": [{"name": "plc1", "endpoint": "opc.tcp://127.0.0.1:4840", **(source or {})}],
            "assets": [
                {
                    "name": name,
                    "source": "plc1",
                    "window": {"length": 4, "hop": 1},
                    "tags": [{"name": "a", "node_id": f"ns=2;s={name}.a"}],
                }
                for name in names
            ],
            **sections,
        }
    )
