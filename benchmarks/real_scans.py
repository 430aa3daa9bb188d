"""Every available model on the real scans of ../shared/real-scans, in one table.

Real data is the judge of a model: synthetic Dice once chose a default that found nothing on
patients. For each scan and model this runs meshseg's predict pipeline (conform, infer,
un-conform, threshold, the model's own post-processing) on the CPU and reports the lesion
volume, the number of lesions, the side of the largest lesion (sign of its centroid's world x;
these scans are in scanner or standard space), Dice against the ARC-trained model's mask (the
bundled default, brainchop's model), and the time taken.

None of these scans has a manual mask, so Dice here is agreement with the ARC-trained model,
not accuracy. Usage:

    python benchmarks/real_scans.py [--scans DIR] [--model NAME_OR_PATH ...] [-o table.md]

With no --model it runs every bundled model, plus the original TF.js files of the ARC model
from ../shared when present (they must agree with the bundled copy exactly).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from meshseg.io import load_volume
from meshseg.metrics import dice, largest_lesion_side
from meshseg.models import catalog
from meshseg.pipeline.predict import lesion_stats, runner, segment, to_mask

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE = "arc-t2-lesion"  # the ARC-trained MeshNet: every Dice is against its mask


def default_models() -> list[str]:
    """The bundled models, then the original TF.js ARC model when ../shared has it."""
    names = [entry.name for entry in catalog.bundled()]
    original = SHARED / "models" / "brainchop-t2-lesion-11ch" / "model.json"
    return names + ([str(original)] if original.is_file() else [])


def measure(model_spec: str, scan: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(0/1 mask, affine, seconds) of one model on one scan, as `meshseg predict` makes it."""
    model = catalog.load(model_spec)
    run = runner(model, torch.device("cpu"))
    volume = load_volume(scan)
    start = time.perf_counter()
    mask = to_mask(segment(volume, model, run), model.postprocess)
    return mask, volume.affine, time.perf_counter() - start


def table(scans: list[Path], models: list[str]) -> str:
    """The markdown table, one row per scan and model (reference model first per scan)."""
    models = [REFERENCE] + [m for m in models if m != REFERENCE]
    rows = ["| scan | model | lesion mL | lesions | side of largest | Dice vs ARC model "
            "| seconds |", "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for scan in scans:
        reference = None
        for spec in models:
            mask, affine, seconds = measure(spec, scan)
            reference = mask if reference is None else reference
            ml, _, lesions = lesion_stats(mask, affine)
            agreement = ("-" if not (mask.any() or reference.any())
                         else f"{dice(mask, reference):.3f}")
            name = Path(spec).parent.name + " (TF.js)" if spec.endswith(".json") else spec
            rows.append(f"| {scan.name.split('.')[0]} | {name} | {ml:.1f} | {lesions} | "
                        f"{largest_lesion_side(mask, affine) or '-'} | {agreement} | "
                        f"{seconds:.1f} |")
            print(rows[-1], flush=True)
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=Path, default=SHARED / "real-scans",
                        help="folder of .nii.gz scans (default ../shared/real-scans)")
    parser.add_argument("--model", action="append", dest="models",
                        help="a model name or checkpoint path (repeatable); default: all")
    parser.add_argument("-o", "--output", type=Path, help="also write the table here")
    args = parser.parse_args()
    scans = sorted(args.scans.glob("*.nii.gz"))
    if not scans:
        parser.error(f"no .nii.gz scans in {args.scans}")
    markdown = table(scans, args.models or default_models())
    header = (f"Real-scan benchmark: {len(scans)} scans from {args.scans}, CPU "
              f"({torch.get_num_threads()} threads); Dice is agreement with {REFERENCE}.\n\n")
    if args.output:
        args.output.write_text(header + markdown, encoding="utf-8")
    print("\n" + header + markdown)


if __name__ == "__main__":
    main()
