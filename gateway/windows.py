"""Fixed-rate sampling of each asset's tags into ring buffers, and the sliding windows cut from them.

The ring stores every row twice (at `i` and `i + L`), so the latest L rows are always one contiguous
slice: appending is O(1) and a window needs no copy until it is handed to inference. Each sample
carries a mark (ok, held, or why it is invalid) in a parallel ring, and running counts of the marks
inside the current window say in O(1) whether a window may be used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from gateway.config import AssetConfig
from gateway.latest import LatestValues, is_good
from gateway.normalize import EngineeringScaling

logger = logging.getLogger(__name__)

# Sample marks, stored per channel sample. A window with an invalid mark is skipped, never fed.
MARK_OK = 0
MARK_HELD = 1  # the tag was bad but its last good value was recent enough to stand in
MARK_NOT_FINITE = 2  # status Good but the value NaN/inf (invalid)
MARK_BAD_QUALITY = 3  # status not Good (invalid)
N_MARKS = 4
SKIP_BAD_QUALITY = "bad_quality"
SKIP_NOT_FINITE = "not_finite"

_NEVER = np.iinfo(np.int64).min


class RingBuffer:
    """The latest `length` rows of `channels` values, with a per-sample mark and mark counts."""

    def __init__(self, length: int, channels: int, dtype: np.dtype | type = np.float64) -> None:
        if length < 1 or channels < 1:
            raise ValueError(f"length and channels must be >= 1, got {length} and {channels}")
        self.length = length
        self.channels = channels
        self._buf = np.zeros((2 * length, channels), dtype=dtype)
        self._marks = np.zeros((2 * length, channels), dtype=np.uint8)
        # Rows whose marks are not all ok; lets the common all-ok case skip counting marks.
        self._marked = np.zeros(length, dtype=bool)
        # mark_counts[m]: samples marked m among the rows in window(); kept by add-entering/subtract-leaving.
        self.mark_counts = np.zeros(N_MARKS, dtype=np.int64)
        self._next = 0  # slot of the next append in [0, length); also where the oldest row is once full
        self.count = 0

    @property
    def full(self) -> bool:
        """True once `length` rows have been appended."""
        return self.count >= self.length

    def append(self, row: np.ndarray, marks: np.ndarray | None = None) -> None:
        """Store one row (and its per-channel marks; None means all ok), evicting the oldest once full."""
        i = self._next
        if self.count >= self.length:
            if self._marked[i]:
                self.mark_counts -= np.bincount(self._marks[i], minlength=N_MARKS)
            else:
                self.mark_counts[MARK_OK] -= self.channels
        self._buf[i] = row
        self._buf[i + self.length] = row
        if marks is None:
            if self._marked[i]:
                self._marks[i] = MARK_OK
                self._marks[i + self.length] = MARK_OK
                self._marked[i] = False
            self.mark_counts[MARK_OK] += self.channels
        else:
            self._marks[i] = marks
            self._marks[i + self.length] = marks
            self._marked[i] = True
            self.mark_counts += np.bincount(marks, minlength=N_MARKS)
        self._next = i + 1 if i + 1 < self.length else 0
        self.count += 1

    def _span(self) -> slice:
        n = min(self.count, self.length)
        end = self._next + self.length
        return slice(end - n, end)

    def window(self) -> np.ndarray:
        """View of the latest min(count, length) rows, oldest first; valid until the next append."""
        return self._buf[self._span()]

    def window_marks(self) -> np.ndarray:
        """View of the marks of the rows in window(), aligned with it."""
        return self._marks[self._span()]

    def newest(self) -> tuple[np.ndarray, np.ndarray | None]:
        """View of the last appended row and of its marks (None when all ok); valid until the next append."""
        i = self._next - 1 if self._next else self.length - 1
        return self._buf[i], (self._marks[i] if self._marked[i] else None)

    def shares_memory(self, arr: np.ndarray) -> bool:
        """Whether `arr` is a view into this ring's storage (for callers that must copy)."""
        return bool(np.shares_memory(arr, self._buf))


@dataclass(frozen=True)
class Window:
    """One complete, valid window of one asset, copied out of the ring for inference."""

    asset: str
    data: np.ndarray  # [L, C] float64 engineering units, asset channel order, oldest row first
    end_source_ts_ns: int  # newest PLC source timestamp among the tags of the newest row
    end_recv_ns: int  # newest gateway arrival time (monotonic ns) among the tags of the newest row
    sample_index: int  # how many samples of this asset had been taken at the newest row
    held_samples: int  # channel samples in the window that stand in with a held last-good value


