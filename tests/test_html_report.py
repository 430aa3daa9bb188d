"""The cohort HTML report: made from the same records as JSON/CSV, checked in a real browser
(headless Chromium driven by playwright; skipped with the reason where either is missing)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from meshseg.qc import html_report
from tests.test_cli import head, run

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


def watched_page(browser, width: int, height: int) -> tuple[object, list[str]]:
    """A new page of a playwright browser and the list its console errors, page errors and
    failed requests are collected into (a page that opens offline has none)."""
    errors: list[str] = []
    page = browser.new_page(viewport={"width": width, "height": height})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"failed {r.url}"))
    return page, errors


def chromium() -> str:
    """The Chromium binary (Debian's package puts it under /usr/lib, with a wrapper script on
    the PATH), or skip."""
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")


def records(n: int) -> list[dict]:
    """n plausible records: volumes n-1 .. 0 mL, one failed, one flagged."""
    rows = []
    for i in range(n):
        rows.append({"input": f"/data/sub-{i:02d}.nii.gz", "status": "ok",
                     "lesion_ml": float(n - 1 - i), "components": 1, "error": "",
                     "flags": [], "picture": "",
                     "location": {"side": "left", "left_pct": 100.0, "territories": [
                         {"abbreviation": "MCAFL", "lesion_pct": 80.0}]}})
    rows[1]["flags"] = [{"name": "not_t2", "value": 0.5, "threshold": 0.75,
                         "message": "CSF/white matter 0.50 < 0.75"}]
    rows[2].update(status="failed", lesion_ml=None, components=None, location={},
                   error="sub-02.nii.gz: corrupted or truncated file")
    return rows


def test_summary_counts_and_escaping(tmp_path):
    rows = records(5)
    rows[0]["input"] = "/data/<script>alert(1)</script>.nii.gz"
    rows[3]["warnings"] = "qform and sform disagree; sform used"
    rows[4]["flags"] = [{"name": "no_lesion", "value": 0.0, "threshold": 0.0,
                         "message": "no lesion found"}]
    page = html_report.render(rows, tmp_path)
    assert "<script>alert(1)" not in page
    assert page.count("<tr data-flags") == 5
    assert "qform and sform disagree; sform used</div>" in page
    assert "<b>failed</b>: 1" in page
    assert "<b>flagged</b>: 1" in page  # not_t2; no_lesion is a finding, not a problem
    assert "<b>median lesion volume</b>: 2.0 mL" in page  # of 4, 3, 1, 0
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from the network
    assert 'class="flag contrast"' in page and 'class="flag finding"' in page
    assert '<option value="not_t2">' in page and '<option value="no_lesion">' in page


def test_header_names_what_made_the_results(tmp_path):
    rows = records(3)
    for i, row in enumerate(rows):
        row.update(model="arc-t2-lesion", model_sha256="ab12", meshseg_version="0.1.0",
                   threshold=0.5, device="cpu", date=f"2026-12-0{i + 1}T10:00:00Z")
    rows[2].update(status="failed", date="", model="other")  # a failure made nothing
    page = html_report.render(rows, tmp_path)
    for text in ("<b>model</b>: <code>arc-t2-lesion</code>", "<code>ab12</code>",
                 "<b>meshseg</b>: <code>0.1.0</code>", "<b>threshold</b>: <code>0.5</code>",
                 "<b>device</b>: <code>cpu</code>",
                 "<code>2026-12-01T10:00:00Z to 2026-12-02T10:00:00Z</code>"):
        assert text in page


def test_resumed_rows_show_their_result_and_outputs_are_linked(tmp_path):
    """A row kept by resume shows the earlier result (ok or flagged), not "skipped"; every
    output that exists is linked by a path relative to the page."""
    rows = records(3)[:2]
    outputs = {}
    for key, name in (("output", "a_lesion.nii.gz"), ("prob", "a_lesion_prob.nii.gz"),
                      ("mni", "a_lesion_mni.nii.gz"), ("record", "a_lesion.json")):
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / name).write_bytes(b"x")
        outputs[key] = str(tmp_path / "out" / name)
    rows[0].update(status="skipped", **outputs)
    rows[1].update(status="skipped")
    page = html_report.render(rows, tmp_path / "page", ["v/a.html", ""])
    assert ">skipped<" not in page
    assert page.count("<div class=\"note\">from an earlier run</div>") == 2
    assert '<span class="ok">ok</span>' in page and '<span class="flagged">flagged</span>' in page
    for name, text in (("a_lesion.nii.gz", "mask"), ("a_lesion_prob.nii.gz", "probability"),
                       ("a_lesion_mni.nii.gz", "MNI mask"), ("a_lesion.json", "record")):
        assert f'<a href="../out/{name}">{text}</a>' in page
    assert '<a href="v/a.html">3-D viewer</a>' in page


def test_per_lesion_table_folds_out(tmp_path):
    rows = records(3)[:1]
    rows[0]["components"] = 2
    rows[0]["location"]["lesions"] = [
        {"ml": 30.5, "side": "left", "centroid_mni": [-40.2, -10.0, 12.7], "territories": [
            {"abbreviation": "MCAFL", "name": "MCA frontal", "lesion_pct": 70.0,
             "territory_pct": 5.0}]},
        {"ml": 1.25, "side": "right", "centroid_mni": [20.0, 5.0, -3.0], "territories": []}]
    page = html_report.render(rows, tmp_path)
    assert "<details><summary>2</summary>" in page
    assert "<td class=\"num\">30.50</td><td>left</td><td>-40, -10, 13</td><td>MCAFL 70%</td>" \
        in page
    assert "<td>2</td><td class=\"num\">1.25</td><td>right</td>" in page
    assert "<details>" not in html_report.render(records(3)[:1], tmp_path)  # no lesions: a count


def test_report_in_headless_chromium(tmp_path, write_nifti, threshold_model):
    """predict --report page.html over a small cohort, opened from disk: one row per input,
    sortable by volume, no console errors; the screenshot is kept under tmp_path."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    binary = chromium()
    for i in range(3):
        write_nifti(head(seed=i)[0], name=f"s{i}.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"not a scan")
    page_path = tmp_path / "out" / "report.html"
    result = run("predict", tmp_path, "-o", tmp_path / "out", "-m", threshold_model,
                 "--report", page_path, "-q")
    assert result.exit_code == 1  # the bad input failed; the others are in the page
    json_path = tmp_path / "out" / "report.json"
    run("predict", tmp_path, "-o", tmp_path / "out", "-m", threshold_model, "--overwrite",
        "--report", json_path, "-q")
    same_rows = len(json.loads(json_path.read_text()))

    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=binary, args=CHROMIUM_FLAGS)
        page, errors = watched_page(browser, 1400, 900)
        page.goto(page_path.as_uri())
        assert page.locator("#results > tbody > tr").count() == same_rows == 4
        assert page.locator("img").count() == 3  # the QC thumbnails of the 3 scans
        assert all(page.evaluate("Array.from(document.images).map(i => i.naturalWidth > 0)"))
        volumes = ("Array.from(document.querySelectorAll('#results > tbody > tr'))"
                   ".map(r => r.cells[3].getAttribute('data-key'))")
        page.click("th:has-text('lesion mL')")
        up = [float(v) for v in page.evaluate(volumes) if v]
        page.click("th:has-text('lesion mL')")
        down = [float(v) for v in page.evaluate(volumes) if v]
        assert up == sorted(up) and down == sorted(up, reverse=True) and len(up) == 3
        assert page.evaluate(volumes)[-1] == ""  # the failed input (no volume) sorts last
        page.click("th:has-text('status')")
        assert page.locator("#results > tbody > tr").first.inner_text().count("failed") == 1
        page.select_option("#filter", "failed")
        assert page.locator("#results > tbody > tr:visible").count() == 1
        assert page.inner_text("#shown") == "1"
        page.select_option("#filter", "")
        assert page.locator("#results > tbody > tr:visible").count() == 4
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert Path(tmp_path / "report.png").stat().st_size > 10_000
