"""The per-result 3-D viewer (NiiVue): pages carry their volumes, are kept while fresh, and
render scan and overlay in real headless Chromium from a copied report folder."""

import base64
import gzip
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from meshseg.qc import viewer
from tests.conftest import head
from tests.test_cli import run
from tests.test_html_report import CHROMIUM_FLAGS, chromium, watched_page

# WebGL2 without a GPU: Chromium's software renderer, which it no longer enables by itself.
WEBGL_FLAGS = CHROMIUM_FLAGS + ["--enable-unsafe-swiftshader", "--use-angle=swiftshader"]


def result_row(tmp_path, write_nifti, shape=(40, 44, 24)) -> dict:
    """A record whose scan, mask and probability map exist (a 2 mm grid)."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = np.random.default_rng(0).random(shape, dtype=np.float32) * 100
    mask = np.zeros(shape, np.uint8)
    mask[10:14, 10:14, 5:8] = 1
    return {"input": str(write_nifti(image, affine, name="scan.nii.gz")),
            "output": str(write_nifti(mask, affine, name="scan_lesion.nii.gz")),
            "prob": str(write_nifti(mask * 0.9, affine, name="scan_lesion_prob.nii.gz")),
            "status": "ok", "lesion_ml": 0.38}


def decoded(page: str, name: str) -> nib.Nifti1Image:
    """The volume of that name embedded in a viewer page."""
    text = page.split(f'"name":"{name}.nii.gz","base64":"')[1].split('"')[0]
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(text)))


def test_pages_embed_volumes_and_are_kept_while_fresh(tmp_path, write_nifti, monkeypatch):
    row = result_row(tmp_path, write_nifti)
    failed = {"input": str(tmp_path / "gone.nii.gz"), "output": "", "status": "failed"}
    missing = dict(row, input=str(tmp_path / "moved.nii.gz"))
    links = viewer.write_pages([row, failed, missing], tmp_path / "report.html")
    assert links[0].startswith("report_viewer/scan_lesion_") and links[1:] == ["", ""]
    page_path = tmp_path / links[0]
    page = page_path.read_text()
    assert "file:" not in page and "http" not in page  # nothing fetched: all embedded
    assert '<script src="niivue.umd.js">' in page and '<a href="../report.html">' in page
    assert (tmp_path / "report_viewer" / viewer.BUNDLE).is_file()
    assert (tmp_path / "report_viewer" / viewer.LICENSE).read_text().startswith("BSD 2-Clause")
    scan, mask = decoded(page, "scan"), decoded(page, "mask")
    assert scan.get_data_dtype() == np.uint8 and scan.shape == (40, 44, 24)
    assert np.allclose(mask.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert np.asanyarray(mask.dataobj).sum() == 48
    assert abs(decoded(page, "probability").get_fdata().max() - 0.9) < 0.01
    assert "var CENTRE = [23.0, 23.0, 12.0];" in page  # the lesion's centre in mm

    os.utime(page_path, (1, 1))  # older than its mask: written again
    viewer.write_pages([row], tmp_path / "report.html")
    assert page_path.stat().st_mtime > 1
    before = page_path.stat().st_mtime_ns
    viewer.write_pages([row], tmp_path / "report.html")  # fresh: kept
    assert page_path.stat().st_mtime_ns == before
    page_path.write_text(page.replace(viewer.MAKER, "older-viewer"))  # other code: made again
    viewer.write_pages([row], tmp_path / "report.html")
    assert viewer.MAKER_TAG in page_path.read_text()

    monkeypatch.setattr(viewer, "MAX_VOXELS", 1000)  # a large scan is halved
    volumes, _ = viewer._volumes(*(tmp_path / n for n in ("scan.nii.gz", "scan_lesion.nii.gz")),
                                 None)
    assert [v["name"] for v in volumes] == ["scan.nii.gz", "mask.nii.gz"]
    assert decoded(viewer.render(row, volumes, None, "r.html"), "scan").shape == (20, 22, 12)


def overlay_pixels(path) -> int:
    """Pixels of the overlays' reds, oranges and yellows in a screenshot (the scan is grey,
    the crosshair blue)."""
    from PIL import Image
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(np.count_nonzero((rgb[..., 0] > 150) & (rgb[..., 0] - rgb[..., 2] > 100)))


def grey_pixels(path) -> int:
    """Pixels of the scan's greys in a screenshot."""
    from PIL import Image
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(np.count_nonzero((rgb.max(-1) - rgb.min(-1) < 12) & (rgb[..., 0] > 40)))


def test_viewer_in_headless_chromium_from_a_copied_folder(tmp_path, write_nifti,
                                                          threshold_model):
    """predict --prob --mni --report page.html; the output folder copied elsewhere and the
    original removed; the cohort page links every output, and its 3-D link opens NiiVue with
    no console errors, and the
    screenshot shows the scan and the overlays (which their checkboxes turn off)."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    binary = chromium()
    scan = write_nifti(head()[0], name="s0.nii.gz")
    result = run("predict", scan, "-o", tmp_path / "out", "-m", threshold_model, "--prob",
                 "--mni", "--report", tmp_path / "out" / "report.html", "-q")
    assert result.exit_code == 0
    copy = shutil.copytree(tmp_path / "out", tmp_path / "elsewhere" / "out")
    shutil.rmtree(tmp_path / "out")
    scan.unlink()

    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=binary, args=WEBGL_FLAGS)
        page, errors = watched_page(browser, 1000, 800)
        page.goto((copy / "report.html").as_uri())
        links = page.eval_on_selector_all(".files a", "links => links.map(a => a.textContent)")
        assert links == ["3-D viewer", "mask", "probability", "MNI mask", "record"]
        page.click("a:has-text('3-D viewer')")
        page.wait_for_selector("body[data-ready]", timeout=120_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(tmp_path / "viewer.png"))
        page.uncheck("input[data-volume='1']")  # the probability map (the scan is 0)
        page.uncheck("input[data-volume='2']")  # the mask
        page.wait_for_timeout(500)
        page.screenshot(path=str(tmp_path / "scan_only.png"))
        browser.close()
    assert errors == []
    assert grey_pixels(tmp_path / "viewer.png") > 20_000  # the scan, in four views
    shown, hidden = (overlay_pixels(tmp_path / n) for n in ("viewer.png", "scan_only.png"))
    assert shown > 20_000 and hidden < 100


@pytest.mark.slow
def test_wheel_ships_niivue(wheel_files):
    """The vendored NiiVue bundle, its license and its origin are inside the built wheel."""
    for name in (viewer.BUNDLE, "LICENSE", "README.md"):
        assert f"meshseg/qc/niivue/{name}" in wheel_files
