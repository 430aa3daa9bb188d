"""The 3-D viewer of one result: a small HTML page per mask, beside the cohort page, that
shows the scan with the mask (and the probability map, when written) over it in NiiVue.

Browsers refuse fetch() of file:// URLs, so a page opened from disk cannot load a NIfTI by
its path: each page carries its volumes inside it (base64 of a gzipped NIfTI, the scan as
8-bit and halved when large) and NiiVue decodes them from memory. The NiiVue bundle (vendored
in `meshseg/qc/niivue`, see its README for version and checksum) and its license are copied
once into the viewer folder, which a classic <script src> loads from disk. The folder holding
the cohort page and the viewer folder can be copied anywhere and opened offline.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
from html import escape
from pathlib import Path
from urllib.parse import quote

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from meshseg.errors import InputError
from meshseg.io import atomic_path, load_volume, stem
from meshseg.metrics import largest_lesion_centre
from meshseg.qc.checks import UNCERTAIN

NIIVUE = Path(__file__).with_name("niivue")
BUNDLE = "niivue.umd.js"
LICENSE = "NIIVUE_LICENSE.txt"  # NiiVue's BSD-2-Clause text, beside the copied bundle
FOLDER_SUFFIX = "_viewer"  # report.html -> report_viewer/
# Scans with more voxels are shown at half resolution (every second voxel on each axis), so
# a page stays a few MB: 256^3 at 8 bits gzips to about 5-8 MB before base64.
MAX_VOXELS = 256 ** 3
SCAN_PERCENTILES = (0.5, 99.5)  # the scan's intensities mapped onto 0..255
PROB_SHOWN_FROM = UNCERTAIN[0]  # lower probabilities are transparent

STYLE = """
html, body { margin: 0; height: 100%; background: #111; color: #eee;
             font-family: system-ui, sans-serif; font-size: 14px; }
