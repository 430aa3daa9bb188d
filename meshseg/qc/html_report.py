"""The cohort report as one HTML page: a header saying what made the results (model and
its sha256, meshseg version, threshold, device, dates), then a row per input (QC thumbnail,
status, volume, a fold-out per-lesion table, side, territories, flags coloured by kind,
links to every output and to its 3-D viewer), sortable by any column and filtered by flag.

The page links the QC pictures, the outputs and the viewer pages (`viewer`) by paths relative
to the page, so a cohort of a thousand scans stays a small page and the folder can be
copied. It opens from disk with no server and no network: no external script, style or font.
It renders the same per-input records as the JSON and CSV reports.
"""

from __future__ import annotations

import os
import statistics
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from urllib.parse import quote

from meshseg.io import atomic_path
from meshseg.qc import viewer

TERRITORIES_SHOWN = 3  # the territories holding most of the lesion, per row
# Flags by kind, each kind its colour. "no_lesion" is a finding, not a problem: it neither
# colours a row as flagged nor counts in the summary's "flagged". A flag not named here
# (a newer check) is a lesion problem.
FLAG_KINDS = {"not_t2": "contrast", "poor_registration": "registration",
              "no_lesion": "finding"}
NOT_PROBLEMS = {"no_lesion"}
EARLIER = "from an earlier run"  # the note on a row kept by resume (status "skipped")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left;
         vertical-align: middle; }
