"""`edge-gateway plot`: one asset's tags, model scores with their alarm thresholds, and alarm periods,
drawn into a PNG for tuning thresholds by eye.

matplotlib is imported only inside `render_plot`, so the daemon never loads it.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.alarms import ANNUNCIATED
from gateway.config import GatewayConfig
from gateway.errors import EXIT_USAGE
from gateway.history import HistoryError, format_ns, has_table

logger = logging.getLogger(__name__)

# Beyond this many channels one panel each is unreadable at 900 px; --tags picks others.
MAX_TAG_PANELS = 12
# A step this many times the usual one is a gap (gateway down, asset not sampled): the line breaks there.
_GAP_FACTOR = 5.0
_PERIOD_COLOURS = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")

# Which levels: (model, output, rule name). Maps from it give (high, low), None where one is not known.
ThresholdKey = tuple[str, str, str]


@dataclass(frozen=True)
class Series:
    """One line: a channel's engineering values or a model output's scores over time."""

    name: str
    ts_ns: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class Threshold:
    """An alarm rule's levels on one model output: raise at `high`, clear past `low`."""

    rule: str
    high: float
    low: float


@dataclass(frozen=True)
class Period:
    """A span during which `rule`'s alarm was annunciated (active, acknowledged or not)."""

    rule: str
    start_ns: int
    end_ns: int


@dataclass
class PlotData:
    """Everything one plot shows, read from the database."""

    asset: str
    since_ns: int
    until_ns: int
    tags: list[Series] = field(default_factory=list)
    scores: list[Series] = field(default_factory=list)
    thresholds: dict[str, list[Threshold]] = field(default_factory=dict)  # by score series name
    periods: list[Period] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: int = 0

    @property
    def empty(self) -> bool:
        """True when the range holds nothing to draw."""
        return not (self.samples or self.scores or self.periods)

    def summary(self) -> str:
        """What was drawn, in one line."""
        return (
            f"{len(self.tags)} tag(s) from {self.samples} sample(s), {len(self.scores)} score series, "
            f"{len(self.periods)} alarm period(s)"
        )


def config_thresholds(cfg: GatewayConfig, asset: str) -> dict[ThresholdKey, tuple[float | None, float | None]]:
    """Thresholds written explicitly in the config's alarm rules for `asset` (a lone high is also the low)."""
    models = {m.name: m for m in cfg.models}
    out: dict[ThresholdKey, tuple[float | None, float | None]] = {}
    for r in cfg.alarms:
        covered = r.assets if r.assets is not None else models[r.model].assets
        if asset not in covered or (r.high is None and r.low is None):
            continue
        out[(r.model, r.output, r.name)] = (r.high, r.low if r.low is not None else r.high)
    return out


def _samples(conn: sqlite3.Connection, data: PlotData, tags: Sequence[str] | None) -> None:
    """The asset's channels from the samples table; null (Bad or NaN) values become gaps."""
    if not has_table(conn, "samples"):
        data.notes.append("this database has no samples table (recorded before history): no tags drawn")
        return
    rows = conn.execute(
        "SELECT ts_ns, values_json FROM samples WHERE asset = ? AND ts_ns BETWEEN ? AND ? ORDER BY ts_ns",
        [data.asset, data.since_ns, data.until_ns],
    ).fetchall()
    data.samples = len(rows)
    if not rows:
        return
    ts = np.array([r[0] for r in rows], dtype=np.int64)
    columns: dict[str, np.ndarray] = {}
    for i, (_, text) in enumerate(rows):
        for name, v in json.loads(text).items():
            # A channel first seen later (config changed) is a gap before it appeared.
            col = columns.setdefault(name, np.full(len(rows), np.nan))
            col[i] = np.nan if v is None else v
    names = list(columns)
    if tags:
        unknown = [t for t in tags if t not in columns]
        if unknown:
            raise HistoryError(
                f"--tags: no channel {', '.join(unknown)} in {data.asset}'s samples; channels: {', '.join(names)}",
                EXIT_USAGE,
            )
        names = list(tags)
    elif len(names) > MAX_TAG_PANELS:
        data.notes.append(
            f"{len(names)} channels; drawing the first {MAX_TAG_PANELS} (choose others with --tags): "
            f"left out {', '.join(names[MAX_TAG_PANELS:])}"
        )
        names = names[:MAX_TAG_PANELS]
    data.tags = [Series(n, ts, columns[n]) for n in names]


