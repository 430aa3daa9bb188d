"""Cohort runs: which files to segment, where each result goes, and the checks that make
the plan safe before any inference starts.

Names and places come from the paths as the user gave them: a symlink (a DataLad/git-annex
dataset's files point into .git/annex/objects) is never resolved for naming, and nothing is
ever written inside a .git folder. Files and folders whose names start with "." (.git,
meshseg's own temporary files) are never inputs.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from meshseg import __version__
from meshseg.errors import InputError, OutputError
from meshseg.io import (
    LEFTOVER,
    atomic_path,
    bids_entities,
    is_nifti_path,
    make_folder,
    stem,
)
from meshseg.io import remove_leftovers as io_remove_leftovers
from meshseg.pipeline.predict import Outputs
from meshseg.pipeline.record import is_foreign_json, is_foreign_report, lesions_path

MASK_SUFFIX = "_lesion"
PROB_SUFFIX = "_lesion_prob"
PROB_END = "_prob.nii.gz"  # after the mask's name: <name>_lesion_prob.nii.gz, -o m.nii.gz: m_prob
MNI_SUFFIX = "_mni"  # after the mask's name: <name>_lesion_mni.nii.gz, the mask in MNI space
PICTURE_SUFFIX = "_qc.png"  # after the mask's name: <name>_lesion_qc.png
BIDS_MASK = "_space-orig_desc-lesion_mask"  # BIDS derivatives: a binary mask on the scan's grid
BIDS_PROB = "_space-orig_desc-lesion_probseg"  # and its probabilistic segmentation
BIDS_INPUT = "_T2w"  # in a BIDS dataset, the model's contrast is the input
DESCRIPTION = "dataset_description.json"
BIDSIGNORE = ".bidsignore"
# meshseg's outputs that BIDS has no name for: the validator is told to leave them alone
BIDS_IGNORED = (f"*{PICTURE_SUFFIX}", f"*{BIDS_MASK}{MNI_SUFFIX}.nii.gz")
BIDS_VERSION = "1.9.0"


@dataclass(frozen=True)
class Input:
    """A file to segment: its path as given or found, and its folder relative to the folder
    it was found under (empty for a file given by name)."""

    path: Path
    subfolder: Path = Path()


def is_companion(path: Path) -> bool:
    """True for meshseg's outputs that go with a mask but are not one on the scan's grid
    (probability maps, MNI-space masks): never scored as a subject's mask."""
    return stem(path).endswith((PROB_SUFFIX, BIDS_PROB, MASK_SUFFIX + MNI_SUFFIX,
                                BIDS_MASK + MNI_SUFFIX))


def is_output(path: Path) -> bool:
    """True for files meshseg itself writes, so re-runs over a folder don't segment masks."""
    return is_companion(path) or stem(path).endswith((MASK_SUFFIX, BIDS_MASK))


def is_bids_root(folder: Path) -> bool:
    """A BIDS dataset: dataset_description.json, or sub-* folders at the top."""
    return (folder / DESCRIPTION).is_file() or any(folder.glob("sub-*/"))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _search(folder: Path) -> list[Input]:
    """NIfTI files below a folder (symlinks kept, hidden names skipped); in a BIDS dataset
    only the *_T2w images outside derivatives/."""
    bids = is_bids_root(folder)
    found = []
    for path in sorted(folder.rglob("*")):
        if (not is_nifti_path(path) or is_output(path) or _hidden(path, folder)
                or (bids and (path.relative_to(folder).parts[0] == "derivatives"
                              or not stem(path).endswith(BIDS_INPUT)))):
            continue
        found.append(Input(path, path.parent.relative_to(folder)))
    return found


