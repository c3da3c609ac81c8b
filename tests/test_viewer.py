"""The report's map viewer in a real headless Chromium: it draws, a click moves the crosshair and reads out the
MNI coordinate, the value and the region that numpy and the grid's affine give for that voxel."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from study.data.volumes import Grid
from study.output.figures import top_threshold
from study.output.report import Report
from study.output.viewer import ViewedMap, subject_page, viewer_html
from tests.chromium import CHROMIUM, Chromium

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt install chromium)")

# Pixels of the hot scale (the map over its threshold), of the cold one (negative values), of the grey template
HOT = "(d, i) => d[i] === 255 && d[i + 2] <= 40 && d[i + 1] >= 60"
COLD = "(d, i) => d[i] === 0 && d[i + 2] === 255"


def count(canvas: int, test: str) -> str:
    """JavaScript: how many pixels of the viewer's ``canvas`` (0 sagittal, 1 coronal, 2 axial) pass ``test``."""
    return (
        f"(() => {{ const c = document.querySelectorAll('.viewer-slices canvas')[{canvas}];"
        f" const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;"
        f" for (let i = 0; i < d.length; i += 4) if (({test})(d, i)) n++; return n; }})()"
    )


def readout() -> str:
    """JavaScript: the viewer's read-out line ('' while the document has not parsed it yet)."""
    return "(document.querySelector('.viewer-readout')?.textContent ?? '')"


def mni(grid: Grid, voxel: tuple[int, int, int]) -> str:
    return ", ".join(f"{v:.0f}" for v in grid.affine[:3, :3] @ voxel + grid.affine[:3, 3])


@pytest.fixture
def report(tmp_path):
    """A report with the viewer of two maps on a 6 mm grid: a hot blob and a signed one, and two named regions."""
    grid = Grid.mni(6.0)
    mean = np.zeros(grid.shape, dtype=np.float32)
    mean[10:14, 20:24, 12:15] = np.linspace(1, 2, 4)[:, None, None] * np.linspace(0.5, 1, 3)  # peak 2.0 at x 13, z 14
    t = np.zeros(grid.shape, dtype=np.float32)
    t[18:21, 10:13, 14:16] = -4.5
    t[19, 11, 15] = -6.0
    labels = np.zeros(grid.shape, dtype=np.uint16)
    labels[10:14, 20:24, 12:15] = 3
    labels[18:21, 10:13, 14:16] = 7
    maps = [ViewedMap("method: mean", mean, top_threshold(mean), False), ViewedMap("method: t", t, 4.0, True)]
    page = Report("viewer")
    page.add_html("Explore the maps", viewer_html(maps, grid.affine, (labels, {3: "left blob", 7: "right blob"})))
    path = tmp_path / "report.html"
    path.write_text(page.html())
    return path, grid, mean, t


def test_the_viewer_draws_each_map_and_a_click_reads_out_the_voxel_under_it(report):
    path, grid, mean, t = report
    with Chromium() as browser:
        browser.open(path.as_uri())
        text = browser.wait_for(f"{readout()}.startsWith('MNI') && {readout()}")
        peak = np.unravel_index(mean.argmax(), mean.shape)  # it starts on the first map's peak
        assert f"MNI x, y, z = {mni(grid, peak)} mm" in text and "method: mean: 2.00" in text, text
        assert "region: left blob" in text
        assert browser.evaluate(count(2, HOT)) > 0  # the blob over its threshold, on the template's greys
        assert browser.evaluate(count(2, "(d, i) => d[i] === d[i + 1] && d[i] === d[i + 2] && d[i] > 40")) > 1000

        # A click on the axial slice moves the crosshair to the voxel under it: x, y from the click, z kept
        box = browser.evaluate(
            "(() => { const b = document.querySelectorAll('.viewer-slices canvas')[2].getBoundingClientRect();"
            " return [b.left, b.top, b.width, b.height]; })()"
        )
        split = 3  # 6 mm voxels, 2 mm under them
        x_size, y_size = grid.shape[0] * split, grid.shape[1] * split
        target = (12, 22, peak[2])  # inside the blob, another voxel than the peak
        col, row = target[0] * split + 1, y_size - 1 - (target[1] * split + 1)
        browser.click(box[0] + (col + 0.5) * box[2] / x_size, box[1] + (row + 0.5) * box[3] / y_size)
        moved = browser.wait_for(f"{readout()} !== {text!r} && {readout()}")
        assert f"MNI x, y, z = {mni(grid, target)} mm" in moved, moved
        assert f"method: mean: {mean[target]:.3g}" in moved and "region: left blob" in moved

        # The threshold is the reader's: at 0 the blob's 4 x 4 voxels of this slice are coloured, at its top the
        # 4 at the peak's value (a quarter of the pixels, less what the crosshair covers)
        coloured = {}
        for value in (0, 1000):
            browser.evaluate(
                f"(() => {{ const s = document.querySelector('.viewer-threshold'); s.value = {value};"
                " s.dispatchEvent(new Event('input')); })()"
            )
            coloured[value] = browser.evaluate(count(2, HOT))
        assert 0.2 < coloured[1000] / coloured[0] < 0.3, coloured

        # The signed map: picked, the crosshair jumps to its peak, its negative values in the cold scale
        browser.evaluate(
            "(() => { const s = document.querySelector('.viewer-map'); s.value = '1';"
            " s.dispatchEvent(new Event('change')); })()"
        )
        signed = browser.wait_for(f"{readout()}.includes('method: t') && {readout()}")
        assert f"MNI x, y, z = {mni(grid, (19, 11, 15))} mm" in signed and "method: t: -6.00" in signed, signed
        assert "region: right blob" in signed
        assert browser.evaluate(count(2, COLD)) > 0 and browser.evaluate(count(2, HOT)) == 0


def test_a_subjects_page_draws_its_maps_over_its_own_image(tmp_path):
    """``study predict --maps``'s page: the subject's image under the maps, not the template (here a bright box
    in an empty volume: grey inside the box, black around it)."""
    import nibabel as nib

    grid = Grid.mni(6.0)
    own = np.zeros((60, 72, 60), dtype=np.int16)  # the subject's T1w at 3 mm, over the same field of view, as
    own[20:40, 20:50, 20:40] = 100  # scanners store it: integers (read quietly, without nilearn's cast warning)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = grid.affine[:3, 3] - 1.5
    values = np.zeros(grid.shape, dtype=np.float32)
    values[14:16, 18:20, 14:16] = 1.0
    path = tmp_path / "sub-01_maps.html"
    values[0, 0, 0] = 5.0  # outside the brain (Grad-CAM's upsampled maps reach there): not shown, not its peak
    brain = np.zeros(grid.shape, dtype=bool)
    brain[10:20, 10:25, 10:20] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = subject_page({"Grad-CAM": values}, grid.affine, nib.Nifti1Image(own, affine), "sub-01", brain)
    path.write_text(page)
    with Chromium() as browser:
        browser.open(path.as_uri())
        text = browser.wait_for(f"{readout()}.startsWith('MNI') && {readout()}")
        assert "Grad-CAM: sub-01: 1.00" in text, text
        grey = "(d, i) => d[i] === d[i + 1] && d[i] === d[i + 2] && d[i] > 200"
        black = "(d, i) => d[i] === 0 && d[i + 1] === 0 && d[i + 2] === 0"
        assert browser.evaluate(count(2, grey)) > 1000 and browser.evaluate(count(2, black)) > 1000
        assert browser.evaluate(count(2, HOT)) > 0
