"""The per-input record: what made one output and what it found.

A `Result` is written as a JSON sidecar beside each mask (``<mask name>.json``), last and
atomically, so a sidecar always describes a complete mask. The sidecar is the one record of
an input: resume reads it to decide whether an output can be kept, and every cohort report
(``predict --report``, ``meshseg report``) is rendered from these records.

Fields hold JSON types only (str, numbers, None, lists and dicts of them), so a record
survives the round trip through its sidecar unchanged; new fields (QC flags, lesion
location) are added to `Result` with a default, and older sidecars read with that default.
A new option that changes what an output holds joins `SETTINGS`, so resume redoes outputs
made without it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from meshseg.io import atomic_path, is_nifti_path, stem, write_csv
from meshseg.qc import html_report

KIND = "meshseg-result"  # marks a JSON file as a sidecar written by meshseg
BIDS_KIND = "meshseg-bids-sidecar"  # a probability map's BIDS sidecar, written by meshseg
SETTINGS = ("model_sha256", "threshold", "postprocess", "backend", "precision")
"""The fields that decide what a mask looks like: resume keeps an output only when its
sidecar agrees with the current run on all of them."""


@dataclass
class Result:
    """One input's outcome: its sidecar and its row of the cohort report."""

    input: str  # absolute, as are the other paths (`io.record_path`)
    output: str  # the mask
    status: str  # "ok", "skipped" (kept from an earlier run) or "failed"
    model: str
    device: str
    prob: str = ""  # the probability map, when asked for
    input_sha256: str = ""
    model_sha256: str = ""
    threshold: float = 0.5
    postprocess: str = "none"
    backend: str = "torch"
    precision: str = "fp32"
    threads: int | None = None  # CPU threads torch used (None: written before --threads)
    lesion_ml: float | None = None
    voxels: int | None = None
    components: int | None = None  # the number of 26-connected lesions
    seconds: float = 0.0
    # seconds per stage (load, conform, layers, unconform, qc, write): where the time goes
    stage_seconds: dict = field(default_factory=dict)
    date: str = ""  # when the mask was written, ISO 8601 UTC
    meshseg_version: str = ""
    torch_version: str = ""
    error: str = ""
    warnings: str = ""  # the input's header repairs, io.WARNINGS_SEP-separated
    flags: list = field(default_factory=list)  # QC flags (qc.Flag fields: name, value...)
    location: dict = field(default_factory=dict)  # side, territories... (checks.assess)
    picture: str = ""  # the QC picture
    mni: str = ""  # the mask on the MNI grid (--mni)
    output_sha256: str = ""  # of the mask as written: resume keeps only that mask
    kind: str = KIND

    def same_settings(self, other: Result) -> bool:
        """True when both records come from the same model and mask-making settings."""
        return all(getattr(self, name) == getattr(other, name) for name in SETTINGS)

    def differences(self, other: Result) -> str:
        """The `SETTINGS` that differ, as 'name a -> b' (for messages)."""
        return ", ".join(f"{name} {getattr(other, name)} -> {getattr(self, name)}"
                         for name in SETTINGS if getattr(self, name) != getattr(other, name))


def sidecar_path(mask: Path) -> Path:
    """The record beside a mask: the mask's name with .json instead of .nii[.gz] (the BIDS
    sidecar convention)."""
    return mask.with_name(stem(mask) + ".json")


def write_sidecar(result: Result, path: Path, reference: str = "") -> None:
    """Write the record as JSON, atomically; in BIDS derivatives (`reference` given) with the
    `SpatialReference` the BIDS validator requires of a space-orig image's sidecar."""
    fields_out = asdict(result) | ({"SpatialReference": reference} if reference else {})
    _write_json(fields_out, path)


def write_bids_sidecar(path: Path, reference: str) -> None:
    """The sidecar of a BIDS derivative image that has no record of its own (the probseg)."""
    _write_json({"SpatialReference": reference, "kind": BIDS_KIND}, path)


def _write_json(data: dict, path: Path) -> None:
    with atomic_path(path, suffix=".part.json") as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


MAX_RECORD_BYTES = 1 << 20  # a record is a few kB; anything larger is not one
RECORD_START = '{\n  "input": '  # how write_sidecar's text begins (a damaged one too)
TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "float": (int, float), "list": (list,),
                                      "dict": (dict,), "float | None": (int, float, type(None)),
                                      "int | None": (int, type(None))}


def _json(path: Path) -> Any:
    """The JSON in a file, or None when it is missing, too large, unreadable or too deeply
    nested to parse."""
    try:
        if path.stat().st_size > MAX_RECORD_BYTES or not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def read_sidecar(path: Path) -> Result | None:
    """The record in a sidecar, or None when the file is missing, unreadable, not one of
    meshseg's records, or damaged: a field of the wrong type (`lesion_ml: "abc"`) means no
    record, so that input is redone (keys this version does not know are ignored)."""
    data = _json(path)
    if not isinstance(data, dict) or data.get("kind") != KIND:
        return None
    known = {f.name: f for f in fields(Result)}
    values = {k: v for k, v in data.items() if k in known}
    for name, value in values.items():
        types = TYPES[str(known[name].type)]
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            return None
    if not all(isinstance(flag, dict) for flag in values.get("flags", [])):
        return None
    try:
        return Result(**values)
    except TypeError:  # a required field is missing
        return None