def bids_skipped(folder: Path) -> list[str]:
    """One line per subject of a BIDS dataset that has images but no *_T2w (FLAIR- or
    T1w-only): BIDS mode segments T2w only, and says whom it leaves out."""
    if not folder.is_dir() or not is_bids_root(folder):
        return []
    found: dict[str, set[str]] = {}
    for path in folder.glob("sub-*/**/*"):
        if is_nifti_path(path) and not _hidden(path, folder) and not is_output(path):
            found.setdefault(path.relative_to(folder).parts[0], set()).add(
                stem(path).rsplit("_", 1)[-1])
    return [f"{folder / subject}: skipped, no *{BIDS_INPUT} image (has "
            f"{', '.join(sorted(kinds))}; the models read T2-weighted scans)"
            for subject, kinds in sorted(found.items()) if BIDS_INPUT[1:] not in kinds]


def select_participants(inputs: list[Input], labels: tuple[str, ...]) -> list[Input]:
    """The inputs of the BIDS participants named (with or without "sub-"), as BIDS Apps'
    --participant-label selects them.

    Raises:
        InputError: a label that matches none of the inputs.
    """
    wanted = {label.removeprefix("sub-") for label in labels}
    chosen = [entry for entry in inputs if bids_entities(entry.path).get("sub") in wanted]
    present = {bids_entities(entry.path)["sub"] for entry in chosen}
    missing = sorted(wanted - present)
    if missing:
        raise InputError(f"--participant-label {missing[0]}: no *{BIDS_INPUT} image of "
                         f"sub-{missing[0]} among the inputs")
    return chosen


def expand_inputs(items: list[str]) -> list[Input]:
    """Files as given, folders searched recursively for NIfTI files, globs expanded.

    A name that matches nothing is kept, so that it is reported as a missing file. Two
    names of one file (a symlink and its target) count once, under the first name.
    """
    found: list[Input] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += _search(path)
        elif not path.exists() and glob.has_magic(item):
            found += [Input(Path(p)) for p in sorted(glob.glob(item, recursive=True))
                      if is_nifti_path(Path(p)) and not is_output(Path(p))
                      and not any(part.startswith(".") for part in Path(p).parts
                                  if part not in (".", ".."))]
        elif not LEFTOVER.match(path.name):
            found.append(Input(path))
    unique: dict[Path, Input] = {}
    for entry in found:
        unique.setdefault(entry.path.resolve() if entry.path.exists() else entry.path, entry)
    return list(unique.values())


def shard(inputs: list[Input], k: int, n: int) -> list[Input]:
    """Part k (1..n) of the inputs sorted by path: every n-th, so n tasks with k = 1..n
    cover the sorted list exactly once whatever order the names were given in."""
    ordered = sorted(inputs, key=lambda entry: str(entry.path))
    return ordered[k - 1::n]


def uses_bids(inputs: list[Input], output: Path | None) -> bool:
    """Write a BIDS derivatives dataset: -o names a folder and every input has a sub- entity."""
    return (output is not None and not is_nifti_path(output) and bool(inputs)
            and all("sub" in bids_entities(entry.path) for entry in inputs))


def bids_place(path: Path) -> tuple[Path, str]:
    """(sub-*/[ses-*/]anat folder, source entities) of a BIDS file name: the name without
    its suffix (sub-01_ses-2_run-1_T2w -> sub-01_ses-2_run-1)."""
    entities = bids_entities(path)
    folder = Path(f"sub-{entities['sub']}")
    if "ses" in entities:
        folder /= f"ses-{entities['ses']}"
    parts = stem(path).split("_")
    source = "_".join(parts[:-1] if parts and "-" not in parts[-1] else parts)
    return folder / "anat", source


