"""CPU runtimes of the same network on the real scans: speed, memory, and masks against fp32 torch.

For each scan in ../shared/real-scans and each runtime (a `meshseg predict --backend` and
`--precision`), a fresh process runs the predict pipeline without QC (conform, infer,
un-conform, threshold) and reports the inference seconds, the process's peak resident
memory, the lesion volume, and Dice of its mask against torch fp32's mask on the same scan.
Runtimes run one after the other per scan, so a ratio compares runs under about the same
load. A runtime is exact enough to be a default when, on every scan, Dice >= 0.99 and the
volume is within 1% of torch fp32's (docs/benchmarks.md).

    python benchmarks/compare_runtimes.py [--runtimes torch,openvino] [--scans a.nii.gz,...]
        [--threads N] [-o table.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_SCANS = ROOT.parent / "shared" / "real-scans"
REFERENCE = "torch"
DICE_MIN, VOLUME_TOLERANCE = 0.99, 0.01


def child(runtime: str, scan: str, mask_file: str) -> dict:
    """One runtime on one scan, in this process: seconds of inference, peak RSS, mL."""
    import torch

    from meshseg.io import load_volume
    from meshseg.models import catalog
    from meshseg.pipeline.predict import lesion_stats, runner, segment, to_mask

    backend, _, precision = runtime.partition("-")
    model = catalog.load(None)
    network = runner(model, torch.device("cpu"), backend, precision=precision or "fp32")
    spent = []

    def timed(x, on_layer, keep):
        start = time.perf_counter()
        logits = network(x, on_layer, keep)
        spent.append(time.perf_counter() - start)
        return logits

    volume = load_volume(Path(scan))
    mask = to_mask(segment(volume, model, timed), model.postprocess)
    np.save(mask_file, mask)
    return {"seconds": spent[0], "lesion_ml": lesion_stats(mask, volume.affine)[0],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(runtime: str, scan: Path, mask_file: Path) -> dict:
    """`child` in a fresh process, so that its peak memory is its own."""
    out = subprocess.run([sys.executable, __file__, "--child", runtime, str(scan),
                          str(mask_file)], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], runtimes: list[str]) -> str:
    """Markdown: per scan and runtime, time, ratio to torch fp32, memory, mL and Dice."""
    lines = ["| scan | runtime | inference s | / torch fp32 | peak MB | lesion mL | volume diff "
             "| Dice vs torch fp32 | exact |", "|" + " --- |" * 9]
    for row in rows:
        ref = row[REFERENCE]
        for runtime in runtimes:
            r = row[runtime]
            diff = (r["lesion_ml"] - ref["lesion_ml"]) / max(ref["lesion_ml"], 1e-9)
            lines.append(f"| {row['scan']} | {runtime} | {r['seconds']:.1f} | "
                         f"{r['seconds'] / ref['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['lesion_ml']:.2f} | {100 * diff:+.2f}% | {r['dice']:.4f} | "
                         f"{'yes' if r['exact'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtimes", default="torch,openvino",
                        help="backend[-precision], e.g. torch, openvino, onnx, torch-bf16")
    parser.add_argument("--scans", help="comma-separated NIfTI files (default: ../shared)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every runtime")
    parser.add_argument("-o", "--output", type=Path, help="also write the table here")
    parser.add_argument("--child", nargs=3, metavar=("RUNTIME", "SCAN", "MASK"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from meshseg.metrics import dice

    runtimes = [REFERENCE] + [r for r in args.runtimes.split(",") if r != REFERENCE]
    scans = ([Path(s) for s in args.scans.split(",")] if args.scans
             else sorted(REAL_SCANS.glob("*.nii*")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scan in scans:
            row = {"scan": scan.name.split(".")[0]}
            for runtime in runtimes:
                mask_file = Path(tmp) / f"{runtime}.npy"
                row[runtime] = measure(runtime, scan, mask_file)
            reference = np.load(Path(tmp) / f"{REFERENCE}.npy")
            for runtime in runtimes:
                r, mask = row[runtime], np.load(Path(tmp) / f"{runtime}.npy")
                r["dice"] = dice(mask, reference)
                ref_ml = row[REFERENCE]["lesion_ml"]
                r["exact"] = bool(r["dice"] >= DICE_MIN and abs(r["lesion_ml"] - ref_ml)
                                  <= VOLUME_TOLERANCE * ref_ml)
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = (f"Measured {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f} at the end.\n\n" + table(rows, runtimes))
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