def is_foreign_json(path: Path) -> bool:
    """True for an existing file that is not a meshseg record or BIDS sidecar (e.g. a
    scanner's BIDS sidecar): meshseg must not replace it. An empty file, or a damaged
    record (meshseg's kind with wrong types, meshseg's text cut short) is not foreign."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    data = _json(path)
    if data is None:
        try:
            with path.open(encoding="utf-8", errors="replace") as handle:
                return handle.read(len(RECORD_START)) != RECORD_START
        except OSError:
            return True
    return not (isinstance(data, dict) and data.get("kind") in (KIND, BIDS_KIND))


def is_foreign_report(path: Path) -> bool:
    """True for an existing .json file that is not a meshseg --report (a list of records):
    a user's own JSON, or one of meshseg's records. (A .csv or .html report cannot be told
    from a user's file of that kind; those are replaced as before.)"""
    if path.suffix.lower() != ".json" or not path.exists() or path.stat().st_size == 0:
        return False
    data = _json(path)
    return not (isinstance(data, list) and all(isinstance(row, dict) and row.get("kind") == KIND
                                               for row in data))


def gather(folder: Path) -> list[Result]:
    """Every record below `folder` (hidden folders such as .git skipped), sorted by input;
    the stray records older versions left beside inputs they could not read are not."""
    found = (read_sidecar(p) for p in folder.rglob("*.json")
             if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return sorted((r for r in found if r is not None and not is_stray(r)),
                  key=lambda r: (r.input, r.output))


def is_stray(result: Result) -> bool:
    """A failed record of something that was never a scan: not a NIfTI name, or a file that
    could not even be hashed (missing, a folder)."""
    return result.status == "failed" and (not is_nifti_path(Path(result.input))
                                          or not result.input_sha256)


def as_skipped(result: Result) -> Result:
    """A kept record as the report of a resumed run shows it."""
    return replace(result, status="skipped")


def flat_row(result: Result) -> dict[str, Any]:
    """The record as one CSV row: THE rule for nested fields. A dict field becomes one column
    per key, named ``field.key`` (recursively: ``location.centroid.x``); a list field (e.g.
    QC flags) becomes one column holding its JSON text, and the flags also give
    ``flag_names``, their names space-separated. Scalars stay as they are."""
    row: dict[str, Any] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                put(f"{name}.{key}", item)
        elif isinstance(value, list):
            row[name] = json.dumps(value, separators=(",", ":"))
        else:
            row[name] = value

    for spec in fields(result):
        put(spec.name, getattr(result, spec.name))
        if spec.name == "flags":  # the names alone, readable beside the full JSON
            row["flag_names"] = " ".join(str(flag.get("name", "")) for flag in result.flags)
    return row


REPORT_SUFFIXES = (".json", ".csv", ".html")
LESION_COLUMNS = ("input", "lesion", "ml", "side", "centroid_x_mni", "centroid_y_mni",
                  "centroid_z_mni", "territory", "territory_lesion_pct")
"""The per-lesion table: one row per 26-connected lesion (1 = the largest), its main
arterial territory and the share of the lesion in it."""


def write_report(results: list[Result], path: Path) -> None:
    """Write records as a .json list, a .csv table (`flat_row`) or the .html cohort page
    (html_report), atomically; a .json or .csv report gets its per-lesion table beside it
    (`lesions_path`)."""
    if path.suffix.lower() == ".html":  # each row also names its record, for the page's link
        html_report.write([dict(asdict(r), record=str(sidecar_path(Path(r.output))))
                           for r in results], path)
        return
    write_csv(lesions_path(path), LESION_COLUMNS, lesion_rows(results))
    if path.suffix.lower() == ".json":
        with atomic_path(path, suffix=".part.json") as tmp:
            rows = [asdict(r) for r in results]
            tmp.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        return
    rows = [flat_row(r) for r in results]
    columns = list(dict.fromkeys(key for row in rows for key in row)) or \
        [f.name for f in fields(Result)]
    write_csv(path, columns, rows)


def lesions_path(report: Path) -> Path:
    """The per-lesion table beside a report: report.csv -> report_lesions.csv."""
    return report.with_name(report.stem + "_lesions.csv")


def lesion_rows(results: list[Result]) -> list[dict[str, Any]]:
    """`LESION_COLUMNS` rows of every record's location["lesions"] (records made without
    QC have none)."""
    rows = []
    for result in results:
        for number, lesion in enumerate(result.location.get("lesions", []), start=1):
            main = lesion["territories"][0] if lesion["territories"] else {}
            x, y, z = lesion["centroid_mni"]
            rows.append({"input": result.input, "lesion": number, "ml": lesion["ml"],
                         "side": lesion["side"], "centroid_x_mni": x, "centroid_y_mni": y,
                         "centroid_z_mni": z, "territory": main.get("abbreviation", ""),
                         "territory_lesion_pct": main.get("lesion_pct", "")})
    return rows
