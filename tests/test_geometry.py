"""Residual geometry tables, aligned projections, plots and the explorer widget on synthetic clusters."""

import math

import numpy as np
import pytest
import torch

from hereticlab.measure import geometry as geo
from hereticlab.ui import plots


def clusters(n=30, layers=4, d=16, sep=(0.0, 2.0, 5.0, 10.0), seed=0):
    """Good ~ N(0, I), bad ~ N(sep·e0, I) per layer → ([n, layers, d], [n, layers, d])."""
    rng = np.random.default_rng(seed)
    good = rng.normal(size=(n, layers, d))
    bad = rng.normal(size=(n, layers, d))
    bad[:, :, 0] += np.asarray(sep)[None, :]
    return good, bad


# ---------------------------------------------------------------------------------------------------------
# Weiszfeld
# ---------------------------------------------------------------------------------------------------------


def test_weiszfeld_matches_1d_median_and_symmetric_centre():
    pts = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    assert geo.weiszfeld_median(pts, iters=500)[0] == pytest.approx(2.0, abs=1e-3)
    square = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) + np.array([3.0, -2.0])
    np.testing.assert_allclose(geo.weiszfeld_median(square), [3.0, -2.0], atol=1e-12)


def test_weiszfeld_resists_outliers_where_the_mean_does_not():
    rng = np.random.default_rng(1)
    pts = rng.normal(scale=0.1, size=(50, 8))
    pts[:5] += 1000.0  # 10 % gross outliers
    median = geo.weiszfeld_median(pts)
    assert np.linalg.norm(median) < 0.2
    assert np.linalg.norm(pts.mean(0)) > 100


