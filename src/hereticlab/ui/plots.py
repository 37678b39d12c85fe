"""Matplotlib pictures of residual geometry: one layer's scatter, grids of layers, before/after comparisons,
animations across layers, and geometry-table columns against layer. Every function returns a ``Figure``
(animations return a ``FuncAnimation``; its figure is ``anim._fig``) and never calls ``plt.show()``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..measure.geometry import BAD, GOOD, Projection, interpolate_frames, weiszfeld_median

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn
    import pandas as pd
    from matplotlib.animation import Animation, FuncAnimation
    from matplotlib.axes import Axes
    from matplotlib.collections import PathCollection
    from matplotlib.figure import Figure

# ((x_min, x_max), (y_min, y_max)) of a scatter
Limits = tuple[tuple[float, float], tuple[float, float]]


@dataclass
class ScatterStyle:
    """How a scatter of both classes looks. ``labels``/``colors``: (good, bad)."""

    labels: tuple[str, str] = ("harmless", "harmful")
    colors: tuple[str, str] = ("tab:blue", "tab:red")
    size: float = 14.0
    alpha: float = 0.7
    marker: str = "o"
    show_medians: bool = True
    show_means: bool = False
    legend: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # passed to ax.scatter

    def but(self, **changes: Any) -> ScatterStyle:
        return replace(self, **changes)


DEFAULT_STYLE = ScatterStyle()


def new_figure(
    figsize: tuple[float, float] = (5, 4.5), nrows: int = 1, ncols: int = 1, **subplots_kwargs: Any
) -> tuple[Figure, Any]:
    """A ``Figure`` already closed in pyplot (shown once when returned from a notebook cell, nothing left open) and
    its axes (``squeeze`` as in ``plt.subplots``). Made through pyplot so that the notebook backend (and its PNG
    display hook for figures) is activated."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize)
    plt.close(fig)
    return fig, fig.subplots(nrows, ncols, **subplots_kwargs)


def _legend_handles(style: ScatterStyle):
    from matplotlib.lines import Line2D

    return [Line2D([], [], ls="", marker="o", color=style.colors[c], label=style.labels[c]) for c in (GOOD, BAD)]


def _figure(ax=None, figsize=(5, 4.5)):
    if ax is not None:
        return ax.figure, ax
    return new_figure(figsize)


def _limits(coords: np.ndarray, pad: float = 0.08) -> Limits:
    flat = coords.reshape(-1, 2)
    lo, hi = flat.min(0), flat.max(0)
    span = np.maximum(hi - lo, 1e-9)
    lo, hi = lo - pad * span, hi + pad * span
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


def draw_points(
    ax: Axes,
    xy: np.ndarray,
    labels: np.ndarray,
    style: ScatterStyle = DEFAULT_STYLE,
    highlight: Sequence[int] = (),
) -> list[PathCollection]:
    """Draw both classes' points ``xy [n, 2]`` (and their 2-D centres) on ``ax``; returns the two scatter artists."""
    artists = []
    for cls in (GOOD, BAD):
        pts = xy[labels == cls]
        artists.append(
            ax.scatter(
                pts[:, 0],
                pts[:, 1],
                s=style.size,
                alpha=style.alpha,
                marker=style.marker,
                c=style.colors[cls],
                label=f"{style.labels[cls]} ({len(pts)})",
                linewidths=0,
                **style.extra,
            )
        )
        if len(pts) and style.show_means:
            m = pts.mean(0)
            ax.scatter([m[0]], [m[1]], marker="X", s=140, c=style.colors[cls], edgecolors="k", linewidths=1.2, zorder=5)
        if len(pts) and style.show_medians:
            m = weiszfeld_median(pts)
            ax.scatter([m[0]], [m[1]], marker="*", s=260, c=style.colors[cls], edgecolors="k", linewidths=1.2, zorder=5)
    highlight = list(highlight)
    if highlight:
        ax.scatter(
            xy[highlight, 0],
            xy[highlight, 1],
            s=style.size * 6,
            facecolors="none",
            edgecolors="k",
            linewidths=1.5,
            zorder=6,
        )
    return artists


