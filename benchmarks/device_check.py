"""The GPU check of meshseg, in one run: predict on CUDA against the CPU, a MeshNet-26 forward,
and a short mixed-precision training run. Writes OUT/device_check.{json,md}.

Steps (each in a fresh process, so its peak memory is its own):

1. cpu: `meshseg predict --device cpu --backend torch --no-qc` on every scan: the reference
   masks;
2. predict-P for each precision P (fp32, fp16, bf16): `meshseg predict --device cuda
   --precision P` on every scan (QC on, as users run it): wall time, peak GPU memory, and
   per scan Dice and lesion volume against the CPU mask;
3. forward: a random MeshNet-26 on a side^3 volume, plain full-volume forward in fp32 and
   under fp16 autocast (time after one warm-up, peak GPU memory), and meshseg's
   layer-by-layer pass on the same volume (time, largest difference from the plain logits);
4. train: `meshseg synth` a few heads, then `meshseg train --device cuda --amp` for two
   short epochs (time, peak GPU memory, final metrics row).

Without CUDA the script stops with one line, unless `--device cpu` asks to run the same
steps on the CPU (to check the script itself; slow with the defaults, quick with a small
`--forward-side` and `--skip-train`). Usage:

    python benchmarks/device_check.py [--out DIR] [--scans DIR_OR_FILES] [--model NAME]
        [--precisions fp32,fp16,bf16] [--forward-side 256] [--train-heads 4] [--skip-train]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's meshseg
REAL_SCANS = ROOT.parent / "shared" / "real-scans"
PRECISIONS = ("fp32", "fp16", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "device",
                        help="folder for the summary and the masks")
    parser.add_argument("--scans", default=str(REAL_SCANS),
                        help="a folder of NIfTI scans or comma-separated files")
    parser.add_argument("--model", help="predict -m (default: the bundled default)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a dry run)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        type=lambda text: text.split(","))
    parser.add_argument("--forward-side", type=int, default=256,
                        help="side of the cube of the MeshNet-26 forward")
    parser.add_argument("--train-heads", type=int, default=4, help="synthetic heads to train on")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--child", nargs=argparse.REMAINDER,
                        help=argparse.SUPPRESS)  # KIND ARGS...: one step in this process
    args = parser.parse_args(argv)
    unknown = sorted(set(args.precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"--precisions: unknown {', '.join(unknown)} (use {', '.join(PRECISIONS)})")
    return args


def scans_of(spec: str) -> list[Path]:
    """The NIfTI files of a folder, or a comma-separated list of files."""
    from meshseg.io import is_nifti_path

    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if is_nifti_path(p))
    return [Path(s) for s in spec.split(",")]


def device_problem(device: str) -> str | None:
    """Why this machine cannot run the check on `device`, or None."""
    from meshseg.errors import DeviceError
    from meshseg.pipeline.infer import resolve_device

    try:
        resolve_device(device)
    except DeviceError as err:
        return (f"no CUDA device here ({err}); run this on a GPU machine, or with --device cpu "
                "to check the script itself")
    return None


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory torch allocated in this process, or peak RSS on the CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_command(command: str, device: str, argv: list[str]) -> dict:
    """`meshseg COMMAND ARGV` in this process: its exit status, seconds and peak memory."""
    from meshseg.cli import main

    start = time.perf_counter()
    try:
        main([command, *argv], standalone_mode=False)
        status = 0
    except SystemExit as stop:
        status = stop.code or 0
    return {"status": status, "seconds": time.perf_counter() - start,
            "peak_mb": peak_memory_mb(device)}


def child_forward(device_name: str, side: int) -> dict:
    """A random MeshNet-26 over a side^3 volume: plain forward (fp32, fp16 autocast) and
    meshseg's layer-by-layer pass, each timed after a warm-up."""
    import torch

    from meshseg.models.meshnet import MeshNet, MeshNetConfig, fold
    from meshseg.pipeline.infer import run_layers

    device = torch.device(device_name)
    net = MeshNet(MeshNetConfig(channels=26)).eval().to(device)
    x = torch.rand((1, 1, side, side, side), device=device)
    out = {}

    def timed(call) -> tuple[float, torch.Tensor]:
        call()  # warm-up: kernel choice, allocator
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    with torch.inference_mode():
        seconds, plain = timed(lambda: net(x))
        out["plain_fp32"] = {"seconds": seconds, "peak_mb": peak_memory_mb(device_name)}
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                seconds, half = timed(lambda: net(x))
            out["plain_fp16"] = {"seconds": seconds, "peak_mb": peak_memory_mb(device_name),
                                 "max_abs_diff": float((half.float() - plain).abs().max())}
        plain = plain[0].cpu()
    layers = fold(net.cpu())
    seconds, mine = timed(lambda: run_layers(x[0].cpu(), layers, device))
    out["layers_fp32"] = {"seconds": seconds, "peak_mb": peak_memory_mb(device_name),
                          "max_abs_diff": float((mine - plain).abs().max())}
    return out


def run_child(*args: str) -> dict:
    """One step in a fresh process; its last stdout line is its JSON result."""
    done = subprocess.run([sys.executable, __file__, "--child", *args], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"step {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def predict_argv(scans: list[Path], folder: Path, device: str, precision: str,
                 model: str | None, qc: bool) -> list[str]:
    """`meshseg predict` arguments of one step (the masks go to `folder`)."""
    argv = [*map(str, scans), "-o", str(folder), "--device", device, "--backend", "torch",
            "--precision", precision, "--overwrite", "-q"]
    return argv + ([] if qc else ["--no-qc"]) + (["-m", model] if model else [])