def test_weiszfeld_is_batched_over_layers_and_accepts_torch():
    rng = np.random.default_rng(2)
    pts = rng.standard_t(df=2, size=(40, 3, 5))
    batched = geo.weiszfeld_median(torch.tensor(pts, dtype=torch.float32))
    assert batched.shape == (3, 5)
    for layer in range(3):
        np.testing.assert_allclose(batched[layer], geo.weiszfeld_median(pts[:, layer].astype(np.float32)), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# geometry_table
# ---------------------------------------------------------------------------------------------------------


def test_geometry_table_hand_computed_case():
    # Layer 0: good at (1, 0), bad at (0, 1) (4 copies each). Layer 1: everything doubled.
    good = np.tile(np.array([[[1.0, 0.0], [2.0, 0.0]]]), (4, 1, 1))
    bad = np.tile(np.array([[[0.0, 1.0], [0.0, 2.0]]]), (4, 1, 1))
    df = geo.geometry_table(bad=torch.tensor(bad), good=torch.tensor(good))
    assert list(df.columns) == geo.TABLE_COLUMNS
    assert list(df.index) == [0, 1] and df.index.name == "layer"
    s = 1 / math.sqrt(2)
    row = df.loc[0]
    expected = {
        "S(g,b)": 0.0,
        "S(g*,b*)": 0.0,
        "S(g,r)": -s,
        "S(g*,r*)": -s,
        "S(b,r)": s,
        "S(b*,r*)": s,
        "|g|": 1.0,
        "|g*|": 1.0,
        "|b|": 1.0,
        "|b*|": 1.0,
        "|r|": math.sqrt(2),
        "|r*|": math.sqrt(2),
        "silhouette": 1.0,
        "snr": math.sqrt(2),
        "purity": s,
        "quality": 1.0,
        "probe_acc": 1.0,
    }
    for col, value in expected.items():
        assert row[col] == pytest.approx(value, abs=1e-9), col
    assert np.isnan(row["S(r,r_prev)"]) and np.isnan(row["S(r*,r*_prev)"])
    assert df.loc[1, "S(r,r_prev)"] == pytest.approx(1.0)
    assert df.loc[1, "|r|"] == pytest.approx(2 * math.sqrt(2))
    assert df.loc[1, "quality"] == pytest.approx(1.0)  # scale-free


def test_geometry_table_separation_columns_on_clusters():
    good, bad = clusters(n=40, sep=(0.0, 3.0, 8.0, 60.0))
    df = geo.geometry_table(bad=bad, good=good, layers=[10, 11, 12, 13])
    assert list(df.index) == [10, 11, 12, 13]
    assert abs(df.loc[10, "silhouette"]) < 0.05  # same distribution
    assert df.loc[13, "silhouette"] > 0.85  # perfectly separated pair
    assert df["silhouette"].is_monotonic_increasing
    assert df.loc[10, "probe_acc"] < 0.8 and df.loc[12, "probe_acc"] == 1.0
    assert df.loc[13, "S(r,r_prev)"] > 0.99  # the direction settles on e0
    # the styled view is a Styler over the same values
    styler = geo.style_geometry_table(df)
    assert "silhouette" in styler.to_html()
    assert styler.data is df


def test_degenerate_layer_gives_nan_cosines_not_errors():
    good, bad = clusters(n=10, layers=2, sep=(0.0, 4.0))
    good[:, 0] = 1.0
    bad[:, 0] = 1.0  # e.g. the embedding of a shared last token
    df = geo.geometry_table(bad=bad, good=good)
    assert df.loc[0, "|r|"] == 0.0 and np.isnan(df.loc[0, "S(g,r)"]) and df.loc[0, "silhouette"] == 0.0
    assert df.loc[0, "probe_acc"] == pytest.approx(0.5)


def test_separation_quality_formula():
    g, b = np.array([3.0, 4.0]), np.array([3.0, 0.0])
    q = geo.separation_quality(g, b)
    r = b - g
    g_hat = g / 5
    purity = np.linalg.norm(r - r.dot(g_hat) * g_hat) / np.linalg.norm(r)
    assert q["snr"] == pytest.approx(4 / 5)
    assert q["purity"] == pytest.approx(purity)
    assert q["quality"] == pytest.approx(4 / 5 * (1 - 9 / 15) * purity)


# ---------------------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------------------


def test_align_puts_good_on_the_left_and_the_median_line_horizontal():
    rng = np.random.default_rng(3)
    good = rng.normal(size=(20, 2)) + [5.0, 5.0]  # good up and right of bad
    bad = rng.normal(size=(20, 2)) + [-3.0, -1.0]
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    out = geo.align_embedding(np.vstack([good, bad]), labels)
    mg, mb = geo.weiszfeld_median(out[:20]), geo.weiszfeld_median(out[20:])
    assert mg[0] < 0 < mb[0]
    assert abs(mg[1]) < 1e-9 and abs(mb[1]) < 1e-9
    assert np.sqrt((out**2).sum(1).mean()) == pytest.approx(1.0)
    # rotation + scale only: pairwise distance ratios are kept
    d_in = np.linalg.norm(good[0] - bad[0]) / np.linalg.norm(good[1] - bad[1])
    d_out = np.linalg.norm(out[0] - out[20]) / np.linalg.norm(out[1] - out[21])
    assert d_out == pytest.approx(d_in)


def test_project_layers_aligned_and_cached(monkeypatch, tmp_path):
    geo.clear_projection_cache()
    good, bad = clusters(n=25, layers=3, d=12, sep=(1.0, 4.0, 8.0))
    prompts = [f"good {i}" for i in range(25)] + [f"bad {i}" for i in range(25)]
    proj = geo.project_layers(bad=bad, good=good, prompts=prompts, cache_dir=tmp_path)
    assert proj.coords.shape == (3, 50, 2) and proj.n_good == 25 and proj.n_bad == 25
    for layer in proj.layers:
        mg, mb = proj.centres(layer)
        assert mg[0] < 0 < mb[0]
        assert abs(mg[1]) < 1e-6 and abs(mb[1]) < 1e-6
    assert proj.seconds > 0
    assert len(list(tmp_path.glob("projection-*.npz"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of using the cache")

    monkeypatch.setattr(geo, "_fit_layer", boom)
    again = geo.project_layers(
        bad=torch.tensor(bad), good=torch.tensor(good), prompts=prompts, cache_dir=tmp_path
    )  # memory
    np.testing.assert_array_equal(again.coords, proj.coords)
    assert again.seconds == 0.0 and again.key == proj.key and again.prompts == prompts
    geo.clear_projection_cache()
    from_disk = geo.project_layers(bad=bad, good=good, cache_dir=tmp_path)  # disk
    np.testing.assert_allclose(from_disk.coords, proj.coords)
    with pytest.raises(AssertionError, match="recomputed"):
        geo.project_layers(bad=bad, good=good, seed=1)  # other settings → another key


def test_small_sets_and_effective_neighbors():
    assert geo.effective_neighbors(400, 10) == 10
    assert geo.effective_neighbors(8, 10) == 2
    assert geo.effective_neighbors(4, 10) == 1
    assert geo.effective_neighbors(3, 10) == 0
    geo.clear_projection_cache()
    for n in (2, 4, 7):
        good, bad = clusters(n=n, layers=2, d=6, sep=(3.0, 6.0))
        proj = geo.project_layers(bad=bad, good=good, cache=False)
        assert proj.coords.shape == (2, 2 * n, 2) and np.isfinite(proj.coords).all()
        mg, mb = proj.centres(1)
        assert mg[0] < mb[0]


def test_reference_projection_for_edited_residuals():
    geo.clear_projection_cache()
    good, bad = clusters(n=20, layers=2, d=8, sep=(4.0, 8.0))
    proj = geo.project_layers(bad=bad, good=good)
    collapsed = bad.copy()
    collapsed[:, :, 0] -= np.array([4.0, 8.0])  # the separation removed
    edited = geo.project_layers(bad=collapsed, good=good, reference=proj)
    assert edited.coords.shape == proj.coords.shape and edited.key != proj.key
    df0, df1 = geo.geometry_table(bad=bad, good=good), geo.geometry_table(bad=collapsed, good=good)
    assert (df1["silhouette"] < df0["silhouette"] - 0.2).all()


def test_interpolate_frames_hits_every_layer_exactly():
    coords = np.random.default_rng(4).normal(size=(4, 5, 2))
    frames, pos = geo.interpolate_frames(coords, steps=3)
    assert frames.shape == (10, 5, 2) and pos.shape == (10,)
    for i in range(4):
        np.testing.assert_array_equal(frames[3 * i], coords[i])
        assert pos[3 * i] == i


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    geo.clear_projection_cache()
    good, bad = clusters(n=15, layers=3, d=8, sep=(0.5, 3.0, 6.0))
    prompts = [f"harmless prompt {i}" for i in range(15)] + [f"harmful prompt {i}" for i in range(15)]
    proj = geo.project_layers(bad=bad, good=good, prompts=prompts)
    table = geo.geometry_table(bad=bad, good=good)
    collapsed = bad.copy()
    collapsed[:, :, 0] -= np.array([0.5, 3.0, 6.0])
    edited = geo.project_layers(bad=collapsed, good=good, reference=proj, prompts=prompts)
    return proj, table, edited, geo.geometry_table(bad=collapsed, good=good)


def test_plots_return_figures(small, tmp_path):
    from matplotlib.figure import Figure

    proj, table, edited, table_e = small
    style = plots.ScatterStyle(labels=("ok", "bad"), colors=("green", "purple"), show_means=True)
    fig = plots.plot_layer(proj, 2, style=style, highlight=[0])
    assert isinstance(fig, Figure) and fig.axes[0].get_title() == "layer 2"
    assert "ok (15)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert isinstance(plots.plot_layers(proj, ncols=2), Figure)
    assert len(plots.plot_before_after(proj, edited, tables=(table, table_e)).axes) == 6
    fig = plots.plot_geometry({"original": table, "edited": table_e}, ["silhouette", "probe_acc"], mark=1)
    assert len(fig.axes[0].lines) == 5  # 2 columns × 2 tables + the mark
    with pytest.raises(KeyError):
        plots.plot_geometry(table, "nope")


def test_animation_gif_and_mp4_or_clear_skip(small, tmp_path):
    proj = small[0]
    anim = plots.animate_layers(proj, steps=2, hold=0)
    gif = plots.save_animation(anim, tmp_path / "layers.gif", fps=5, dpi=30)
    assert gif.exists() and gif.stat().st_size > 0
    from PIL import Image

    assert Image.open(gif).n_frames == 5  # (3 − 1)·2 + 1
    if plots.ffmpeg_available():
        assert plots.save_animation(anim, tmp_path / "layers.mp4", dpi=30).exists()
    else:
        with pytest.warns(UserWarning, match="ffmpeg"):
            assert plots.save_animation(anim, tmp_path / "layers.mp4") is None


# ---------------------------------------------------------------------------------------------------------
# Widget
# ---------------------------------------------------------------------------------------------------------


def test_explorer_callbacks_headless(small):
    from hereticlab.ui.widgets import GeometryExplorer

    proj, table, edited, table_e = small
    ex = GeometryExplorer(proj, table, edited=edited, edited_table=table_e, layer=0, interactive=False)
    assert ex.layer == 0 and ex.render_count == 1
    first_png = ex.image.value
    assert first_png[:4] == b"\x89PNG"
    ex.slider.value = 2  # the slider re-renders the picture and the table row
    assert ex.layer == 2 and ex.render_count == 2 and ex.image.value != first_png
    assert ">2</th>" in ex.row.value and ">0</th>" not in ex.row.value
    assert "layer 2" in ex.figure.axes[0].get_title()
    ex.play.value = 1  # Play is linked to the slider
    assert ex.slider.value == 1 and ex.layer == 1
    ex.source.value = "edited"
    assert ex.projection is edited and "edited" in ex.figure.axes[0].get_title()
    assert f"{table_e.loc[1, 'silhouette']:.2f}" in ex.figure.axes[0].get_title()
    n_scatter = len(ex.figure.axes[0].collections)
    ex.show_means.value = True
    assert len(ex.figure.axes[0].collections) == n_scatter + 2
    # a "click" at a point's position selects it and lists its neighbours
    target = 20
    assert ex.select_nearest(*edited.at(1)[target]) == target
    assert ex.selected == target and "harmful prompt 5" in ex.info.value
    near = [value for _, value in ex.neighbours.options]
    assert len(near) == ex.k_nearest and target not in near
    ex.neighbours.value = near[0]  # clicking a neighbour walks to it
    assert ex.selected == near[0] and ex.picker.value == near[0]
    ex.select_point(None)
    assert ex.selected is None and ex.neighbours.options == ()
    bundle = ex._repr_mimebundle_()  # the widget, with a static PNG fallback for saved notebooks
    assert "application/vnd.jupyter.widget-view+json" in bundle and "image/png" in bundle


def test_explorer_without_edited_or_table(small):
    from hereticlab.ui.widgets import GeometryExplorer

    proj = small[0]
    ex = GeometryExplorer(proj, interactive=False)
    assert ex.source.disabled and ex.row.value == ""
    ex.set_layer(1)
    assert ex.layer == 1
    with pytest.raises(ValueError):
        GeometryExplorer(proj, prompts=["too few"], interactive=False)


def test_the_pair_is_keyword_only_bad_before_good():
    good, bad = np.zeros((4, 2, 3)), np.ones((4, 2, 3))
    for fn in (geo.geometry_table, geo.project_layers):
        with pytest.raises(TypeError, match=r"bad=\.\.\., good=\.\.\."):
            fn(good, bad)
        with pytest.raises(TypeError, match="needs both"):
            fn(bad=bad)
    df = geo.geometry_table(bad=bad, good=good, probe=False)
    np.testing.assert_allclose(df["|r|"], np.sqrt(3))  # r = mean(bad) − mean(good)