def _scores(conn: sqlite3.Connection, data: PlotData) -> set[tuple[str, str]]:
    """One series per model output; returns the (model, output) pairs found."""
    rows = conn.execute(
        "SELECT model, output, ts_ns, value FROM scores WHERE asset = ? AND ts_ns BETWEEN ? AND ? "
        "ORDER BY model, output, ts_ns",
        [data.asset, data.since_ns, data.until_ns],
    ).fetchall()
    by_key: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for model, output, ts, value in rows:
        by_key.setdefault((model, output), []).append((ts, math.nan if value is None else value))
    for (model, output), points in by_key.items():
        arr = np.array(points, dtype=np.float64)
        data.scores.append(Series(f"{model} {output}", arr[:, 0].astype(np.int64), arr[:, 1]))
    return set(by_key)


def _events(
    conn: sqlite3.Connection,
    data: PlotData,
    shown: set[tuple[str, str]],
    configured: Mapping[ThresholdKey, tuple[float | None, float | None]],
) -> None:
    """Alarm periods (annunciated spans, per rule) and thresholds: a raise's is the high, a clear's the low."""
    rows = conn.execute(
        "SELECT rule, model, output, event, state, threshold, decided_at_ns FROM alarm_events "
        "WHERE asset = ? AND decided_at_ns <= ? ORDER BY decided_at_ns, seq",
        [data.asset, data.until_ns],
    ).fetchall()
    levels: dict[ThresholdKey, list[float | None]] = {}
    opened: dict[str, int] = {}
    for rule, model, output, event, state, threshold, at in rows:
        key = (model, output, rule)
        if event in ("raised", "cleared") and threshold is not None:
            levels.setdefault(key, [None, None])[0 if event == "raised" else 1] = threshold
        if state in ANNUNCIATED:
            opened.setdefault(rule, at)
        elif rule in opened:
            _add_period(data, rule, opened.pop(rule), at)
    for rule, start in opened.items():
        _add_period(data, rule, start, data.until_ns)
    for key, (high, low) in configured.items():
        # The config is what the engineer tunes: its explicit levels win over those recorded.
        was = levels.setdefault(key, [None, None])
        levels[key] = [high if high is not None else was[0], low if low is not None else was[1]]
    for (model, output, rule), (high, low) in sorted(levels.items()):
        if (model, output) not in shown or (high is None and low is None):
            continue
        high = high if high is not None else low
        low = low if low is not None else high
        assert high is not None and low is not None
        data.thresholds.setdefault(f"{model} {output}", []).append(Threshold(rule, high, low))


def _add_period(data: PlotData, rule: str, start_ns: int, end_ns: int) -> None:
    if end_ns >= data.since_ns:
        data.periods.append(Period(rule, max(start_ns, data.since_ns), min(end_ns, data.until_ns)))


def load_plot_data(
    conn: sqlite3.Connection,
    asset: str,
    since_ns: int,
    until_ns: int,
    *,
    tags: Sequence[str] | None = None,
    configured: Mapping[ThresholdKey, tuple[float | None, float | None]] | None = None,
) -> PlotData:
    """Read the asset's samples, scores, thresholds and alarm periods within [since, until]."""
    data = PlotData(asset, since_ns, until_ns)
    _samples(conn, data, tags)
    shown = _scores(conn, data)
    _events(conn, data, shown, configured or {})
    return data


