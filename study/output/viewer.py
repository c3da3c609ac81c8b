"""An interactive viewer of the group maps in the report: one self-contained block of HTML, JavaScript and data.

Three orthogonal slices over the MNI152 template; a click moves the crosshair and reads out the MNI coordinate,
the map's value there and the region under it (the study's atlas, else a synthetic cohort's planted regions); the
reader picks the map and moves its threshold. Everything is inline and offline (no network, no WebGL, no library):
the report stays one file that opens from disk and in MLflow's sandboxed artifact frame. Why not nilearn's
``view_img``: its brainsprite draws a pre-coloured overlay sprite, so the reader cannot change the threshold, and
each map carries its own copy of the template and scripts (0.5 to 1.2 MB a map); NiiVue needs WebGL2 and a 2.2 MB
bundle. Here the maps stay on the study grid as gzipped 16-bit numbers (a few kB each) and the template comes once.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
from dataclasses import dataclass
from functools import cache

import nibabel as nib
import numpy as np
from nilearn import datasets
from nilearn.image import resample_img

from study.output.figures import top_threshold

DISPLAY_MM = 2.0  # the template's voxels under the maps: the study grid's voxels split into whole 2 mm ones
SLICE_PX = 300  # the longest side of a slice on screen, in CSS pixels


@dataclass(frozen=True)
class ViewedMap:
    """One group map as the viewer lists it."""

    name: str  # what the reader picks it by, e.g. "Grad-CAM: male - female (t)"
    values: np.ndarray  # [D, H, W] on the study grid
    threshold: float  # the |value| from which voxels are coloured at first (the static figure's)
    signed: bool  # both signs (a t map, weights): a cold-hot colour scale; else non-negative, hot


def _packed(values: np.ndarray, dtype: str) -> str:
    """An array's C-order bytes as little-endian ``dtype``, gzipped and base64-encoded (the viewer inflates them)."""
    return base64.b64encode(gzip.compress(np.ascontiguousarray(values, dtype=dtype).tobytes(), mtime=0)).decode()