def plan_outputs(inputs: list[Input], output: Path | None, prob: bool, picture: bool = False,
                 mni: bool = False) -> list[Outputs]:
    """Output paths per input: -o FILE for one input; -o FOLDER (the inputs' sub-folders
    kept, or a BIDS derivatives layout for BIDS inputs); or beside each input as given. The
    QC picture and the MNI mask are named after the mask.

    Raises:
        OutputError: -o names a file but several inputs were given, or two inputs would
            write the same output.
    """
    single_file = output is not None and is_nifti_path(output)
    if single_file and len(inputs) != 1:
        raise OutputError(f"{output}: -o names one file but {len(inputs)} inputs were given; "
                          "pass a folder")
    bids = uses_bids(inputs, output)
    plans = []
    for entry in inputs:
        reference = ""
        if single_file:
            mask, prob_path = output, _beside(output, PROB_END) if prob else None
        elif bids:
            folder, base = bids_place(entry.path)
            mask, prob_path = (output / folder / f"{base}{BIDS_MASK}.nii.gz",
                               output / folder / f"{base}{BIDS_PROB}.nii.gz" if prob else None)
            reference = os.path.relpath(entry.path, output)  # the scan whose grid it is
        else:
            folder = entry.path.parent if output is None else output / entry.subfolder
            mask = folder / f"{stem(entry.path)}{MASK_SUFFIX}.nii.gz"
            prob_path = _beside(mask, PROB_END) if prob else None
        plans.append(Outputs(mask=mask, prob=prob_path, reference=reference))
    plans = [with_qc(p, picture, mni) for p in plans]
    masks = [p.mask for p in plans]
    clash = {m for m in masks if masks.count(m) > 1}
    if clash:
        raise OutputError(f"{sorted(clash)[0]}: several inputs share this output name; "
                          "rename them or run them into different folders")
    return plans


def _beside(mask: Path, end: str) -> Path:
    """A companion output named after its mask: <mask name><end> (m.nii.gz -> m_prob.nii.gz,
    m_qc.png, m_mni.nii.gz), whatever named the mask."""
    return mask.with_name(stem(mask) + end)


def with_qc(plan: Outputs, picture: bool, mni: bool) -> Outputs:
    """The plan with the QC picture and the MNI mask beside its mask, where asked for."""
    return replace(plan, picture=_beside(plan.mask, PICTURE_SUFFIX) if picture else None,
                   mni=_beside(plan.mask, MNI_SUFFIX + ".nii.gz") if mni else None)


def check_plan(inputs: list[Input], plans: list[Outputs], report: Path | None,
               output: Path | None = None, bids: bool = False) -> None:
    """Refuse, before any inference, a plan that could harm a user's file or fail late
    (inputs that do not exist fail later, on their own, and get no folder made).

    Raises:
        OutputError: an output (or the report) would replace an input of the run (symlinks
            followed), is an existing folder, is a JSON file that is not meshseg's, lies
            inside a .git folder, or its folder cannot be created or written; or the -o
            folder (`output`) is not one meshseg may fill (`check_dataset`).
    """
    if output is not None and not is_nifti_path(output):
        check_dataset(output, inputs, bids)
    given = {os.path.realpath(entry.path): entry.path for entry in inputs}
    targets = [target for entry, plan in zip(inputs, plans) if entry.path.exists()
               for target in plan.files()]
    if report is not None and os.path.abspath(report) in {os.path.abspath(p) for p, _ in targets}:
        raise OutputError(f"{report}: --report would replace an output of this run; "
                          "name another file")
    # the report and the per-lesion table written beside it
    targets += [(report, "report"), (lesions_path(report), "report")] if report is not None else []
    for path, role in targets:
        check_target(path, role, given)
    for folder in sorted({path.parent for path, _ in targets}):
        _check_writable(folder)


def check_target(path: Path, role: str, given: dict[str, Path]) -> None:
    """THE rule for where meshseg may write one output (mask, probability map, QC picture,
    MNI mask, record, report): never over an input (`given`: real path -> the input as
    named; symlinks followed), a folder, a JSON file that is not meshseg's, or into a folder
    inside .git. An output that is itself a symlink into .git/annex (a DataLad dataset's
    saved output) is fine: the write replaces the link, never the annexed object. An existing
    file of the user's under an output's name is `predict.check_foreign`'s.

    Raises:
        OutputError: naming the path and why.
    """
    real = os.path.realpath(path)
    if real in given:
        raise OutputError(f"{path}: the {role} would overwrite the input {given[real]} "
                          "(choose another -o)")
    if ".git" in Path(os.path.realpath(path.parent)).parts or ".git" in path.parts:
        raise OutputError(f"{path}: meshseg never writes inside a .git folder; "
                          "use -o FOLDER")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; the {role} is a file")
    if role == "record" and is_foreign_json(path):
        raise OutputError(f"{path}: exists and is not a meshseg record; meshseg will not "
                          "replace it")
    if role == "report" and is_foreign_report(path):
        raise OutputError(f"{path}: exists and is not a meshseg report; meshseg will not "
                          "replace it")


