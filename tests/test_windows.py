"""Ring buffer windows against a naive reference, and the sampler's quality/gap policy on a real table."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import AssetConfig
from gateway.latest import BAD_COMMUNICATION_ERROR, GOOD, LatestValues
from gateway.windows import (
    MARK_BAD_QUALITY,
    MARK_HELD,
    MARK_NOT_FINITE,
    N_MARKS,
    AssetSampler,
    RingBuffer,
)

TICK_NS = 100_000_000  # 10 Hz


def _asset(length: int, hop: int, n_tags: int, max_gap_s: float = 1.0, **tag_extra: float) -> AssetConfig:
    return AssetConfig.model_validate(
        {
            "name": "P-101",
            "source": "plc1",
            "sample_rate_hz": 10.0,
            "window": {"length": length, "hop": hop},
            "max_gap_s": max_gap_s,
            "tags": [{"name": f"t{k}", "node_id": f"ns=2;s=t{k}", **tag_extra} for k in range(n_tags)],
        }
    )


def _write(
    latest: LatestValues,
    idx: np.ndarray,
    values: list[float],
    status: list[int] | None = None,
    source_ts: list[int] | None = None,
    recv_ns: int = 0,
) -> None:
    n = len(idx)
    latest.write(
        idx,
        np.asarray(values, dtype=np.float64),
        np.asarray(status if status is not None else [GOOD] * n, dtype=np.uint32),
        np.asarray(source_ts if source_ts is not None else [0] * n, dtype=np.int64),
        recv_ns,
    )


@settings(max_examples=150, deadline=None)
@given(
    length=st.integers(1, 12),
    channels=st.integers(1, 4),
    appends=st.integers(0, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_ring_window_matches_naive_reference(length: int, channels: int, appends: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ring = RingBuffer(length, channels)
    rows: list[np.ndarray] = []
    marks: list[np.ndarray] = []
    for _ in range(appends):
        row = rng.normal(size=channels)
        # Half the rows are all-ok rows appended without marks, the common case in service.
        mark = rng.integers(0, N_MARKS, size=channels).astype(np.uint8) * rng.integers(0, 2)
        ring.append(row, mark if mark.any() else None)
        rows.append(row)
        marks.append(mark)
        window = ring.window()
        np.testing.assert_array_equal(window, np.array(rows[-length:]))
        np.testing.assert_array_equal(ring.window_marks(), np.array(marks[-length:]))
        expected_counts = np.bincount(np.concatenate(marks[-length:]), minlength=N_MARKS)
        np.testing.assert_array_equal(ring.mark_counts, expected_counts)
        assert window.flags.c_contiguous
        assert ring.shares_memory(window)
    assert ring.count == appends
    assert ring.full == (appends >= length)


@settings(max_examples=100, deadline=None)
@given(
    length=st.integers(2, 10),
    hop_frac=st.floats(0.0, 1.0),
    channels=st.integers(1, 4),
    ticks=st.integers(0, 80),
    phase=st.integers(0, 30),
)
def test_sampler_emits_exactly_every_hop_once_full(
    length: int, hop_frac: float, channels: int, ticks: int, phase: int
) -> None:
    hop = max(1, round(hop_frac * length))
    latest = LatestValues(channels + 1)
    tag_index = np.arange(channels)[::-1] + 1  # reversed and offset: the sampler must follow tag_index
    sampler = AssetSampler(_asset(length, hop, channels), tag_index, latest, phase=phase)
    rows: list[list[float]] = []
    emitted_at: list[int] = []
    for t in range(ticks):
        row = [t * 10.0 + k for k in range(channels)]
        _write(latest, tag_index, row)
        rows.append(row)
        window = sampler.sample(t * TICK_NS)
        if window is not None:
            emitted_at.append(t + 1)
            np.testing.assert_array_equal(window.data, np.array(rows[-length:]))
            assert window.sample_index == t + 1
    assert emitted_at == list(range(length + phase % hop, ticks + 1, hop))
    assert sampler.windows_emitted == len(emitted_at)
    assert sampler.samples == ticks
    assert sampler.skips == {"bad_quality": 0, "not_finite": 0}


def test_window_data_is_a_copy_that_the_ring_does_not_overwrite() -> None:
    latest = LatestValues(1)
    idx = np.array([0])
    sampler = AssetSampler(_asset(2, 1, 1), idx, latest)
    windows = []
    for t in range(4):
        _write(latest, idx, [float(t)])
        windows.append(sampler.sample(t * TICK_NS))
    assert windows[0] is None
    assert [w.data[:, 0].tolist() for w in windows[1:] if w] == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]
    assert not sampler.ring.shares_memory(windows[1].data)


def test_hold_within_max_gap_then_invalid_then_recovery() -> None:
    latest = LatestValues(3)
    idx = np.array([2, 0])  # asset tag t0 is table row 2, t1 is row 0
    sampler = AssetSampler(_asset(4, 1, 2, max_gap_s=0.25), idx, latest)

    def tick(t: int, v1: float, status1: int = GOOD) -> object:
        _write(latest, idx, [float(t), v1], [GOOD, status1])
        return sampler.sample(t * TICK_NS)

    out = [tick(t, 100.0 + t) for t in range(4)]
    assert out[:3] == [None, None, None]  # warm-up is not a skip
    assert sampler.skips == {"bad_quality": 0, "not_finite": 0}
    assert out[3] is not None and out[3].held_samples == 0

    # t1 goes Bad: its last good value (103 at t=3) stands in while it is at most 0.25 s old.
    w4 = tick(4, -1.0, BAD_COMMUNICATION_ERROR)
    w5 = tick(5, -1.0, BAD_COMMUNICATION_ERROR)
    assert w4 is not None and w5 is not None
    assert w4.data[-1].tolist() == [4.0, 103.0]
    assert w5.data[-2:, 1].tolist() == [103.0, 103.0]
    assert (w4.held_samples, w5.held_samples) == (1, 2)
    assert sampler.ring.window_marks()[-1].tolist() == [0, MARK_HELD]

    # 0.3 s after the last good value the sample is invalid: skipped, with the reason.
    assert tick(6, -1.0, BAD_COMMUNICATION_ERROR) is None
    assert sampler.skips == {"bad_quality": 1, "not_finite": 0}
    assert sampler.ring.window_marks()[-1].tolist() == [0, MARK_BAD_QUALITY]
    assert np.isnan(sampler.ring.window()[-1, 1])

    # t1 is good again, but windows resume only once the invalid sample (t=6) has left the window.
    resumed = [tick(t, 100.0 + t) for t in range(7, 11)]
    assert resumed[:3] == [None, None, None]
    assert sampler.skips == {"bad_quality": 4, "not_finite": 0}
    last = resumed[3]
    assert last is not None
    assert last.data.tolist() == [[7.0, 107.0], [8.0, 108.0], [9.0, 109.0], [10.0, 110.0]]
    assert last.held_samples == 0
    assert sampler.windows_emitted == 4  # t = 3, 4, 5 and 10


def test_not_finite_and_precedence_of_bad_quality() -> None:
    latest = LatestValues(2)
    idx = np.array([0, 1])
    sampler = AssetSampler(_asset(2, 1, 2, max_gap_s=0.0), idx, latest)
    _write(latest, idx, [1.0, 2.0])
    sampler.sample(0)
    _write(latest, idx, [np.inf, 2.0])  # Good status, infinite value
    assert sampler.sample(TICK_NS) is None
    assert sampler.skips == {"bad_quality": 0, "not_finite": 1}
    assert sampler.ring.window_marks()[-1].tolist() == [MARK_NOT_FINITE, 0]
    _write(latest, idx, [1.0, np.nan], [GOOD, BAD_COMMUNICATION_ERROR])
    assert sampler.sample(2 * TICK_NS) is None  # window holds both reasons: bad_quality wins
    assert sampler.skips == {"bad_quality": 1, "not_finite": 1}


def test_tag_never_good_is_invalid_after_warm_up() -> None:
    latest = LatestValues(2)  # starts as BadWaitingForInitialData, NaN
    idx = np.array([0, 1])
    sampler = AssetSampler(_asset(3, 1, 2), idx, latest)
    _write(latest, np.array([0]), [5.0])
    assert [sampler.sample(t * TICK_NS) for t in range(3)] == [None, None, None]
    assert sampler.skips == {"bad_quality": 1, "not_finite": 0}


def test_emitted_windows_never_contain_nan_under_random_faults() -> None:
    rng = np.random.default_rng(7)
    latest = LatestValues(3)
    idx = np.array([0, 1, 2])
    sampler = AssetSampler(_asset(5, 2, 3, max_gap_s=0.2), idx, latest)
    emitted = 0
    for t in range(2000):
        values = rng.normal(size=3)
        values[rng.random(3) < 0.05] = np.nan
        status = np.where(rng.random(3) < 0.05, BAD_COMMUNICATION_ERROR, GOOD)
        _write(latest, idx, values.tolist(), status.tolist())
        window = sampler.sample(t * TICK_NS)
        if window is not None:
            emitted += 1
            assert np.isfinite(window.data).all()
    assert emitted == sampler.windows_emitted
    assert emitted > 0 and sampler.skips["bad_quality"] > 0 and sampler.skips["not_finite"] > 0
    due = (2000 - 5) // 2 + 1
    assert emitted + sum(sampler.skips.values()) == due


def test_end_timestamps_and_scaling() -> None:
    latest = LatestValues(3)
    idx = np.array([0, 1])  # table row 2 belongs to another asset
    sampler = AssetSampler(_asset(2, 1, 2, scale=0.5, offset=-1.0), idx, latest)
    _write(latest, idx, [10.0, 20.0], source_ts=[1_000, 2_000], recv_ns=50)
    sampler.sample(0)
    latest.write(np.array([0]), np.array([30.0]), np.array([GOOD], dtype=np.uint32), np.array([5_000]), 70)
    latest.write(np.array([2]), np.array([0.0]), np.array([GOOD], dtype=np.uint32), np.array([9_999]), 99)
    window = sampler.sample(TICK_NS)
    assert window is not None
    assert window.asset == "P-101"
    assert window.data.tolist() == [[4.0, 9.0], [14.0, 9.0]]
    assert (window.end_source_ts_ns, window.end_recv_ns) == (5_000, 70)
    assert window.sample_index == 2