def _greys(image: nib.Nifti1Image, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """``image`` on the display grid, as 0-255 grey levels (its 99.5th percentile white)."""
    data = np.asarray(image.dataobj, dtype=np.float32)  # as floats: nilearn warns when it casts an integer image
    image = nib.Nifti1Image(data[..., 0] if data.ndim > 3 else data, image.affine)  # a 4D file: its first volume
    image = resample_img(
        image,
        target_affine=affine,
        target_shape=shape,
        interpolation="continuous",
        force_resample=True,
        copy_header=True,
    )
    data = np.nan_to_num(np.asarray(image.dataobj, dtype=np.float32))
    return np.clip(data / max(np.percentile(data, 99.5), 1e-6) * 255, 0, 255).astype(np.uint8)


@cache
def _template(shape: tuple[int, int, int], affine: bytes) -> np.ndarray:
    """nilearn's MNI152 template on the display grid (once per grid)."""
    return _greys(datasets.load_mni152_template(resolution=2), shape, np.frombuffer(affine).reshape(4, 4))


def viewer_html(
    maps: list[ViewedMap],
    affine: np.ndarray,
    regions: tuple[np.ndarray, dict[int, str]] | None = None,
    background: nib.Nifti1Image | None = None,
) -> str:
    """The viewer of ``maps`` (all on the study grid of ``affine``: RAS, isotropic) as a block of HTML.

    Parameters
    ----------
    maps : list of ViewedMap
        The maps the reader picks from; the first is shown first, its crosshair on its peak.
    affine : np.ndarray
        The study grid's affine (diagonal, positive: :meth:`~study.data.volumes.Grid.mni`).
    regions : (labels, names), optional
        Integer labels on the study grid and their names, read out under the crosshair.
    background : nibabel image, optional
        What the maps are drawn over, in MNI152 space (a subject's own T1w); default the MNI152 template.
    """
    shape = maps[0].values.shape
    voxel_mm = float(affine[0, 0])
    split = max(1, round(voxel_mm / DISPLAY_MM))  # display voxels per study voxel, along each axis
    display = np.diag([voxel_mm / split] * 3 + [1.0])
    display[:3, 3] = affine[:3, 3] - (split - 1) / 2 * voxel_mm / split  # the study voxel's centre stays put
    display_shape = tuple(int(s * split) for s in shape)
    data = {
        "shape": list(shape),
        "split": split,
        "origin": display[:3, 3].round(3).tolist(),
        "mm": voxel_mm / split,
        "zoom": SLICE_PX / max(display_shape),
        "template": _packed(
            _template(display_shape, display.astype(np.float64).tobytes())
            if background is None
            else _greys(background, display_shape, display),
            "<u1",
        ),
        "maps": [_map_data(m) for m in maps],
        "regions": None,
    }
    if regions is not None:
        labels, names = regions
        data["regions"] = {"labels": _packed(labels, "<u2"), "names": {str(k): v for k, v in names.items()}}
    payload = json.dumps(data).replace("<", "\\u003c")  # no "</script>" inside the script element
    options = "".join(f'<option value="{i}">{html.escape(m.name)}</option>' for i, m in enumerate(maps))
    return VIEWER.format(options=options, payload=payload, script=SCRIPT)


def _map_data(viewed: ViewedMap) -> dict:
    values = np.nan_to_num(np.asarray(viewed.values, dtype=np.float64))
    peak = float(np.abs(values).max())
    scale = peak / 32767 if peak > 0 else 1.0
    return {
        "name": viewed.name,
        "values": _packed(np.round(values / scale), "<i2"),
        "scale": scale,
        "max": peak,
        "threshold": viewed.threshold,
        "signed": viewed.signed,
        "peak": [int(i) for i in np.unravel_index(np.abs(values).argmax(), values.shape)],
    }


VIEWER = """<div class="viewer">
<div class="viewer-controls"><label>Map <select class="viewer-map">{options}</select></label>
<label>Threshold |value| &ge; <input class="viewer-threshold" type="range" min="0" max="1000" value="0">
<output class="viewer-threshold-value"></output></label>
<span class="viewer-scale"><span class="viewer-low"></span> <canvas class="viewer-colorbar" width="200" height="12">
</canvas> <span class="viewer-high"></span></span></div>
<div class="viewer-slices"><canvas data-axis="0" title="sagittal"></canvas><canvas data-axis="1" title="coronal">
</canvas><canvas data-axis="2" title="axial"></canvas></div>
<p class="viewer-readout">loading&hellip;</p>
<script type="application/json" class="viewer-data">{payload}</script>
<script>{script}</script>
</div>"""

# Slices: sagittal (x fixed; y to the right, z up), coronal (y fixed; x to the right: left hemisphere on the left,
# as in the static figures), axial (z fixed; x to the right, y up). Arrays are C order [x, y, z].
SCRIPT = r"""
(function (root) {
  const data = JSON.parse(root.querySelector(".viewer-data").textContent);
  async function unpack(text, Type) {
    const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Type(await new Response(stream).arrayBuffer());
  }
  const [X, Y, Z] = data.shape.map((n) => n * data.split);
  const axes = [[1, 2], [0, 2], [0, 1]];  // per view: the display axes along its width and its height
  const sizes = [X, Y, Z];
  const canvases = [...root.querySelectorAll(".viewer-slices canvas")];
  const select = root.querySelector(".viewer-map");
  const slider = root.querySelector(".viewer-threshold");
  const shown = root.querySelector(".viewer-threshold-value");
  const readout = root.querySelector(".viewer-readout");
  const state = { position: [0, 0, 0], map: 0, threshold: 0 };
  let template, labels, maps;

  function voxel(p) {  // the study grid's voxel under display voxel p, as an index into its arrays
    const [a, b, c] = p.map((q) => Math.floor(q / data.split));
    const [, H, W] = data.shape;
    return (a * H + b) * W + c;
  }
  function value(m, p) {
    return maps[m][voxel(p)] * data.maps[m].scale;
  }
  function colour(v, m) {
    const t = Math.min(1, Math.abs(v) / (data.maps[m].max || 1));
    if (data.maps[m].signed && v < 0) return [0, 80 + 175 * t, 255];
    return [255, 60 + 195 * t, 40 * t];
  }
  function draw(view) {
    const canvas = canvases[view];
    const [u, v] = axes[view];
    const w = sizes[u], h = sizes[v];
    const zoom = data.zoom;
    canvas.width = Math.round(w * zoom);
    canvas.height = Math.round(h * zoom);
    const image = new ImageData(w, h);
    const p = state.position.slice();
    for (let row = 0; row < h; row++) {
      for (let col = 0; col < w; col++) {
        p[u] = col;
        p[v] = h - 1 - row;
        const g = template[(p[0] * Y + p[1]) * Z + p[2]];
        let rgb = [g, g, g];
        const x = value(state.map, p);
        if (x !== 0 && Math.abs(x) >= state.threshold) rgb = colour(x, state.map);
        const k = 4 * (row * w + col);
        image.data.set([rgb[0], rgb[1], rgb[2], 255], k);
      }
    }
    const off = new OffscreenCanvas(w, h);
    off.getContext("2d").putImageData(image, 0, 0);
    const context = canvas.getContext("2d");
    context.imageSmoothingEnabled = false;
    context.drawImage(off, 0, 0, canvas.width, canvas.height);
    context.strokeStyle = "#3df";
    context.lineWidth = 1;
    const cx = (state.position[u] + 0.5) * zoom, cy = (h - state.position[v] - 0.5) * zoom;
    context.beginPath();
    context.moveTo(cx, 0); context.lineTo(cx, canvas.height);
    context.moveTo(0, cy); context.lineTo(canvas.width, cy);
    context.stroke();
    context.fillStyle = "#fff";
    context.font = "13px sans-serif";
    const [left, right] = view === 0 ? ["P", "A"] : ["L", "R"];
    context.fillText(left, 5, 16);
    context.fillText(right, canvas.width - 14, 16);
  }
  function drawScale() {  // the colour scale from the lowest value to the highest, grey under the threshold
    const m = data.maps[state.map], bar = root.querySelector(".viewer-colorbar"), context = bar.getContext("2d");
    const low = m.signed ? -m.max : 0;
    for (let i = 0; i < bar.width; i++) {
      const v = low + (m.max - low) * (i + 0.5) / bar.width;
      const rgb = v !== 0 && Math.abs(v) >= state.threshold ? colour(v, state.map) : [90, 90, 90];
      context.fillStyle = `rgb(${rgb.join(",")})`;
      context.fillRect(i, 0, 1, bar.height);
    }
    root.querySelector(".viewer-low").textContent = low.toPrecision(3);
    root.querySelector(".viewer-high").textContent = m.max.toPrecision(3);
  }
  function update() {
    canvases.forEach((_, view) => draw(view));
    drawScale();
    const p = state.position;
    const mm = p.map((q, axis) => (data.origin[axis] + q * data.mm).toFixed(0));
    const m = data.maps[state.map];
    let text = `MNI x, y, z = ${mm.join(", ")} mm  \u00b7  ${m.name}: ${value(state.map, p).toPrecision(3)}`;
    if (labels) {
      const label = labels[voxel(p)];
      text += `  \u00b7  region: ${label ? data.regions.names[label] || "label " + label : "none"}`;
    }
    readout.textContent = text;
    shown.textContent = state.threshold.toPrecision(3);
  }
  function choose(m, jump) {
    state.map = m;
    state.threshold = data.maps[m].threshold;
    slider.value = Math.round(1000 * state.threshold / (data.maps[m].max || 1));
    if (jump) state.position = data.maps[m].peak.map((q) => q * data.split + Math.floor(data.split / 2));
    update();
  }
  canvases.forEach((canvas, view) => canvas.addEventListener("click", (event) => {
    const box = canvas.getBoundingClientRect();
    const [u, v] = axes[view];
    const col = Math.floor((event.clientX - box.left) / box.width * sizes[u]);
    const row = Math.floor((event.clientY - box.top) / box.height * sizes[v]);
    state.position[u] = Math.min(sizes[u] - 1, Math.max(0, col));
    state.position[v] = Math.min(sizes[v] - 1, Math.max(0, sizes[v] - 1 - row));
    update();
  }));
  select.addEventListener("change", () => choose(Number(select.value), true));
  slider.addEventListener("input", () => {
    state.threshold = Number(slider.value) / 1000 * (data.maps[state.map].max || 1);
    update();
  });
  (async () => {
    template = await unpack(data.template, Uint8Array);
    maps = await Promise.all(data.maps.map((m) => unpack(m.values, Int16Array)));
    if (data.regions) labels = await unpack(data.regions.labels, Uint16Array);
    choose(0, true);
  })().catch((error) => { readout.textContent = "The viewer could not start: " + error; });
})(document.currentScript.parentElement);
"""


def subject_page(
    maps: dict[str, np.ndarray], affine: np.ndarray, image: nib.Nifti1Image, name: str, brain: np.ndarray
) -> str:
    """One subject's maps over its own image, as a page of their own (``study predict --maps``): ``maps`` is
    method's title -> its map on the study grid, shown inside ``brain`` (the study grid's voxels of the subject's
    brain: Grad-CAM's upsampled maps reach beyond it), each coloured at first in its top 10% of voxels."""
    from study.output.report import Report

    viewed = []
    for title, values in maps.items():
        inside = np.where(brain, values, 0)
        viewed.append(ViewedMap(f"{title}: {name}", inside, top_threshold(inside), False))
    page = Report(f"{name}: attribution maps over its own image")
    note = (
        "Each method's map of this image (the mean over the study's fold models, each scaled to its 99.5th "
        "percentile), over the image itself: pick a map, click a slice to move the crosshair, move the threshold."
    )
    page.add_html("Explore the maps", viewer_html(viewed, affine, background=image), note)
    return page.html()
