"""The latest-value table: one row per tag, written by sources in whole batches, read by samplers."""

from __future__ import annotations

import numpy as np

# OPC-UA status codes the gateway sets itself (OPC 10000-6 / asyncua.ua.StatusCodes).
GOOD = 0x00000000
BAD_WAITING_FOR_INITIAL_DATA = 0x80320000
BAD_COMMUNICATION_ERROR = 0x80050000
BAD_TYPE_MISMATCH = 0x80740000
BAD_NOT_CONNECTED = 0x808A0000

# The top two bits of a StatusCode are its severity: 00 Good, 01 Uncertain, 10/11 Bad.
SEVERITY_MASK = 0xC0000000


def is_good(status: np.ndarray) -> np.ndarray:
    """Vectorised: True where the status severity is Good (Uncertain counts as not good)."""
    return (status & SEVERITY_MASK) == 0


def tag_rows(first: np.ndarray, width: np.ndarray) -> np.ndarray:
    """The table rows of tags whose values fill `width` consecutive rows from `first`, tag after tag."""
    # An array tag (width > 1) fills one row per element; a scalar tag one row.
    ends = np.cumsum(width)
    return np.repeat(first - (ends - width), width) + np.arange(int(ends[-1]) if len(ends) else 0)


class LatestValues:
    """Arrays indexed by tag number; a source writes a read response with one vectorised assignment.

    Values are float64 (booleans become 0.0/1.0); status is the raw OPC-UA StatusCode; source_ts is
    the PLC's source timestamp in ns since the Unix epoch (0 when the server sent none); recv_ns is
    the gateway's monotonic clock when the value arrived, used for latency figures.
    """

    def __init__(self, n_tags: int) -> None:
        self.value = np.full(n_tags, np.nan, dtype=np.float64)
        self.status = np.full(n_tags, BAD_WAITING_FOR_INITIAL_DATA, dtype=np.uint32)
        self.source_ts = np.zeros(n_tags, dtype=np.int64)
        self.recv_ns = np.zeros(n_tags, dtype=np.int64)
        self.writes = 0

    def __len__(self) -> int:
        return len(self.value)

    def write(
        self,
        idx: np.ndarray,
        value: np.ndarray,
        status: np.ndarray,
        source_ts: np.ndarray,
        recv_ns: int,
    ) -> None:
        """Store one batch: `idx` are tag numbers, the other arrays are aligned with it."""
        self.value[idx] = value
        self.status[idx] = status
        self.source_ts[idx] = source_ts
        self.recv_ns[idx] = recv_ns
        self.writes += 1

    def mark_bad(self, idx: np.ndarray, status: int, recv_ns: int) -> None:
        """Flag tags as Bad (e.g. the source is down); the last value stays for the record only."""
        self.status[idx] = status
        self.recv_ns[idx] = recv_ns
        self.writes += 1