def compare_masks(reference: Path, other: Path, scans: list[Path]) -> list[dict]:
    """Per scan: Dice of `other`'s mask against `reference`'s, and both lesion volumes."""
    from meshseg.io import load_volume, stem
    from meshseg.metrics import dice, voxel_ml

    rows = []
    for scan in scans:
        name = f"{stem(scan)}_lesion.nii.gz"
        ref, got = load_volume(reference / name), load_volume(other / name)
        a, b = np.asarray(ref.data) > 0, np.asarray(got.data) > 0
        ml = voxel_ml(ref.affine)
        rows.append({"scan": stem(scan), "dice": dice(b, a), "cpu_ml": float(a.sum() * ml),
                     "ml": float(b.sum() * ml)})
    return rows


def check_predict(args: argparse.Namespace, scans: list[Path]) -> dict:
    """Step 1 and 2: CPU reference masks, then each precision on the device."""
    cpu = args.out / "cpu"
    results = {"cpu": run_child("predict", "cpu", *predict_argv(
        scans, cpu, "cpu", "fp32", args.model, qc=False))}
    for precision in args.precisions:
        if precision == "fp16" and not args.device.startswith("cuda"):
            continue  # fp16 is CUDA's only
        folder = args.out / f"{args.device.replace(':', '')}-{precision}"
        step = run_child("predict", args.device, *predict_argv(
            scans, folder, args.device, precision, args.model, qc=True))
        if step["status"] == 0:
            step["masks"] = compare_masks(cpu, folder, scans)
        results[f"predict-{precision}"] = step
    return results


def check_train(args: argparse.Namespace, folder: Path) -> dict:
    """Step 4: a few synthetic heads, two short epochs with amp on the device."""
    meshseg = [sys.executable, "-m", "meshseg"]
    data, run = folder / "synth", folder / "run"
    subprocess.run([*meshseg, "synth", str(data), "-n", str(args.train_heads), "--seed", "0"],
                   cwd=ROOT, check=True, capture_output=True)
    amp = ["--amp"] if args.device.startswith("cuda") else ["--no-amp"]
    train = run_child("train", args.device, "--data", str(data / "manifest.csv"), "--out",
                      str(run), "--device", args.device, *amp, "--epochs", "2",
                      "--val-fraction", "0.25", "--cache", str(folder / "cache"), "-q")
    if train["status"] != 0:
        raise RuntimeError(f"meshseg train on {args.device} failed with status "
                           f"{train['status']}")
    metrics = (run / "metrics.csv").read_text().strip().splitlines()
    train["last_metrics"] = dict(zip(metrics[0].split(","), metrics[-1].split(",")))
    return train


def summary_markdown(summary: dict) -> str:
    """The summary as the tables docs/benchmarks.md quotes."""
    lines = [f"Device check {summary['date']} on {summary['device_name']} "
             f"(torch {summary['torch']}, CUDA {summary['cuda']}).", "",
             "| step | status | seconds | peak MB | masks vs CPU (Dice min, volume diff max) |",
             "| --- | --- | --- | --- | --- |"]
    for name, step in summary["predict"].items():
        masks = step.get("masks", [])
        agreement = "" if not masks else (
            f"{min(m['dice'] for m in masks):.4f}, "
            f"{max(abs(m['ml'] - m['cpu_ml']) / max(m['cpu_ml'], 1e-9) for m in masks):.2%}")
        lines.append(f"| {name} | {step['status']} | {step['seconds']:.1f} | "
                     f"{step['peak_mb']:.0f} | {agreement} |")
    for name, step in summary.get("forward", {}).items():
        diff = f"max abs diff {step['max_abs_diff']:.2e}" if "max_abs_diff" in step else ""
        lines.append(f"| forward {name} | 0 | {step['seconds']:.2f} | {step['peak_mb']:.0f} | "
                     f"{diff} |")
    if "train" in summary:
        train = summary["train"]
        lines.append(f"| train (amp) | 0 | {train['seconds']:.1f} | {train['peak_mb']:.0f} | "
                     f"last epoch: {train['last_metrics']} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, out: Path) -> None:
    """OUT/device_check.json and .md, atomically."""
    from meshseg.io import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("device_check.json", json.dumps(summary, indent=2) + "\n"),
                       ("device_check.md", summary_markdown(summary))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)


def child(kind: str, device: str, rest: list[str]) -> dict:
    if kind in ("predict", "train"):
        return child_command(kind, device, rest)
    if kind == "forward":
        return child_forward(device, int(rest[0]))
    raise SystemExit(f"unknown step {kind}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.child[2:])))
        return 0
    problem = device_problem(args.device)
    if problem:
        print(f"device_check: {problem}", file=sys.stderr)
        return 2
    import torch

    scans = scans_of(args.scans)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device,
               "device_name": (torch.cuda.get_device_name(args.device)
                               if args.device.startswith("cuda") else platform.processor()),
               "torch": torch.__version__, "cuda": torch.version.cuda,
               "scans": [s.name for s in scans]}
    summary["predict"] = check_predict(args, scans)
    write_summary(summary, args.out)  # each step's figures kept should a later one fail
    summary["forward"] = run_child("forward", args.device, str(args.forward_side))
    write_summary(summary, args.out)
    if not args.skip_train:
        with tempfile.TemporaryDirectory() as tmp:
            summary["train"] = check_train(args, Path(tmp))
        write_summary(summary, args.out)
    print(summary_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
