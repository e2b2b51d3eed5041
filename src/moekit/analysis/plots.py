"""Figures shared by the experiments: routing heat-maps, training curves, x-y lines.

Every function returns a matplotlib ``Figure``; experiments save it with ``RunContext.savefig``.
matplotlib is an optional extra (``pip install moekit[experiments]``); it is imported lazily with
the headless Agg backend so runs work without a display.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'moekit[experiments]'") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=float)


def _finish(fig: Any, ax: Any, title: str, xlabel: str, ylabel: str, logx: bool = False, logy: bool = False) -> Any:
    """Axis labels, log scales, grid and legend shared by the line plots."""
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _xticklabels(ax: Any, labels: list[str]) -> bool:
    """Column tick labels that never run together: horizontal when they fit side by side (measured on
    the finished layout), else vertical. Returns whether they were turned."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
    if any(a.x1 + 2 > b.x0 for a, b in zip(boxes, boxes[1:])):
        ax.set_xticks(range(len(labels)), labels=labels, rotation=90)
        return True
    return False


def routing_heatmap(table: Any, row_labels: Sequence[str], col_labels: Sequence[str], title: str = "",
                    normalize: str | None = "col", annotate: bool = True) -> Any:
    """Heat-map of a routing table (rows: experts, columns: labels).

    ``normalize``: ``"col"`` — each column sums to 1 (where does label k go?), ``"row"`` — each row
    sums to 1 (what does expert e see?), ``None`` — raw values.
    """
    if normalize not in ("col", "row", None):
        raise ValueError(f"normalize: expected 'col', 'row' or None, got {normalize!r}")
    t = _np(table)
    if t.ndim != 2 or t.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"table: expected shape ({len(row_labels)}, {len(col_labels)}), got {t.shape}")
    if normalize == "col":
        t = t / np.maximum(t.sum(0, keepdims=True), 1e-12)
    elif normalize == "row":
        t = t / np.maximum(t.sum(1, keepdims=True), 1e-12)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(col_labels), 1.0 + 0.45 * len(row_labels)))
    integer = normalize is None and bool(np.all(np.mod(t, 1) == 0))
    vmin, vmax = (0.0, 1.0) if normalize else (float(np.nanmin(t)), float(np.nanmax(t)))
    im = ax.imshow(t, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels))
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    if annotate and t.size <= 400:
        for i in range(t.shape[0]):
            for j in range(t.shape[1]):
                bright = (t[i, j] - vmin) > 0.6 * (vmax - vmin)
                ax.text(j, i, f"{t[i, j]:.0f}" if integer else f"{t[i, j]:.2f}", ha="center", va="center",
                        fontsize=7, color="black" if bright else "white")
    label = {"col": "share of the column", "row": "share of the row", None: "count" if integer else "value"}[normalize]
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)
    fig.tight_layout()
    if _xticklabels(ax, list(col_labels)):
        fig.tight_layout()
    return fig


def curves(series: Mapping[str, Any], title: str = "", xlabel: str = "step", ylabel: str = "",
           logy: bool = False, x: Any | None = None, stops: Mapping[str, Sequence[int]] | None = None) -> Any:
    """Training curves. Each value is ``(J,)`` or ``(runs, J)`` over J recorded steps (several runs/seeds:
    mean line, min–max band).

    NaN entries (a run that stopped early) are ignored in the mean and band. ``stops[name]`` gives the
    step at which each run of that series stopped early (-1 = it did not): each stop is marked with an
    ``x`` at that run's last loss, so a curve that goes on is visibly the mean of the remaining runs.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, values in series.items():
        v = _np(values)
        if v.ndim == 1:
            v = v[None]
        if v.ndim != 2:
            raise ValueError(f"series[{name!r}]: expected 1-D or 2-D values, got shape {v.shape}")
        xs = np.arange(v.shape[1]) if x is None else _np(x)
        with np.errstate(all="ignore"):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, lo, hi = np.nanmean(v, 0), np.nanmin(v, 0), np.nanmax(v, 0)
        (line,) = ax.plot(xs, mean, label=name if v.shape[0] == 1 else f"{name} (mean of {v.shape[0]})")
        if v.shape[0] > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        if stops and name in stops:
            pts = [(xs[s], v[r, s]) for r, s in enumerate(stops[name]) if 0 <= s < v.shape[1]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "x", color=line.get_color(), markersize=7,
                        label=f"{name}: early stop ({len(pts)} of {v.shape[0]})")
    return _finish(fig, ax, title, xlabel, ylabel, logy=logy)


def lines(x: Sequence[float], series: Mapping[str, Any], title: str = "", xlabel: str = "", ylabel: str = "",
          yerr: Mapping[str, Any] | None = None, logx: bool = False, markers: bool = True) -> Any:
    """y-vs-x lines with markers (e.g. accuracy vs capacity ratio, accuracy vs FLOPs), optional error bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    xs = _np(x)
    for name, ys in series.items():
        y = _np(ys)
        if y.shape != xs.shape:
            raise ValueError(f"series[{name!r}]: expected shape {xs.shape}, got {y.shape}")
        err = None if yerr is None or name not in yerr else _np(yerr[name])
        ax.errorbar(xs, y, yerr=err, marker="o" if markers else None, capsize=3, label=name)
    return _finish(fig, ax, title, xlabel, ylabel, logx=logx)


def scatter_xy(points: Mapping[str, tuple[Any, Any]], title: str = "", xlabel: str = "", ylabel: str = "",
               annotate: Mapping[str, Sequence[str]] | None = None, logx: bool = False,
               yerr: Mapping[str, Any] | None = None, xerr: Mapping[str, Any] | None = None) -> Any:
    """Scatter/frontier plot: ``{series: (xs, ys)}``, joined by a line in x order, optional point labels
    and error bars (``yerr``/``xerr``: per series, one value per point, e.g. the std over seeds)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name, (xs, ys) in points.items():
        xa, ya = _np(xs), _np(ys)
        order = np.argsort(xa)
        ye = None if yerr is None or name not in yerr else _np(yerr[name])[order]
        xe = None if xerr is None or name not in xerr else _np(xerr[name])[order]
        ax.errorbar(xa[order], ya[order], yerr=ye, xerr=xe, marker="o", capsize=3, label=name)
        if annotate and name in annotate:
            for xi, yi, s in zip(xa, ya, annotate[name]):
                ax.annotate(s, (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
    return _finish(fig, ax, title, xlabel, ylabel, logx=logx)