def _with_gaps(ts_ns: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The series with a NaN inserted wherever a step is far longer than usual, so no line bridges it."""
    if len(ts_ns) < 3:
        return ts_ns, values
    steps = np.diff(ts_ns)
    usual = float(np.median(steps))
    gaps = np.flatnonzero(steps > _GAP_FACTOR * usual) + 1 if usual > 0 else np.array([], dtype=np.int64)
    return np.insert(ts_ns, gaps, ts_ns[gaps - 1] + 1), np.insert(values, gaps, np.nan)


def render_plot(data: PlotData, out: Path, *, width: int = 1600, height: int = 900, dpi: int = 100) -> None:
    """Draw `data` into a PNG of exactly width x height pixels: a panel per tag, then the scores panel."""
    try:
        from dateutil import tz
        from matplotlib import dates as mdates
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise HistoryError("plot needs matplotlib: pip install 'edge-gateway[plot]'") from None

    def days(ts_ns: np.ndarray | int) -> np.ndarray:
        # matplotlib reads naive datetime64 as UTC; the axis formatter shows local time.
        return mdates.date2num(np.asarray(ts_ns, dtype=np.int64).astype("datetime64[ns]"))

    # figsize in inches at this dpi gives the exact pixel size, as long as nothing trims the canvas.
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    n = len(data.tags)
    axes = fig.subplots(
        n + 1, 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": [1] * n + [max(2.0, n / 2)]}
    )[:, 0]
    fig.subplots_adjust(
        # Room on the right for the legend, outside the plot where it cannot hide a score.
        left=min(0.3, 130 / width), right=1 - min(0.3, 190 / width),
        top=1 - min(0.2, 40 / height), bottom=min(0.3, 45 / height), hspace=0.12,
    )  # fmt: skip
    for ax, s in zip(axes[:n], data.tags, strict=True):
        t, v = _with_gaps(s.ts_ns, s.values)
        ax.plot(days(t), v, lw=0.8, color="tab:blue")
        ax.set_ylabel(s.name, rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.locator_params(axis="y", nbins=3)
    score_ax = axes[-1]
    for i, s in enumerate(data.scores):
        colour = f"C{i % 10}"
        t, v = _with_gaps(s.ts_ns, s.values)
        score_ax.plot(days(t), v, lw=1.0, color=colour, label=s.name)
        for th in data.thresholds.get(s.name, []):
            score_ax.axhline(th.high, color=colour, ls="--", lw=1.0, label=f"{th.rule} high {th.high:g}")
            if th.low != th.high:
                score_ax.axhline(th.low, color=colour, ls=":", lw=1.0, label=f"{th.rule} low {th.low:g}")
    if not data.scores:
        score_ax.text(0.5, 0.5, "no scores in this range", transform=score_ax.transAxes, ha="center", va="center")
    score_ax.set_ylabel("score", rotation=0, ha="right", va="center", fontsize=8)
    score_ax.tick_params(labelsize=7)
    rules = list(dict.fromkeys(p.rule for p in data.periods))
    colours = {r: _PERIOD_COLOURS[i % len(_PERIOD_COLOURS)] for i, r in enumerate(rules)}
    for p in data.periods:
        for ax in axes:
            ax.axvspan(days(p.start_ns), days(p.end_ns), color=colours[p.rule], alpha=0.18, lw=0)
    handles, labels = score_ax.get_legend_handles_labels()
    handles += [Patch(color=colours[r], alpha=0.3) for r in rules]
    labels += [f"alarm {r}" for r in rules]
    if handles:
        score_ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7)
    local = tz.tzlocal()
    locator = mdates.AutoDateLocator(tz=local)
    score_ax.xaxis.set_major_locator(locator)
    score_ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=local))
    score_ax.set_xlim(days(data.since_ns), days(data.until_ns))
    axes[0].set_title(
        f"{data.asset}: {format_ns(data.since_ns)} to {format_ns(data.until_ns)}", fontsize=10, loc="left"
    )
    try:
        fig.savefig(out, format="png", dpi=dpi)
    except OSError as exc:
        raise HistoryError(f"cannot write {out}: {exc}") from None
    logger.debug("plot: %s written (%s)", out, data.summary())