class AssetSampler:
    """Takes one row of an asset's tags per tick from the latest-value table and cuts windows.

    `sample(now_ns)` is called at the asset's fixed sample rate; it returns a Window every `hop`
    samples once the ring is full (the first one `phase % hop` samples later), unless that window contains an invalid sample, in which case it
    is skipped and counted in `skips` by reason (bad_quality wins over not_finite).
    """

    def __init__(self, asset: AssetConfig, tag_index: np.ndarray, latest: LatestValues, *, phase: int = 0) -> None:
        self.asset = asset.name
        self.tag_index = np.ascontiguousarray(tag_index, dtype=np.intp)
        n = len(asset.channels)
        if self.tag_index.shape != (n,):
            raise ValueError(f"asset {asset.name}: tag_index needs {n} entries, got {self.tag_index.shape}")
        self.latest = latest
        self.hop = asset.window.hop
        self.max_gap_ns = int(round(asset.max_gap_s * 1e9))
        self.scaling = EngineeringScaling.from_tags(asset.tags)
        self.ring = RingBuffer(asset.window.length, n)
        self._last_good = np.full(n, np.nan, dtype=np.float64)
        self._last_good_ns = np.full(n, _NEVER, dtype=np.int64)
        # Samples left until the next window is due. `phase` delays the first window by up to hop-1
        # samples, so assets sampled together do not all fall due on the same tick (smooth load).
        self._until_due = asset.window.length + phase % self.hop
        self.samples = 0
        self.windows_emitted = 0
        self.skips: dict[str, int] = {SKIP_BAD_QUALITY: 0, SKIP_NOT_FINITE: 0}

    def sample(self, now_ns: int) -> Window | None:
        """Take this tick's row; return the Window that falls due now, or None."""
        idx = self.tag_index
        values = self.scaling.apply(self.latest.value[idx])
        status_good = is_good(self.latest.status[idx])
        good = status_good & np.isfinite(values)
        if np.count_nonzero(good) == len(good):
            self._last_good = values
            self._last_good_ns.fill(now_ns)
            self.ring.append(values)
        else:
            self._append_with_gaps(values, status_good, good, now_ns)
        self.samples += 1
        self._until_due -= 1
        if self._until_due > 0:
            return None
        self._until_due = self.hop
        counts = self.ring.mark_counts
        if counts[MARK_BAD_QUALITY]:
            self.skips[SKIP_BAD_QUALITY] += 1
            return None
        if counts[MARK_NOT_FINITE]:
            self.skips[SKIP_NOT_FINITE] += 1
            return None
        self.windows_emitted += 1
        return Window(
            asset=self.asset,
            data=self.ring.window().copy(),
            end_source_ts_ns=int(self.latest.source_ts[idx].max()),
            end_recv_ns=int(self.latest.recv_ns[idx].max()),
            sample_index=self.samples,
            held_samples=int(counts[MARK_HELD]),
        )

    def newest_values(self) -> list[float | None]:
        """The newest sample's engineering values; None where it was not a good, finite reading (held too)."""
        row, marks = self.ring.newest()
        values: list[float | None] = row.tolist()
        if marks is None:
            return values
        return [v if m == MARK_OK else None for v, m in zip(values, marks.tolist(), strict=True)]

    def _append_with_gaps(
        self, values: np.ndarray, status_good: np.ndarray, good: np.ndarray, now_ns: int
    ) -> None:
        """Append a row with bad samples: hold recent last-good values, mark the rest invalid (NaN)."""
        np.copyto(self._last_good, values, where=good)
        self._last_good_ns[good] = now_ns
        # A good value was just stamped now_ns, so `usable` covers good and held samples alike.
        usable = self._last_good_ns >= now_ns - self.max_gap_ns
        row = np.where(usable, self._last_good, np.nan)
        marks = np.where(
            usable,
            np.where(good, MARK_OK, MARK_HELD),
            np.where(status_good, MARK_NOT_FINITE, MARK_BAD_QUALITY),
        ).astype(np.uint8)
        self.ring.append(row, marks)