header { padding: 6px 10px; } header a { color: #9cf; } label { margin-left: 1.2em; }
#gl { width: 100%; height: calc(100% - 60px); display: block; }
footer { padding: 2px 10px; font-size: 11px; color: #999; }
"""

# Load each embedded volume from its base64 text, draw three slices and the 3-D
# rendering in a grid, put the crosshair on
# the lesion; the checkboxes switch overlays on and off. data-ready marks the end (tests).
SCRIPT = """
(async function () {
  var nv = new niivue.Niivue({ backColor: [0, 0, 0, 1], show3Dcrosshair: true,
                               crosshairColor: [0.3, 0.7, 1, 1],
                               dragAndDropEnabled: false,
                               multiplanarShowRender: niivue.SHOW_RENDER.ALWAYS,
                               multiplanarLayout: niivue.MULTIPLANAR_TYPE.GRID });
  await nv.attachTo("gl");
  for (var i = 0; i < VOLUMES.length; i++) {
    nv.addVolume(await niivue.NVImage.loadFromBase64(VOLUMES[i]));
  }
  nv.setSliceType(niivue.SLICE_TYPE.MULTIPLANAR);
  if (CENTRE) { nv.scene.crosshairPos = nv.mm2frac(CENTRE); nv.updateGLVolume(); }
  document.querySelectorAll("input[data-volume]").forEach(function (box) {
    box.addEventListener("change", function () {
      var index = Number(box.getAttribute("data-volume"));
      nv.setOpacity(index, box.checked ? VOLUMES[index].opacity : 0);
    });
  });
  document.body.setAttribute("data-ready", "1");
})().catch(function (err) {
  document.getElementById("status").textContent = "viewer failed: " + err;
  console.error(err);
});
"""


# Marks the page's code: a page made by another version of STYLE and SCRIPT is made again.
MAKER = hashlib.sha1((STYLE + SCRIPT).encode()).hexdigest()[:12]
MAKER_TAG = f"<meta name=\"meshseg-viewer\" content=\"{MAKER}\">"


def write_pages(rows: list[dict], page: Path) -> list[str]:
    """Write (or keep, when newer than its inputs) the viewer page of each row and return
    each row's link relative to the cohort page `page` ("" for a row without a viewer: a
    failed input, or one whose scan or mask cannot be read from here)."""
    folder = page.parent / (page.stem + FOLDER_SUFFIX)
    links = []
    for row in rows:
        target = folder / page_name(row)
        try:
            made = _write_page(row, target, page) if row.get("status") != "failed" else False
        except (OSError, ImageFileError, ValueError, InputError):
            made = False
        links.append(f"{folder.name}/{target.name}" if made else "")
    if any(links):
        _copy_niivue(folder)
    return links


def page_name(row: dict) -> str:
    """The mask's name and a digest of its full path: unique when masks in different
    sub-folders share a name, and the same in every report of that mask."""
    mask = Path(row.get("output", ""))
    digest = hashlib.sha1(str(mask.absolute()).encode()).hexdigest()[:8]
    return f"{stem(mask)}_{digest}.html"


def _write_page(row: dict, target: Path, page: Path) -> bool:
    """Write one viewer page unless it is newer than the scan, mask and probability map."""
    scan, mask, prob = (Path(row[k]) if row.get(k) else None for k in ("input", "output", "prob"))
    sources = [p for p in (scan, mask, prob) if p is not None]
    if scan is None or mask is None or not all(p.is_file() for p in sources):
        return False
    if _fresh(target, sources):
        return True
    volumes, centre = _volumes(scan, mask, prob)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, suffix=".part.html") as tmp:
        back = quote(Path(os.path.relpath(page, target.parent)).as_posix())
        tmp.write_text(render(row, volumes, centre, back), encoding="utf-8")
    return True


def _fresh(target: Path, sources: list[Path]) -> bool:
    """True when the page is newer than its sources and made by this code."""
    if not target.is_file() or target.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        return False
    with target.open(encoding="utf-8", errors="replace") as page:
        return MAKER_TAG in page.read(1000)


def _volumes(scan: Path, mask: Path, prob: Path | None) -> tuple[list[dict], list | None]:
    """NiiVue's volume list (scan, probability map, mask) and the lesion's centre in mm.

    The scan is put on the mask's grid header (the mask was written with the scan's
    repaired affine), so scan and overlays line up as they did for the model.
    """
    mask_volume = load_volume(mask)  # read as predict read the scan: headers repaired, 3-D
    affine = mask_volume.affine
    labels = mask_volume.data > 0
    data = load_volume(scan).data
    if data.shape != labels.shape:
        raise ValueError(f"{scan}: not on its mask's grid")
    step = 2 if labels.size > MAX_VOXELS else 1
    affine = affine @ np.diag([step, step, step, 1])
    data, labels = data[::step, ::step, ::step], labels[::step, ::step, ::step]
    volumes = [_volume("scan", _to_uint8(data), affine, 1.0, "gray", 1.0, 0, 255)]
    if prob is not None:
        levels = np.asanyarray(nib.load(prob).dataobj)[::step, ::step, ::step]
        volumes.append(_volume("probability", np.round(np.clip(levels, 0, 1) * 255)
                               .astype(np.uint8), affine, 1 / 255, "warm", 0.6,
                               PROB_SHOWN_FROM, 1.0))
    volumes.append(_volume("mask", labels.astype(np.uint8), affine, 1.0, "red", 0.6, 0.5, 1))
    if not labels.any():
        return volumes, None
    centre = affine @ np.append(largest_lesion_centre(labels), 1.0)  # as the QC picture
    return volumes, [round(float(v), 2) for v in centre[:3]]


def _to_uint8(data: np.ndarray) -> np.ndarray:
    """The scan's intensities between its robust extremes, as 0..255."""
    finite = np.nan_to_num(data)
    low, high = np.percentile(finite, SCAN_PERCENTILES)
    scaled = (finite - low) / (high - low) if high > low else finite * 0
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _volume(name: str, data: np.ndarray, affine: np.ndarray, slope: float, colormap: str,
            opacity: float, cal_min: float, cal_max: float) -> dict:
    """One NVImage.loadFromBase64 argument: the array as a gzipped NIfTI in base64."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_slope_inter(slope, 0.0)
    image.header.set_xyzt_units("mm")
    encoded = base64.b64encode(gzip.compress(image.to_bytes(), compresslevel=6))
    return {"name": f"{name}.nii.gz", "base64": encoded.decode("ascii"),
            "colormap": colormap, "opacity": opacity, "cal_min": cal_min,
            "cal_max": cal_max, "trustCalMinMax": True}


def render(row: dict, volumes: list[dict], centre: list | None, back: str) -> str:
    """The viewer page's HTML; `back` links the cohort page (relative, URL-quoted)."""
    name = Path(row.get("input", "")).name
    ml = row.get("lesion_ml")
    boxes = "".join(f"<label><input type=\"checkbox\" checked data-volume=\"{i}\"> "
                    f"{escape(v['name'].split('.')[0])}</label>"
                    for i, v in enumerate(volumes) if i > 0)
    data = json.dumps(volumes, separators=(",", ":")).replace("</", "<\\/")
    return (
        f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n{MAKER_TAG}\n"
        f"<title>{escape(name)}: meshseg viewer</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n<header><a href=\"{escape(back)}\">&larr; cohort page</a> "
        f"<b>{escape(name)}</b>{'' if ml is None else f' {ml:.2f} mL'}{boxes} "
        "<span id=\"status\"></span></header>\n<canvas id=\"gl\"></canvas>\n"
        f"<footer>research use, not a medical device. Viewer: NiiVue (BSD-2-Clause, "
        f"<a href=\"{LICENSE}\">license</a>).</footer>\n"
        f"<script src=\"{BUNDLE}\"></script>\n"
        f"<script>var VOLUMES = {data};\nvar CENTRE = {json.dumps(centre)};</script>\n"
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n")


def _copy_niivue(folder: Path) -> None:
    """Put the NiiVue bundle and its license in the viewer folder (once per version)."""
    for source, name in ((NIIVUE / BUNDLE, BUNDLE), (NIIVUE / "LICENSE", LICENSE)):
        target = folder / name
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            continue
        with atomic_path(target, suffix=".part") as tmp:
            shutil.copyfile(source, tmp)