def plot_layer(
    proj: Projection,
    layer: int,
    *,
    ax: Axes | None = None,
    style: ScatterStyle = DEFAULT_STYLE,
    title: str | None = None,
    highlight: Sequence[int] = (),
    limits: Limits | None = None,
    figsize: tuple[float, float] = (5, 4.5),
) -> Figure:
    """Scatter of both classes at one layer of a ``Projection`` (★ = 2-D geometric medians, X = means)."""
    fig, ax = _figure(ax, figsize)
    draw_points(ax, proj.at(layer), proj.labels, style, highlight)
    xlim, ylim = limits or _limits(proj.at(layer))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_title(f"layer {layer}" if title is None else title)
    ax.set_xticks([])
    ax.set_yticks([])
    if style.legend:
        ax.legend(loc="upper right", fontsize="small", markerscale=1.5, framealpha=0.7)
    return fig


def plot_layers(
    proj: Projection,
    layers: Sequence[int] | None = None,
    *,
    ncols: int = 5,
    style: ScatterStyle = DEFAULT_STYLE,
    panel_size: float = 2.6,
    suptitle: str | None = None,
) -> Figure:
    """A grid of per-layer scatters (default: every layer) with a single legend."""
    layers = list(proj.layers if layers is None else layers)
    ncols = max(1, min(ncols, len(layers)))
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = new_figure((panel_size * ncols, panel_size * nrows), nrows, ncols, squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        plot_layer(proj, layer, ax=ax, style=style.but(legend=False, size=style.size * 0.6))
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.legend(handles=_legend_handles(style), loc="upper right", ncol=2, fontsize="small")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def plot_before_after(
    before: Projection,
    after: Projection,
    layers: Sequence[int] | None = None,
    *,
    titles: tuple[str, str] = ("original", "edited"),
    style: ScatterStyle = DEFAULT_STYLE,
    panel_size: float = 2.6,
    tables: tuple[pd.DataFrame, pd.DataFrame] | None = None,
) -> Figure:
    """Two rows of scatters, original on top and edited below, for the same ``layers`` (default: up to 6 evenly
    spaced). ``tables``: optional ``(df_before, df_after)`` geometry tables; their silhouette goes in the titles."""
    if layers is None:
        idx = np.unique(np.linspace(0, len(before.layers) - 1, min(6, len(before.layers))).round().astype(int))
        layers = [before.layers[i] for i in idx]
    layers = list(layers)
    fig, axes = new_figure((panel_size * len(layers), panel_size * 2 + 0.4), 2, len(layers), squeeze=False)
    for row, (proj, name) in enumerate(zip((before, after), titles)):
        for col, layer in enumerate(layers):
            title = f"{name} · layer {layer}"
            if tables is not None and "silhouette" in tables[row].columns and layer in tables[row].index:
                title += f"\nsil {tables[row].loc[layer, 'silhouette']:.2f}"
            plot_layer(
                proj, layer, ax=axes[row, col], style=style.but(legend=False, size=style.size * 0.6), title=title
            )
            axes[row, col].title.set_fontsize("small")
    fig.legend(handles=_legend_handles(style), loc="upper right", ncol=2, fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def plot_geometry(
    df: pd.DataFrame | dict[str, pd.DataFrame],
    columns: Sequence[str] | str = ("silhouette", "S(g,b)", "quality", "probe_acc"),
    *,
    ax: Axes | None = None,
    mark: float | None = None,
    figsize: tuple[float, float] = (7, 3.5),
    title: str | None = None,
    **plot_kwargs: Any,
) -> Figure:
    """Line plots of geometry-table columns against layer (one line per column; ``mark``: a vertical line, e.g.
    the ablated direction's layer). Accepts a ``geometry_table`` DataFrame or a dict name → DataFrame (one line
    style per table, e.g. original vs edited)."""
    fig, ax = _figure(ax, figsize)
    columns = [columns] if isinstance(columns, str) else list(columns)
    tables = df if isinstance(df, dict) else {"": df}
    styles = ["-", "--", ":", "-."]
    for t, (name, table) in enumerate(tables.items()):
        for i, col in enumerate(columns):
            if col not in table.columns:
                raise KeyError(f"column {col!r} is not in the table; choose from {list(table.columns)}")
            label = f"{col} ({name})" if name else col
            ax.plot(
                table.index, table[col], styles[t % len(styles)], color=f"C{i}", marker=".", label=label, **plot_kwargs
            )
    if mark is not None:
        ax.axvline(mark, color="k", lw=0.8, ls=":")
    ax.set_xlabel("layer (residual index)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def animate_layers(
    proj: Projection,
    *,
    steps: int = 6,
    interval: int = 80,
    hold: int = 3,
    style: ScatterStyle = DEFAULT_STYLE,
    figsize: tuple[float, float] = (5, 4.5),
    title: str = "layer {layer:.1f}",
) -> FuncAnimation:
    """An animation across layers with ``steps`` interpolated frames per transition and ``hold`` extra frames on
    each real layer. Axis limits are fixed over all layers. Returns ``matplotlib.animation.FuncAnimation``;
    save it with ``save_animation`` (GIF/MP4) or show it with ``anim.to_jshtml()``."""
    from matplotlib.animation import FuncAnimation

    frames, position = interpolate_frames(proj.coords, steps)
    order = []
    for f, p in enumerate(position):
        order.extend([f] * (1 + (hold if float(p).is_integer() else 0)))
    fig, ax = new_figure(figsize)
    xlim, ylim = _limits(proj.coords)
    good, bad = proj.labels == GOOD, proj.labels == BAD
    scatters = [
        ax.scatter(
            frames[0][m, 0],
            frames[0][m, 1],
            s=style.size,
            alpha=style.alpha,
            c=style.colors[c],
            label=style.labels[c],
            linewidths=0,
        )
        for c, m in ((GOOD, good), (BAD, bad))
    ]
    centres = [
        ax.scatter([0], [0], marker="*", s=260, c=style.colors[c], edgecolors="k", zorder=5, visible=style.show_medians)
        for c in (GOOD, BAD)
    ]
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xticks([])
    ax.set_yticks([])
    if style.legend:
        ax.legend(loc="upper right", fontsize="small")
    text = ax.set_title("")

    def layer_label(p: float) -> float:
        lo = int(np.floor(p))
        hi = min(lo + 1, len(proj.layers) - 1)
        return proj.layers[lo] + (p - lo) * (proj.layers[hi] - proj.layers[lo])

    def update(k):
        f = order[k]
        xy = frames[f]
        for s, m in zip(scatters, (good, bad)):
            s.set_offsets(xy[m])
        for s, m in zip(centres, (good, bad)):
            if m.any():
                s.set_offsets(weiszfeld_median(xy[m], iters=30)[None])
        text.set_text(title.format(layer=layer_label(position[f])))
        return [*scatters, *centres, text]

    update(0)
    return FuncAnimation(fig, update, frames=len(order), interval=interval, blit=False)


def ffmpeg_available() -> bool:
    from matplotlib import animation

    return animation.writers.is_available("ffmpeg")


def save_animation(anim: Animation, path: str | Path, *, fps: int = 12, dpi: int = 80) -> Path | None:
    """Write ``anim`` to ``path``: ``.gif`` with Pillow, ``.mp4`` with ffmpeg. Without ffmpeg an MP4 request is
    skipped with a warning and ``None`` is returned."""
    from matplotlib.animation import FFMpegWriter, PillowWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        anim.save(str(path), writer=PillowWriter(fps=fps), dpi=dpi)
        return path
    if path.suffix.lower() in (".mp4", ".m4v", ".mov"):
        if not ffmpeg_available():
            warnings.warn(
                f"ffmpeg is not installed, so {path.name} was not written; save a .gif instead "
                "(or install ffmpeg, e.g. `apt-get install ffmpeg` / `conda install ffmpeg`).",
                stacklevel=2,
            )
            return None
        anim.save(str(path), writer=FFMpegWriter(fps=fps), dpi=dpi)
        return path
    raise ValueError(f"unsupported animation format {path.suffix!r}; use .gif or .mp4")


def figure_png(fig: Figure, dpi: int = 90, close: bool = True) -> bytes:
    """PNG bytes of a figure (closing it by default)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)  # a no-op for figures made by ``new_figure``
    return buf.getvalue()
