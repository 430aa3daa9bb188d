"""How real do synthetic heads look to the ARC-trained model? Its recall on the painted lesion.

A model trained on real ARC scans (the bundled default, arc-t2-lesion) is a judge of realism
that needs no patient data: on a T2-looking synthetic head it should find the painted chronic
lesion and little else. The last template-based generator scored a median recall of 7%, and
the models trained on it failed on real scans. This reports, for each head of a folder written
by `meshseg synth` (its manifest.csv), the painted volume, the model's recall of it, the volume
it marks outside it, Dice, and the mean lesion probability inside the painted lesion; then the
median per look (manifest's contrast column, "t2" when absent). Usage:

    meshseg synth heads/ -n 8 --label-maps ../shared/label-maps \\
        --lesions ../shared/lesion-atlas/soop-lesions --contrast t2 -j 2
    python benchmarks/synth_realism.py heads/manifest.csv [--model NAME] [-o table.md]

Every lesion counts (no largest-lesion post-processing), so recall is not cut by the model's
own choice of one component.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import numpy as np
import torch

from meshseg.io import load_volume
from meshseg.metrics import dice, voxel_ml
from meshseg.models import catalog
from meshseg.pipeline.predict import runner, segment, to_mask

COLUMNS = ("head", "look", "painted mL", "recall", "outside mL", "Dice", "mean prob in lesion")


def judge(model: catalog.LoadedModel, image: Path, truth: Path) -> dict:
    """The model's view of one synthetic head against its painted mask."""
    volume = load_volume(image)
    prob = segment(volume, model, runner(model, torch.device("cpu")))
    painted = np.asarray(load_volume(truth).data) > 0.5
    found = to_mask(prob).astype(bool)
    ml = voxel_ml(volume.affine)
    return {"painted mL": painted.sum() * ml,
            "recall": (found & painted).sum() / max(int(painted.sum()), 1),
            "outside mL": (found & ~painted).sum() * ml,
            "Dice": dice(found, painted),
            "mean prob in lesion": float(prob[painted].mean()) if painted.any() else 0.0}


def rows(manifest: Path, model_spec: str) -> list[dict]:
    """One judged row per head of the manifest, printed as it is measured."""
    model = catalog.load(model_spec)
    out = []
    with manifest.open(newline="") as handle:
        for entry in csv.DictReader(handle):
            row = {"head": entry["subject"], "look": entry.get("contrast") or "t2",
                   **judge(model, manifest.parent / entry["image"],
                           manifest.parent / entry["mask"])}
            out.append(row)
            print(_line(row), flush=True)
    return out


def _line(row: dict) -> str:
    cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.2f}" for c in COLUMNS]
    return "| " + " | ".join(cells) + " |"


def table(judged: list[dict]) -> str:
    """Markdown: every head, then the median of each look."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += [_line(row) for row in judged]
    for look in sorted({row["look"] for row in judged}):
        group = [row for row in judged if row["look"] == look]
        median = {c: statistics.median(r[c] for r in group) for c in COLUMNS[2:]}
        lines.append(_line({"head": f"**median, {len(group)} heads**", "look": look,
                            **median}))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path, help="manifest.csv written by meshseg synth")
    parser.add_argument("--model", default="arc-t2-lesion", help="the judge (name or path)")
    parser.add_argument("-o", "--output", type=Path, help="also write the table here")
    args = parser.parse_args()
    markdown = table(rows(args.manifest, args.model))
    header = f"Synthetic-head realism: {args.model} on {args.manifest}\n\n"
    if args.output:
        args.output.write_text(header + markdown, encoding="utf-8")
    print("\n" + header + markdown)


if __name__ == "__main__":
    main()
