"""Figures of the report: what they say when there is nothing to show, and the confusion matrices of several
classes."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

from study.data.volumes import Grid
from study.output.figures import brain_figure, confusion_figure


@pytest.mark.parametrize("kind", ["glass", "ortho"])
def test_a_map_where_no_voxel_survives_says_so_and_leaves_the_console_quiet(kind):
    grid = Grid.mni(8.0)
    empty = nib.Nifti1Image(np.zeros(grid.shape, dtype=np.float32), grid.affine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure = brain_figure(empty, "Grad-CAM: male - female (t, p_FWER<0.05)", kind, symmetric=True)
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
    texts = [t.get_text() for ax in figure.axes for t in ax.texts]
    assert any(t.endswith("(t, p_FWER<0.05): no voxel survives") for t in texts), texts


def test_confusion_matrices_of_three_classes_show_each_cell_and_its_share_of_the_true_class():
    classes = ("control", "subtype_a", "subtype_b")
    cnn = np.array([[8, 1, 1], [0, 10, 0], [2, 0, 8]])
    figure = confusion_figure({"CNN": cnn, "linear": np.eye(3, dtype=int) * 10}, classes, "held-out")
    cells = [t.get_text() for t in figure.axes[0].texts]
    assert cells[:3] == ["8\n80%", "1\n10%", "1\n10%"] and len(cells) == 9
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == list(classes)
    assert [ax.get_title() for ax in figure.axes] == ["CNN", "linear"]
