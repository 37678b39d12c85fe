"""An ipywidgets explorer for aligned layer projections (``geometry.project_layers``).

Works in JupyterLab and classic Notebook with plain ipywidgets 8: the scatter is rendered to a PNG in an
``Image`` widget; a ``Select`` lists every prompt, choosing one rings it in the plot and lists its nearest
neighbours (another ``Select``, click to walk). With the ipympl backend (``%matplotlib widget``) the figure is
a live canvas instead and clicking a point selects it, hovering shows its prompt. All state changes go through
methods (``set_layer``, ``select_point``, ``select_nearest``) so tests can drive the widget headlessly.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..measure.geometry import Projection, style_geometry_table
from .plots import DEFAULT_STYLE, ScatterStyle, _limits, draw_points, figure_png, new_figure

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def _ipympl_active() -> bool:
    import matplotlib

    backend = matplotlib.get_backend().lower()
    return "ipympl" in backend or backend == "widget"


class GeometryExplorer:
    """Layer slider (+ Play), prompt picker, nearest-prompt list, means/medians toggles, original/edited toggle
    and the current layer's geometry-table row.

    ``proj``: the original model's ``Projection`` (``prompts`` from it or the ``prompts`` argument: good prompts,
    then bad ones). ``table``: its ``geometry_table``. ``edited`` / ``edited_table``: the same for residuals of
    an edited model (same prompts, same layers). ``fixed_limits``: the same axes for every layer (steadier when
    playing). ``interactive``: use an ipympl canvas (default: when the ipympl backend is active).
    """

    def __init__(
        self,
        proj: Projection,
        table: pd.DataFrame | None = None,
        *,
        edited: Projection | None = None,
        edited_table: pd.DataFrame | None = None,
        prompts: Sequence[str] | None = None,
        style: ScatterStyle = DEFAULT_STYLE,
        k_nearest: int = 6,
        layer: int | None = None,
        fixed_limits: bool = True,
        figsize: tuple[float, float] = (5.2, 4.4),
        dpi: int = 80,
        interactive: bool | None = None,
        play_interval: int = 600,
    ) -> None:
        import ipywidgets as w

        if edited is not None and (
            edited.coords.shape != proj.coords.shape or list(edited.layers) != list(proj.layers)
        ):
            raise ValueError("the edited projection must have the same layers and points as the original")
        self.projections: dict[str, Projection | None] = {"original": proj, "edited": edited}
        self.tables: dict[str, pd.DataFrame | None] = {"original": table, "edited": edited_table}
        n = len(proj.labels)
        prompts = list(prompts) if prompts is not None else (proj.prompts or [f"point {i}" for i in range(n)])
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} points (give good prompts, then bad ones)")
        self.prompts = prompts
        self.style = style
        self.k_nearest = k_nearest
        self.figsize, self.dpi = figsize, dpi
        self.fixed_limits = fixed_limits
        self.selected: int | None = None
        self.render_count = 0
        self.figure: Figure | None = None
        self.interactive = _ipympl_active() if interactive is None else interactive

        layers = list(proj.layers)
        start = layers.index(layer) if layer is not None else len(layers) // 2
        self.slider = w.IntSlider(
            value=start,
            min=0,
            max=len(layers) - 1,
            description="layer index",
            continuous_update=False,
            layout=w.Layout(width="360px"),
        )
        self.play = w.Play(value=start, min=0, max=len(layers) - 1, interval=play_interval, description="play")
        self._link = w.link((self.play, "value"), (self.slider, "value"))  # kernel-side link: also works headlessly
        self.show_medians = w.Checkbox(
            value=style.show_medians, description="medians ★", indent=False, layout=w.Layout(width="110px")
        )
        self.show_means = w.Checkbox(
            value=style.show_means, description="means ✖", indent=False, layout=w.Layout(width="100px")
        )
        self.source = w.ToggleButtons(
            options=["original", "edited"],
            value="original",
            disabled=edited is None,
            tooltips=["unedited model", "edited model" if edited is not None else "no edited residuals given"],
        )
        label = lambda i: f"[{style.labels[proj.labels[i]]}] {i}: {self.prompts[i][:70]}"  # noqa: E731
        self.picker = w.Select(
            options=[("(none)", -1)] + [(label(i), i) for i in range(n)],
            value=-1,
            rows=8,
            description="prompt",
            layout=w.Layout(width="98%"),
        )
        self.neighbours = w.Select(
            options=[], rows=min(k_nearest, 8), description="nearest", layout=w.Layout(width="98%")
        )
        self.info = w.HTML()
        self.hover = w.HTML()
        self.row = w.HTML()
        self.image = w.Image(format="png", layout=w.Layout(width=f"{int(figsize[0] * dpi)}px"))
        self._limits_cache: dict[str, tuple] = {}

        self.slider.observe(lambda change: self.render(), names="value")
        for box in (self.show_medians, self.show_means, self.source):
            box.observe(lambda change: self.render(), names="value")
        self.picker.observe(self._on_pick, names="value")
        self.neighbours.observe(self._on_neighbour, names="value")

        canvas = self.image
        if self.interactive:
            canvas = self._make_canvas()
        controls = w.HBox([self.play, self.slider, self.show_medians, self.show_means, self.source])
        right = w.VBox([self.picker, self.neighbours, self.info, self.hover], layout=w.Layout(width="50%"))
        self.ui = w.VBox([controls, w.HBox([canvas, right]), self.row])
        # stable CSS hooks for browser tests and custom styling
        for widget, name in (
            (self.ui, "hl-geometry-explorer"),
            (self.slider, "hl-layer-slider"),
            (self.play, "hl-layer-play"),
            (self.image, "hl-geometry-plot"),
            (self.picker, "hl-prompt-picker"),
            (self.neighbours, "hl-nearest"),
        ):
            widget.add_class(name)
        self.render()

    # -- state -------------------------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        return list(self._projection_of("original").layers)

    @property
    def layer(self) -> int:
        """The layer label currently shown."""
        return self.layers[self.slider.value]

    @property
    def projection(self) -> Projection:
        return self._projection_of(self.source.value)

    def _projection_of(self, source: str) -> Projection:
        """The ``"original"`` or ``"edited"`` projection (``ValueError`` for an edited one that was not given)."""
        proj = self.projections[source]
        if proj is None:
            raise ValueError(f"no {source} projection was given to the explorer (pass edited=...)")
        return proj

    @property
    def table(self) -> pd.DataFrame | None:
        return self.tables[self.source.value]

    def set_layer(self, layer: int) -> None:
        """Show layer label ``layer`` (moves the slider, which re-renders)."""
        self.slider.value = self.layers.index(layer)

    def select_point(self, index: int | None) -> None:
        """Ring point ``index`` (None/−1: clear), show its prompt and list its nearest neighbours."""
        self.picker.value = -1 if index is None else int(index)

    def select_nearest(self, x: float, y: float) -> int:
        """Select the point nearest to ``(x, y)`` in the current layer's picture (what a click does)."""
        index = int(self.projection.nearest(self.layer, x, y, 1)[0])
        self.select_point(index)
        return index

    def nearest_prompts(self, index: int, k: int | None = None) -> list[tuple[int, float]]:
        """``(point, 2-D distance)`` of the ``k`` nearest other points at the current layer."""
        k = self.k_nearest if k is None else k
        xy = self.projection.at(self.layer)
        x, y = xy[index]
        order = self.projection.nearest(self.layer, x, y, k=k + 1)
        d = np.linalg.norm(xy - xy[index], axis=1)
        return [(int(j), float(d[j])) for j in order if j != index][:k]

    # -- callbacks ---------------------------------------------------------------------------------------

    def _on_pick(self, change) -> None:
        value = change["new"]
        self.selected = None if value is None or value < 0 else int(value)
        self.render()

    def _on_neighbour(self, change) -> None:
        if change["new"] is not None and change["new"] >= 0:
            self.picker.value = change["new"]

    def _label(self, i: int) -> str:
        return self.style.labels[int(self.projection.labels[i])]

    def _update_info(self) -> None:
        if self.selected is None:
            self.info.value = "<i>choose a prompt (or click a point with <code>%matplotlib widget</code>)</i>"
            with self.neighbours.hold_trait_notifications():
                self.neighbours.options = []
            return
        i = self.selected
        colour = self.style.colors[int(self.projection.labels[i])]
        self.info.value = (
            f"<b style='color:{colour}'>{html.escape(self._label(i))} #{i}</b> at layer {self.layer}:"
            f"<div style='white-space:pre-wrap;max-height:8em;overflow:auto'>{html.escape(self.prompts[i])}</div>"
        )
        near = self.nearest_prompts(i)
        options = [(f"[{self._label(j)}] d={dist:.2f} {j}: {self.prompts[j][:60]}", j) for j, dist in near]
        self.neighbours.unobserve(self._on_neighbour, names="value")
        try:
            self.neighbours.options = options
            self.neighbours.value = None
        finally:
            self.neighbours.observe(self._on_neighbour, names="value")

    def _update_row(self) -> None:
        table = self.table
        if table is None or self.layer not in table.index:
            self.row.value = "" if table is None else f"<i>layer {self.layer} is not in the table</i>"
            return
        others = [v for v in table.index if v != self.layer]
        styled = style_geometry_table(table).hide(others, axis="index")  # colours relative to all layers
        self.row.value = f"<div style='overflow-x:auto'>{styled.to_html()}</div>"

    def _limits(self):
        key = self.source.value
        if key not in self._limits_cache:
            self._limits_cache[key] = _limits(self.projection.coords)
        return self._limits_cache[key]

    def _draw(self, fig, ax) -> None:
        proj, layer = self.projection, self.layer
        style = self.style.but(show_medians=self.show_medians.value, show_means=self.show_means.value)
        highlight = [] if self.selected is None else [self.selected]
        draw_points(ax, proj.at(layer), proj.labels, style, highlight)
        if self.selected is not None:
            near = [j for j, _ in self.nearest_prompts(self.selected)]
            xy = proj.at(layer)[near]
            ax.scatter(
                xy[:, 0], xy[:, 1], s=style.size * 3, facecolors="none", edgecolors="0.4", linewidths=1, zorder=6
            )
        xlim, ylim = self._limits() if self.fixed_limits else _limits(proj.at(layer))
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_xticks([])
        ax.set_yticks([])
        sil = ""
        if self.table is not None and "silhouette" in self.table.columns and layer in self.table.index:
            sil = f" · silhouette {self.table.loc[layer, 'silhouette']:.2f}"
        ax.set_title(f"{self.source.value} · layer {layer}{sil}", fontsize="medium")
        if style.legend:
            ax.legend(loc="upper right", fontsize="small", framealpha=0.7)

    def render(self) -> None:
        """Redraw the picture, the prompt panel and the table row for the current state."""
        if self.interactive and self.figure is not None:
            self.figure.clf()
            ax = self.figure.add_subplot()
            self._draw(self.figure, ax)
            self.figure.canvas.draw_idle()
        else:
            fig, ax = new_figure(self.figsize)
            self._draw(fig, ax)
            self.figure = fig
            self.image.value = figure_png(fig, dpi=self.dpi)
        self._update_info()
        self._update_row()
        self.render_count += 1

    # -- ipympl ------------------------------------------------------------------------------------------

    def _make_canvas(self):
        import matplotlib.pyplot as plt

        with plt.ioff():
            fig = plt.figure(figsize=self.figsize)
        self.figure = fig
        fig.canvas.header_visible = False

        def on_click(event):
            if event.inaxes is not None and event.xdata is not None:
                self.select_nearest(event.xdata, event.ydata)

        def on_move(event):
            if event.inaxes is None or event.xdata is None:
                return
            j = int(self.projection.nearest(self.layer, event.xdata, event.ydata, 1)[0])
            self.hover.value = (
                f"<small>hover: [{html.escape(self._label(j))}] {html.escape(self.prompts[j][:120])}</small>"
            )

        fig.canvas.mpl_connect("button_press_event", on_click)
        fig.canvas.mpl_connect("motion_notify_event", on_move)
        return fig.canvas

    # -- display -----------------------------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs):
        """The widget, plus the current picture as a static PNG fallback (saved notebooks, GitHub, nbviewer)."""
        import base64

        bundle = self.ui._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        if data is not None and not self.interactive and self.image.value:
            data.setdefault("image/png", base64.b64encode(self.image.value).decode())
        return bundle


def explore(proj: Projection, table: pd.DataFrame | None = None, **kwargs: Any) -> GeometryExplorer:
    """Build a ``GeometryExplorer`` (display it as the last expression of a cell)."""
    return GeometryExplorer(proj, table, **kwargs)
