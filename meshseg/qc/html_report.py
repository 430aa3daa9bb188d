"""The cohort report as one HTML page: a row per input (QC thumbnail, volume, side,
territories, flags, status), sortable columns, and a summary at the top.

The page is self-contained apart from the QC pictures, which it links by paths relative to
the page (the thumbnail is the picture itself, scaled by the browser): a cohort of a
thousand scans stays a small page, and the pictures are the files beside each mask. It opens
from disk with no server and no network: no external script, style or font. It renders the
same per-input records as the JSON and CSV reports.
"""

from __future__ import annotations

import os
import statistics
from html import escape
from pathlib import Path
from urllib.parse import quote

from meshseg.io import atomic_path

TERRITORIES_SHOWN = 3  # the territories holding most of the lesion, per row

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left;
         vertical-align: middle; }
th { background: #f3f3f3; cursor: pointer; user-select: none; position: sticky; top: 0; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { width: 220px; display: block; }
.flag { background: #ffe08a; border-radius: 3px; padding: 1px 4px; margin: 1px;
        display: inline-block; }
.failed { color: #b00020; font-weight: bold; }
.warn { color: #666; font-size: 12px; }
.summary span { margin-right: 2em; }
"""

# Sorting: click a header to sort by its column (numbers by value, empty cells last);
# click again to reverse. Each cell's data-key holds the value it sorts by.
SCRIPT = """
document.querySelectorAll("th").forEach(function (th, column) {
  th.addEventListener("click", function () {
    var body = document.querySelector("tbody");
    var up = th.getAttribute("aria-sort") !== "ascending";
    document.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
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
"""

COLUMNS = ("QC picture", "input", "status", "lesion mL", "lesions", "side",
           "main territories", "flags", "error / warnings")


def write(rows: list[dict], path: Path) -> None:
    """Write the page for these per-input records to `path`, atomically."""
    page = render(rows, Path(path).parent)
    with atomic_path(path, suffix=".part.html") as tmp:
        tmp.write_text(page, encoding="utf-8")


def render(rows: list[dict], folder: Path) -> str:
    """The page's HTML; picture links are made relative to `folder` (the page's folder)."""
    head = "".join(f"<th>{escape(name)}</th>" for name in COLUMNS)
    body = "\n".join(_row(row, folder) for row in rows)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<title>meshseg report</title>\n"
        f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>meshseg report</h1>\n"
        f"{_summary(rows)}\n"
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n"
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n")


def _summary(rows: list[dict]) -> str:
    """Inputs, failed, flagged and the median lesion volume of those segmented."""
    volumes = [r["lesion_ml"] for r in rows if r.get("lesion_ml") is not None]
    median = f"{statistics.median(volumes):.1f} mL" if volumes else "-"
    parts = {"inputs": len(rows),
             "failed": sum(r.get("status") == "failed" for r in rows),
             "flagged": sum(bool(r.get("flags")) for r in rows),
             "median lesion volume": median}
    return "<p class=\"summary\">" + "".join(
        f"<span id=\"{escape(k.split()[0])}\"><b>{escape(k)}</b>: {escape(str(v))}</span>"
        for k, v in parts.items()) + "</p>"


def _row(row: dict, folder: Path) -> str:
    """One table row; every cell carries the key it sorts by."""
    location = row.get("location") or {}
    flags = row.get("flags") or []
    territories = (location.get("territories") or [])[:TERRITORIES_SHOWN]
    ml = row.get("lesion_ml")
    status = row.get("status", "")
    cells = [
        _cell(_picture(row.get("picture", ""), folder), row.get("picture", "")),
        _cell(escape(Path(row.get("input", "")).name), row.get("input", ""),
              title=row.get("input", "")),
        _cell(f"<span class=\"{escape(status)}\">{escape(status)}</span>", status),
        _cell("" if ml is None else f"{ml:.2f}", "" if ml is None else ml, numeric=True),
        _cell(str(row.get("components") if row.get("components") is not None else ""),
              row.get("components") if row.get("components") is not None else "",
              numeric=True),
        _cell(escape(_side(location)), location.get("side", "")),
        _cell(", ".join(escape(f"{t['abbreviation']} {t['lesion_pct']:.0f}%")
                        for t in territories),
              territories[0]["abbreviation"] if territories else ""),
        _cell("".join(f"<span class=\"flag\" title=\"{escape(f['message'])}\">"
                      f"{escape(f['name'])}</span>" for f in flags), len(flags)),
        _cell(escape(row.get("error", "")) + _warnings(row.get("warnings", "")),
              row.get("error", "")),
    ]
    return "<tr>" + "".join(cells) + "</tr>"


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
    if not picture:
        return ""
    link = quote(Path(os.path.relpath(Path(picture).resolve(), folder.resolve())).as_posix())
    return f"<a href=\"{link}\"><img src=\"{link}\" alt=\"QC picture\" loading=\"lazy\"></a>"