thead th { background: #f3f3f3; cursor: pointer; user-select: none; position: sticky; top: 0; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { width: 300px; display: block; }
.flag { border-radius: 3px; padding: 1px 4px; margin: 1px; display: inline-block; }
.flag.lesion { background: #ffe08a; }
.flag.contrast { background: #f4a7a7; }
.flag.registration { background: #b9c8f5; }
.flag.finding { background: #e6e6e6; color: #555; }
.failed { color: #b00020; font-weight: bold; }
.flagged { color: #a05a00; font-weight: bold; }
.note, .warn { color: #666; font-size: 12px; }
.summary span, .made span { margin-right: 2em; }
.made { font-size: 13px; color: #444; }
.files a { display: block; white-space: nowrap; }
details table { font-size: 12px; width: auto; }
details th { background: none; cursor: default; position: static; }
"""

# The results table is #results; the per-lesion fold-out tables inside its rows are not
# sorted or filtered with it.
# Sorting: click a header to sort by its column (numbers by value, empty cells last);
# click again to reverse. Each cell's data-key holds the value it sorts by.
# Filtering: the select shows only rows whose data-flags (space-separated) hold the chosen
# word ("problem" for any problem flag, "failed" for failed inputs).
SCRIPT = """
var headers = document.querySelectorAll("#results > thead th");
headers.forEach(function (th, column) {
  th.addEventListener("click", function () {
    var body = document.querySelector("#results > tbody");
    var up = th.getAttribute("aria-sort") !== "ascending";
    headers.forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", up ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(body.rows);
    function key(row) { return row.cells[column].getAttribute("data-key"); }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === "" || y === "") { return (x === "") - (y === ""); }
      var nx = Number(x), ny = Number(y);
      var order = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return up ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
document.getElementById("filter").addEventListener("change", function (event) {
  var wanted = event.target.value, shown = 0;
  document.querySelectorAll("#results > tbody > tr").forEach(function (row) {
    var show = !wanted || row.getAttribute("data-flags").split(" ").indexOf(wanted) >= 0;
    row.hidden = !show;
    shown += show;
  });
  document.getElementById("shown").textContent = shown;
});
"""

COLUMNS = ("QC picture", "input", "status", "lesion mL", "lesions", "side",
           "main territories", "flags", "files", "error / warnings")


def write(rows: list[dict], path: Path) -> None:
    """Write the page for these per-input records to `path`, atomically, with the 3-D viewer
    page of each result beside it (`viewer.write_pages`)."""
    path = Path(path)
    links = viewer.write_pages(rows, path)
    page = render(rows, path.parent, links)
    with atomic_path(path, suffix=".part.html") as tmp:
        tmp.write_text(page, encoding="utf-8")


def render(rows: list[dict], folder: Path, viewers: list[str] | None = None) -> str:
    """The page's HTML; links are made relative to `folder` (the page's folder); `viewers`
    holds each row's viewer page (relative to the page, "" for none)."""
    viewers = viewers or [""] * len(rows)
    head = "".join(f"<th>{escape(name)}</th>" for name in COLUMNS)
    body = "\n".join(_row(row, folder, link) for row, link in zip(rows, viewers))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<title>meshseg report</title>\n"
        f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>meshseg report</h1>\n"
        f"{_made_by(rows)}\n{_summary(rows)}\n{_filter(rows)}\n"
        f"<table id=\"results\">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>"
        "\n</table>\n"
        "<p class=\"note\">Research use, not a medical device.</p>\n"
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n")


def _made_by(rows: list[dict]) -> str:
    """What made the results: each setting's values across the rows (one, normally)."""
    made = [r for r in rows if r.get("status") != "failed"] or rows
    dates = sorted(r["date"] for r in made if r.get("date"))
    parts = {"model": _values(made, "model"), "model sha256": _values(made, "model_sha256"),
             "meshseg": _values(made, "meshseg_version"),
             "threshold": _values(made, "threshold"), "device": _values(made, "device"),
             "results made": " to ".join(dict.fromkeys([dates[0], dates[-1]])) if dates else "-",
             "page made": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    return "<p class=\"made\">" + "".join(
        f"<span><b>{escape(k)}</b>: <code>{escape(v)}</code></span>"
        for k, v in parts.items()) + "</p>"


def _values(rows: list[dict], key: str) -> str:
    """The distinct values of one field, in order of appearance, or "-"."""
    found = dict.fromkeys(str(r[key]) for r in rows if r.get(key) not in (None, ""))
    return "; ".join(found) or "-"


def problems(row: dict) -> list[dict]:
    """The row's flags that are problems (all but `NOT_PROBLEMS`)."""
    return [f for f in row.get("flags") or [] if f["name"] not in NOT_PROBLEMS]


def shown_status(row: dict) -> str:
    """failed, flagged (a problem flag) or ok; a row kept by resume shows its record's own
    result (resume keeps only results that were ok)."""
    if row.get("status") == "failed":
        return "failed"
    return "flagged" if problems(row) else "ok"


def _summary(rows: list[dict]) -> str:
    """Inputs, failed, flagged, kept from an earlier run and the median lesion volume."""
    volumes = [r["lesion_ml"] for r in rows if r.get("lesion_ml") is not None]
    median = f"{statistics.median(volumes):.1f} mL" if volumes else "-"
    parts = {"inputs": len(rows),
             "failed": sum(r.get("status") == "failed" for r in rows),
             "flagged": sum(shown_status(r) == "flagged" for r in rows),
             "kept from an earlier run": sum(r.get("status") == "skipped" for r in rows),
             "median lesion volume": median}
    return "<p class=\"summary\">" + "".join(
        f"<span id=\"{escape(k.split()[0])}\"><b>{escape(k)}</b>: {escape(str(v))}</span>"
        for k, v in parts.items()) + "</p>"


def _filter(rows: list[dict]) -> str:
    """The flag filter: all rows, any problem, failed, or one flag name present."""
    names = sorted({f["name"] for r in rows for f in r.get("flags") or []})
    options = [("", "all rows"), ("problem", "any problem flag"), ("failed", "failed")]
    options += [(name, name) for name in names]
    return ("<p><label>show <select id=\"filter\">" + "".join(
        f"<option value=\"{escape(value)}\">{escape(text)}</option>" for value, text in options)
        + f"</select></label> <span id=\"shown\">{len(rows)}</span> rows</p>")


def _row(row: dict, folder: Path, viewer_link: str) -> str:
    """One table row; every cell carries the key it sorts by, the row its filter words."""
    location = row.get("location") or {}
    flags = row.get("flags") or []
    territories = (location.get("territories") or [])[:TERRITORIES_SHOWN]
    ml = row.get("lesion_ml")
    status = shown_status(row)
    note = f"<div class=\"note\">{EARLIER}</div>" if row.get("status") == "skipped" else ""
    words = [f["name"] for f in flags] + (["problem"] if problems(row) else []) + (
        ["failed"] if status == "failed" else [])
    cells = [
        _cell(_picture(row.get("picture", ""), folder), row.get("picture", "")),
        _cell(escape(Path(row.get("input", "")).name), row.get("input", ""),
              title=row.get("input", "")),
        _cell(f"<span class=\"{status}\">{status}</span>{note}", status),
        _cell("" if ml is None else f"{ml:.2f}", "" if ml is None else ml, numeric=True),
        _cell(_lesions(row), "" if row.get("components") is None else row["components"],
              numeric=True),
        _cell(escape(_side(location)), location.get("side", "")),
        _cell(_territories(territories), territories[0]["abbreviation"] if territories else ""),
        _cell("".join(_flag(f) for f in flags), len(problems(row))),
        _cell(_files(row, folder, viewer_link), "3-D" if viewer_link else ""),
        _cell(escape(row.get("error", "")) + _warnings(row.get("warnings", "")),
              row.get("error", "")),
    ]
    return f"<tr data-flags=\"{escape(' '.join(words))}\">" + "".join(cells) + "</tr>"


def _flag(flag: dict) -> str:
    """A flag's name coloured by its kind; its message on hover."""
    kind = FLAG_KINDS.get(flag["name"], "lesion")
    return (f"<span class=\"flag {kind}\" title=\"{escape(flag['message'])}\">"
            f"{escape(flag['name'])}</span>")


def _lesions(row: dict) -> str:
    """The lesion count, folding out a table of each lesion when the record has them."""
    count = row.get("components")
    lesions = (row.get("location") or {}).get("lesions", [])
    if not lesions:
        return "" if count is None else str(count)
    head = "".join(f"<th>{name}</th>" for name in ("#", "mL", "side", "MNI centroid",
                                                     "territories"))
    body = "".join(
        f"<tr><td>{i}</td><td class=\"num\">{lesion['ml']:.2f}</td>"
        f"<td>{escape(lesion['side'])}</td>"
        f"<td>{escape(', '.join(f'{v:.0f}' for v in lesion['centroid_mni']))}</td>"
        f"<td>{_territories(lesion['territories'][:TERRITORIES_SHOWN])}</td></tr>"
        for i, lesion in enumerate(lesions, 1))
    return (f"<details><summary>{count if count is not None else len(lesions)}</summary>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></details>")


def _territories(territories: list[dict]) -> str:
    """e.g. "MCAFL 80%, MCAT 15%"."""
    return ", ".join(escape(f"{t['abbreviation']} {t['lesion_pct']:.0f}%") for t in territories)


def _files(row: dict, folder: Path, viewer_link: str) -> str:
    """Links to the row's outputs and record (those it has), and to its 3-D viewer."""
    links = [(_link(row.get(key, ""), folder), text) for key, text in (
        ("output", "mask"), ("prob", "probability"), ("mni", "MNI mask"),
        ("record", "record"))]
    if viewer_link:
        links.insert(0, (quote(viewer_link), "3-D viewer"))
    return "<div class=\"files\">" + "".join(
        f"<a href=\"{href}\">{text}</a>" for href, text in links if href) + "</div>"


def _link(path: str, folder: Path) -> str:
    """A path as a link relative to the page's folder ("" for none or a missing file)."""
    if not path or not Path(path).exists():
        return ""
    return quote(Path(os.path.relpath(Path(path).resolve(), folder.resolve())).as_posix())


def _warnings(warnings: str) -> str:
    """The input's header repairs, under any error, in small grey type."""
    return f"<div class=\"warn\">{escape(warnings)}</div>" if warnings else ""


def _cell(content: str, key: object, numeric: bool = False, title: str = "") -> str:
    """A table cell with its sort key."""
    attributes = f" data-key=\"{escape(str(key))}\""
    if numeric:
        attributes += " class=\"num\""
    if title:
        attributes += f" title=\"{escape(title)}\""
    return f"<td{attributes}>{content}</td>"


def _side(location: dict) -> str:
    """e.g. "left (96% L)"; empty when not located."""
    side = location.get("side")
    if not side or side == "none":
        return side or ""
    return f"{side} ({location.get('left_pct', 0):.0f}% L)"


def _picture(picture: str, folder: Path) -> str:
    """The QC picture as a thumbnail linking to itself, by a path relative to the page."""
    link = _link(picture, folder)
    if not link:
        return ""
    return f"<a href=\"{link}\"><img src=\"{link}\" alt=\"QC picture\" loading=\"lazy\"></a>"