def _check_writable(folder: Path) -> None:
    """Create the folder if needed and write (then drop) a nameless file in it: the one test
    that permissions, read-only mounts and running as root all answer truthfully."""
    make_folder(folder)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OutputError(f"{folder}: cannot write here ({err.strerror or err})") from err


def remove_leftovers(plans: list[Outputs], report: Path | None = None) -> list[Path]:
    """Delete the temporary files that an interrupted write of this run's outputs left
    (`io.remove_leftovers`); returns what was removed."""
    targets = {path for plan in plans for path, _ in plan.files()}
    targets |= {report, lesions_path(report)} if report is not None else set()
    return io_remove_leftovers(targets)


def check_dataset(folder: Path, inputs: list[Input], bids: bool) -> None:
    """-o FOLDER is never a BIDS raw dataset, named by its dataset_description.json (no
    DatasetType, or "raw") or, without one, by holding this run's BIDS inputs outside its
    derivatives/: derivatives belong in FOLDER/derivatives/NAME. BIDS outputs also never go
    into another tool's derivatives dataset.

    Raises:
        OutputError: naming the folder and where to write instead.
    """
    kind = dataset_kind(folder / DESCRIPTION)
    holds_inputs = bids and any(_under(entry.path, folder) and not _under(
        entry.path, folder / "derivatives") for entry in inputs)
    if kind == "raw" or (kind is None and holds_inputs):
        raise OutputError(f"{folder}: is a BIDS raw dataset; meshseg writes derivatives "
                          f"beside it, not into it: -o {folder / 'derivatives' / 'meshseg'}")
    if bids and kind == "other":
        raise OutputError(f"{folder / DESCRIPTION}: belongs to another dataset; give -o "
                          "a folder of its own (e.g. DATASET/derivatives/meshseg)")


def _under(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def dataset_kind(path: Path) -> str | None:
    """What a dataset_description.json describes: None (no such file), "meshseg" (meshseg
    generated it), "raw" (no DatasetType, or "raw") or "other" (another tool's derivatives,
    or unreadable)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError):
        return "other"
    if not isinstance(found, dict):
        return "other"
    made_by = found.get("GeneratedBy")
    if isinstance(made_by, list) and any(
            isinstance(step, dict) and step.get("Name") == "meshseg" for step in made_by):
        return "meshseg"
    return "raw" if found.get("DatasetType", "raw") == "raw" else "other"


def write_description(folder: Path, model: str, model_sha256: str) -> Path:
    """The dataset_description.json of a BIDS derivatives dataset made by meshseg, and the
    .bidsignore lines for its outputs that BIDS has no name for (QC pictures, MNI masks);
    the user's own .bidsignore lines are kept."""
    make_folder(folder)
    description = {
        "Name": "meshseg lesion masks",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "meshseg", "Version": __version__,
                         "Description": f"chronic stroke lesion segmentation, model {model} "
                                        f"(sha256 {model_sha256})"}],
    }
    path = folder / DESCRIPTION
    _write_unless_same(path, json.dumps(description, indent=2) + "\n")
    ignore = folder / BIDSIGNORE
    try:
        kept = ignore.read_text(encoding="utf-8")
    except FileNotFoundError:
        kept = ""
    except (OSError, UnicodeDecodeError) as err:
        raise OutputError(f"{ignore}: cannot read ({err})") from err
    missing = [line for line in BIDS_IGNORED if line not in kept.splitlines()]
    _write_unless_same(ignore, kept + "".join(f"{line}\n" for line in missing))
    return path


def _write_unless_same(path: Path, text: str) -> None:
    """Write `text` atomically unless the file already holds it (a DataLad dataset keeps it
    saved then, not modified)."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    with atomic_path(path, suffix=".part") as tmp:
        tmp.write_text(text, encoding="utf-8")
