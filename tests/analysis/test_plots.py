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


@pytest.mark.parametrize("labels", [[f"cluster {k}" for k in range(4)], ["men", "women", "children"],
                                    ["[i] iy", "[ɪ] ih", "[a] aa", "[ʌ] ah"], [f"digit {k}" for k in range(10)]])
def test_heatmap_tick_labels_do_not_overlap(labels):
    fig = plots.routing_heatmap(np.ones((4, len(labels))), [f"expert {e}" for e in range(4)], labels)
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in fig.axes[0].get_xticklabels()]
    for a, b in zip(boxes, boxes[1:]):
        assert not a.overlaps(b), labels


def test_curves_mark_early_stops_and_scatter_has_error_bars(tmp_path):
    runs = np.array([[1.0, 0.5, np.nan], [1.2, 0.4, 0.3]])
    fig = plots.curves({"a": runs}, "t", "step", "loss", stops={"a": [1, -1]})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "a: early stop (1 of 2)" in labels
    marker = next(ln for ln in fig.axes[0].lines if ln.get_marker() == "x")
    assert list(marker.get_xdata()) == [1] and list(marker.get_ydata()) == [0.5]
    fig = plots.scatter_xy({"s": ([3, 1], [1, 2])}, yerr={"s": [0.1, 0.2]})
    assert fig.axes[0].containers and fig.axes[0].containers[0].has_yerr
    _save(fig, tmp_path, "e.png")
