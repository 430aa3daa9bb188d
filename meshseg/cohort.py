"""Cohort runs: which files to segment, where each result goes, and the report file."""

from __future__ import annotations

import glob
import json
from dataclasses import asdict, fields
from pathlib import Path

from meshseg.errors import OutputError
from meshseg.io import NIFTI_SUFFIXES, atomic_path, is_nifti_path, write_csv
from meshseg.predict import Outputs, Result

MASK_SUFFIX = "_lesion"
PROB_SUFFIX = "_lesion_prob"


def stem(path: Path) -> str:
    """File name without .nii or .nii.gz."""
    name = path.name
    for suffix in NIFTI_SUFFIXES[::-1]:  # ".nii.gz" before ".nii"
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_output(path: Path) -> bool:
    """True for files meshseg itself writes, so re-runs over a folder don't segment masks."""
    return stem(path).endswith((MASK_SUFFIX, PROB_SUFFIX))


def expand_inputs(items: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for NIfTI files, globs expanded.

    A name that matches nothing is kept, so that it is reported as a missing file.
    """
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if is_nifti_path(p) and not is_output(p))
        elif not path.exists() and glob.has_magic(item):
            found += sorted(Path(p) for p in glob.glob(item, recursive=True)
                            if is_nifti_path(Path(p)) and not is_output(Path(p)))
        else:
            found.append(path)
    unique = list(dict.fromkeys(p.resolve() if p.exists() else p for p in found))
    return unique


def plan_outputs(inputs: list[Path], output: Path | None, prob: bool) -> list[Outputs]:
    """Output paths per input: -o FILE for one input, -o DIR, or beside each input.

    Raises:
        OutputError: -o names a file but several inputs were given, or two inputs would
            write the same output.
    """
    single_file = output is not None and is_nifti_path(output)
    if single_file and len(inputs) != 1:
        raise OutputError(f"{output}: -o names one file but {len(inputs)} inputs were given; "
                          "pass a folder")
    plans = []
    for path in inputs:
        if single_file:
            mask = output
            base = output.parent / stem(output)
        else:
            folder = output if output is not None else path.parent
            base = folder / stem(path)
            mask = base.with_name(base.name + MASK_SUFFIX + ".nii.gz")
        prob_path = base.with_name(base.name + PROB_SUFFIX + ".nii.gz") if prob else None
        plans.append(Outputs(mask=mask, prob=prob_path))
    masks = [p.mask for p in plans]
    clash = {m for m in masks if masks.count(m) > 1}
    if clash:
        raise OutputError(f"{sorted(clash)[0]}: several inputs share this output name; "
                          "rename them or run them into different folders")
    return plans


def write_report(results: list[Result], path: Path) -> None:
    """Write the per-input records as .json or .csv, atomically (rewritten after each input)."""
    rows = [asdict(r) for r in results]
    if path.suffix.lower() != ".json":
        write_csv(path, [f.name for f in fields(Result)], rows)
        return
    with atomic_path(path, suffix=".part.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
