import numpy as np
import pytest

pytest.importorskip("matplotlib")

from moekit.analysis import plots  # noqa: E402


def _save(fig, tmp_path, name):
    p = tmp_path / name
    fig.savefig(p)
    assert p.stat().st_size > 1000


def test_routing_heatmap_normalises_columns(tmp_path):
    fig = plots.routing_heatmap(np.array([[3, 0], [1, 2]]), ["e0", "e1"], ["a", "b"], "t", normalize="col")
    im = fig.axes[0].images[0].get_array()
    assert np.allclose(np.asarray(im).sum(0), 1.0)
    _save(fig, tmp_path, "h.png")
    with pytest.raises(ValueError, match="table"):
        plots.routing_heatmap(np.ones((2, 3)), ["e0", "e1"], ["a", "b"])
    with pytest.raises(ValueError, match="normalize"):
        plots.routing_heatmap(np.ones((2, 2)), ["e0", "e1"], ["a", "b"], normalize="all")


def test_curves_lines_scatter(tmp_path):
    runs = np.array([[1.0, 0.5, np.nan], [1.2, 0.4, 0.3]])  # second run longer: NaN padding is ignored
    _save(plots.curves({"a": runs, "b": np.array([1.0, 0.9, 0.8])}, "t", "step", "loss", logy=True), tmp_path, "c.png")
    _save(plots.lines([0.5, 1.0], {"x": [1, 2]}, yerr={"x": [0.1, 0.1]}), tmp_path, "l.png")
    _save(plots.scatter_xy({"s": ([3, 1, 2], [1, 2, 3])}, annotate={"s": ["a", "b", "c"]}), tmp_path, "s.png")
    with pytest.raises(ValueError, match="series"):
        plots.lines([1, 2, 3], {"x": [1, 2]})
