"""A finished study's report in a real headless Chromium, opened from disk and through a real MLflow server's UI
(which shows an HTML artifact in a sandboxed frame): its viewer draws the maps and answers a click."""

from __future__ import annotations

import signal

import mlflow
import pytest

from study.pipeline import run_study, study_dir
from tests.chromium import CHROMIUM, Chromium
from tests.test_study import study_config
from tests.test_tracking_server import TrackingServer
from tests.test_viewer import HOT, count, readout

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium")]

CANVAS_BOX = (
    "(() => { const c = document.querySelectorAll('.viewer-slices canvas')[2]; c.scrollIntoView({block: 'center'});"
    " const b = c.getBoundingClientRect(); return [b.left, b.top, b.width, b.height]; })()"
)


def click_moves_the_crosshair(browser: Chromium, frame: str | None = None, offset: tuple = (0, 0)) -> None:
    """The viewer (in the page, or in ``frame`` at ``offset`` in the page) has drawn a map over the template, and
    a click on its axial slice changes the coordinate it reads out."""
    before = browser.wait_for(f"{readout()}.startsWith('MNI') && {readout()}", frame=frame)
    assert browser.evaluate(count(2, HOT), frame) > 0, "no voxel of the first map is coloured"
    left, top, width, height = browser.evaluate(CANVAS_BOX, frame)
    browser.click(offset[0] + left + 0.2 * width, offset[1] + top + 0.3 * height)
    after = browser.wait_for(f"{readout()} !== {before!r} && {readout()}", frame=frame)
    assert after.split("mm")[0] != before.split("mm")[0], (before, after)  # another MNI coordinate


def test_the_report_viewer_works_from_disk_and_in_the_mlflow_ui(tmp_path, cohort_dir):
    server = TrackingServer(tmp_path)
    server.start()
    try:
        config = study_config(
            tmp_path,
            cohort_dir,
            tracking={"uri": server.uri},
            attribution={"methods": ["gradcam"], "permutations": 20, "sanity": {"subjects": 2}},
        )
        run_id = run_study(config)
        report = study_dir(config) / "latest" / "report.html"
        with Chromium(height=1200) as browser:
            browser.open(report.as_uri())
            click_moves_the_crosshair(browser)
            # the t map's name says whether any voxel survives, as the metric counts them
            run = mlflow.MlflowClient(server.uri).get_run(run_id)
            found = run.data.metrics["test_voxels_fwer05_gradcam"]
            options = browser.evaluate("[...document.querySelectorAll('.viewer-map option')].map(o => o.text)")
            t_maps = [o for o in options if o.startswith("Grad-CAM: male - female (t, ")]
            shown = "p_FWER < 0.05)" if found else "none at p_FWER < 0.05; top 10% shown)"
            assert len(t_maps) == 1 and t_maps[0].endswith(shown), (options, found)
            assert "Grad-CAM: mean, all held-out subjects" in options

            experiment = run.info.experiment_id
            browser.open(f"{server.uri}/#/experiments/{experiment}/runs/{run_id}/artifacts/report.html")
            browser.wait_for("!!document.querySelector('iframe.mlflow-html-iframe')", timeout=60)
            offset = browser.evaluate(
                "(() => { const b = document.querySelector('iframe.mlflow-html-iframe').getBoundingClientRect();"
                " return [b.left, b.top]; })()"
            )
            assert browser.evaluate("document.querySelector('iframe.mlflow-html-iframe').sandbox.value") == (
                "allow-scripts"
            )
            click_moves_the_crosshair(browser, browser.frame("blob:"), tuple(offset))
    finally:
        server.stop(signal.SIGKILL)
