"""Speed and memory of `meshseg predict`, as ratios against plain PyTorch measured in the same run.

Every measurement runs in a fresh Python process so that its peak resident memory
(ru_maxrss) is its own. For each scan and model it reports:

- plain: the network as an ordinary torch.nn.Module, one forward pass over the whole
  conformed 256^3 volume - what a straightforward replication does; the reference of every
  ratio;
- model: meshseg's inference on the same conformed volume (crop, layers, softmax);
- e2e: the whole `meshseg predict` command on the scan as given (start-up, load, conform,
  infer, un-conform, QC, write), timed from outside, with each step's share of it: start-up
  is the wall time outside the record's `seconds` (Python, imports, model loading), the other
  steps are the record's `stage_seconds`;
- noqc: the same command with --no-qc, and what QC adds: (e2e - noqc) / e2e;
- matmul: a 4096^2 float32 (and bfloat16) matrix product, the rate the convolutions could at
  best reach on this machine. Each network row states the FLOPs it computed (meshseg skips
  the background and the outer shell) and its GFLOP/s, against that limit.

Each repeat measures plain, model, e2e and noqc one after the other, so that a ratio compares
runs under about the same background load; the tables give medians over the repeats (of the
seconds, and of the per-repeat ratios). Models: `default` (the bundled default), a catalogue
name or a checkpoint path, or meshnet5/16/26 (random weights: speed ignores their values).
Scans: the real scans in ../shared/real-scans when present, else the example scan.

Results are printed; `--out DIR` also writes DIR/latest.{json,md} (benchmarks/results holds the
run quoted in docs/benchmarks.md).
Backends: default (predict's own choice, no --backend), torch, openvino, bf16 (torch in
bfloat16), onnx, cuda.
Usage: python benchmarks/bench_predict.py [--repeat 3] [--scans ...] [--models ...]
       [--backends default,torch,openvino,bf16,onnx,cuda] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's meshseg (`-m meshseg` runs with cwd=ROOT too)
REAL_SCANS = ROOT.parent / "shared" / "real-scans"
DEFAULT_SCANS = ("stroke_T2w_mni.nii.gz", "M2208_T2w.nii.gz")
RANDOM_MODELS = {"meshnet5": 5, "meshnet16": 16, "meshnet26": 26}
# (device, predict's --backend or None for its own choice, --precision) per benchmark backend
BACKENDS = {"default": ("cpu", None, "fp32"), "torch": ("cpu", "torch", "fp32"),
            "openvino": ("cpu", "openvino", "fp32"), "onnx": ("cpu", "onnx", "fp32"),
            "bf16": ("cpu", "torch", "bf16"), "cuda": ("cuda", "torch", "fp32")}


def predict_flags(backend: str) -> list[str]:
    """`meshseg predict` flags of a benchmark backend; the device always named, since
    predict's own --device auto would take a GPU that plain and model do not use."""
    device, engine, precision = BACKENDS[backend]
    return (["--device", device] + (["--backend", engine] if engine else [])
            + ["--precision", precision])
STEPS = ("start-up", "load", "conform", "layers", "unconform", "qc", "write")
STEP_NAMES = {"layers": "inference", "unconform": "un-conform", "qc": "QC", "write": "writing"}


def child(kind: str, model: str, backend: str, scan: str) -> dict:
    """One measurement in this process; returns seconds, peak RSS and GFLOP computed."""
    import resource

    import torch

    if kind == "matmul":
        return matmul_rates(torch)

    from meshseg.io import load_volume
    from meshseg.models import catalog
    from meshseg.models.meshnet import ACTIVATIONS
    from meshseg.pipeline.conform import conform, to_unit_range
    from meshseg.pipeline.infer import lesion_probability, resolve_device
    from meshseg.pipeline.predict import default_backend, runner

    loaded = catalog.load(None if model == "default" else model)
    device_name, engine, precision = BACKENDS[backend]
    device = resolve_device(device_name)
    volume01 = to_unit_range(conform(load_volume(scan))[0])
    start = time.perf_counter()
    if kind == "plain":
        x = torch.from_numpy(volume01)[None, None].to(device)
        modules = []
        for layer in loaded.layers:
            conv = torch.nn.Conv3d(layer.weight.shape[1], layer.weight.shape[0],
                                   layer.weight.shape[-1], padding=layer.padding,
                                   dilation=layer.dilation)
            conv.weight.data, conv.bias.data = layer.weight, layer.bias
            modules += [conv] + ([ACTIVATIONS[layer.activation]()] if layer.activation else [])
        net = torch.nn.Sequential(*modules).to(device).eval()
        start = time.perf_counter()
        with torch.no_grad():
            net(x).softmax(1).cpu()
        flops = sum(layer_flops(loaded.layers)) * volume01.size
    else:
        engine = engine or default_backend(loaded, device)
        network, seen = runner(loaded, device, engine, precision=precision), {}

        def run(x, on_layer, keep):
            seen.update(shape=tuple(x.shape[1:]), keep=keep)
            return network(x, on_layer, keep)

        lesion_probability(volume01, run, crop=loaded.crop)
        flops = computed_flops(loaded.layers, seen["shape"],
                               seen["keep"] if engine == "torch" else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "gflop": flops / 1e9,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def layer_flops(layers) -> list[int]:
    """Multiply-adds x 2 per output voxel of each layer."""
    return [2 * layer.weight.numel() for layer in layers]


def computed_flops(layers, shape: tuple[int, int, int], keep) -> float:
    """FLOPs of a pass over `shape` that computes each layer only where the output inside
    `keep` depends on it (as meshseg's layer-by-layer inference does); keep None: everywhere."""
    from meshseg.pipeline.infer import _regions

    full = tuple(slice(0, n) for n in shape)
    regions = _regions(layers, shape, keep or full)
    return float(sum(f * np.prod([r.stop - r.start for r in region])
                     for f, region in zip(layer_flops(layers), regions)))


def matmul_rates(torch) -> dict:
    """GFLOP/s of a 4096^2 matrix product in float32 and bfloat16 (median of 5)."""
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
        torch.matmul(a, b)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - start)
        rates[f"{name}_gflops"] = 2 * 4096**3 / statistics.median(times) / 1e9
    return rates


def measure(args: list[str]) -> dict:
    """Run one measurement in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def end_to_end(model: str, backend: str, scan: Path, folder: Path, qc: bool = True) -> dict:
    """`meshseg predict` as a user runs it, timed from outside, peak RSS from wait4; each
    step's seconds from the record (start-up: the wall time the record does not cover)."""
    cmd = [sys.executable, "-m", "meshseg", "predict", str(scan), "-q", "--overwrite",
           "-o", str(folder / "mask.nii.gz"), *predict_flags(backend),
           *([] if qc else ["--no-qc"])]
    cmd += [] if model == "default" else ["-m", model]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {status}")
    record = json.loads((folder / "mask.json").read_text())
    steps = {"start-up": seconds - record["seconds"], **record.get("stage_seconds", {})}
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024,
            "backend": record["backend"], **{f"step_{k}": v for k, v in steps.items()}}


def make_models(folder: Path, wanted: list[str]) -> dict[str, str]:
    """What to pass as -m per model name: random MeshNet-X weights are saved to `folder`;
    anything else (default, a catalogue name, a path) is passed on as given."""
    from meshseg.models.meshnet import MeshNet, MeshNetConfig
    from meshseg.models.weights import save_checkpoint

    paths = {}
    for name in wanted:
        if name not in RANDOM_MODELS:
            paths[name] = name
            continue
        path = folder / f"{name}.safetensors"
        save_checkpoint(path, MeshNet(MeshNetConfig(channels=RANDOM_MODELS[name])).eval(),
                        {"note": "random weights, for timing only"})
        paths[name] = str(path)
    return paths


def default_scans(folder: Path) -> list[Path]:
    """The real scans when ../shared is there, else the example scan, made in `folder`."""
    real = [REAL_SCANS / name for name in DEFAULT_SCANS if (REAL_SCANS / name).exists()]
    if real:
        return real
    scan = folder / "example_t2.nii.gz"
    subprocess.run([sys.executable, "-m", "meshseg", "example", str(scan)], check=True,
                   cwd=ROOT, capture_output=True)
    return [scan]


def median(runs: list[dict]) -> dict:
    """Medians, per numeric key, of a list of measurements (other keys: the first run's)."""
    return {key: statistics.median(r[key] for r in runs)
            if isinstance(runs[0][key], (int, float)) else runs[0][key] for key in runs[0]}


def bench(scan: Path, name: str, model: str, backend: str, repeat: int,
          folder: Path) -> dict:
    """`repeat` rounds of plain, model, e2e and noqc, each round close in time; medians."""
    plain_backend = "cuda" if backend == "cuda" else "torch"
    rounds = [(measure(["plain", model, plain_backend, str(scan)]),
               measure(["model", model, backend, str(scan)]),
               end_to_end(model, backend, scan, folder),
               end_to_end(model, backend, scan, folder, qc=False)) for _ in range(repeat)]
    plain, mine, e2e, noqc = (median([r[i] for r in rounds]) for i in range(4))

    def ratio(i: int) -> float:
        return statistics.median(r[i]["seconds"] / r[0]["seconds"] for r in rounds)

    return {"scan": scan.name.split(".")[0], "model": name, "backend": backend,
            "plain": plain, "model_only": mine, "e2e": e2e, "noqc": noqc,
            "ratio_model": ratio(1), "ratio_e2e": ratio(2), "ratio_noqc": ratio(3),
            # what QC adds to the wall time, start-up included: (default - --no-qc) / default
            "qc_added": statistics.median(1 - r[3]["seconds"] / r[2]["seconds"] for r in rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scans", help="comma-separated NIfTI files (default: the real scans "
                                        "in ../shared/real-scans, else the example scan)")
    parser.add_argument("--models", default="default",
                        help="default, a catalogue name or path, meshnet5, meshnet16, meshnet26")
    parser.add_argument("--backends", default="default",
                        help="default (predict's choice), torch (fp32), openvino, bf16 (torch "
                             "in bfloat16), onnx, cuda")
    parser.add_argument("--threads", type=int,
                        help="OMP_NUM_THREADS for every measurement (default: torch's choice)")
    parser.add_argument("--out", type=Path,
                        help="write DIR/latest.{json,md} (default: print only)")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "MODEL", "BACKEND", "SCAN"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every measurement

    import torch

    backends = [b for b in args.backends.split(",") if b != "cuda" or torch.cuda.is_available()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scans = ([Path(s) for s in args.scans.split(",")] if args.scans
                 else default_scans(folder))
        limits = measure(["matmul", "-", "-", "-"])
        print(json.dumps({"matmul": limits}), flush=True)
        for scan in scans:
            for name, model in make_models(folder, args.models.split(",")).items():
                for backend in backends:
                    rows.append(bench(scan, name, model, backend, args.repeat, folder))
                    print(json.dumps(rows[-1]), flush=True)
    report(rows, limits, args)


def report(rows: list[dict], limits: dict, args: argparse.Namespace) -> None:
    """Print the table; with --out, also write it and the raw rows there."""
    import torch

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(), "repeat": args.repeat,
            "load_average": os.getloadavg(), "matmul": limits}
    lines = [f"Measured {meta['date']} on {meta['cpus']} CPUs ({meta['machine']}), "
             f"{meta['threads']} threads, torch {meta['torch']}, median of {meta['repeat']} "
             f"runs. A float32 matrix product reached {limits['fp32_gflops']:.0f} GFLOP/s "
             f"(bfloat16: {limits['bf16_gflops']:.0f}).", "",
             "e2e is `meshseg predict` as run by default (QC on); noqc adds --no-qc; QC added "
             "is (e2e - noqc) / e2e, per round.", "",
             "| scan | model | backend | plain s | plain MB | plain GFLOP/s | model s | model MB | "
             "model GFLOP | model GFLOP/s | model/plain | e2e s | e2e MB | e2e/plain | "
             "noqc s | noqc MB | noqc/plain | QC added |",
             "|" + " --- |" * 18]
    for r in rows:
        plain, mine, e2e, noqc = r["plain"], r["model_only"], r["e2e"], r["noqc"]
        lines.append(
            f"| {r['scan']} | {r['model']} | {r['backend']} ({e2e['backend']}) | "
            f"{plain['seconds']:.1f} | {plain['peak_rss_mb']:.0f} | "
            f"{plain['gflop'] / plain['seconds']:.0f} | {mine['seconds']:.1f} | "
            f"{mine['peak_rss_mb']:.0f} | {mine['gflop']:.0f} | "
            f"{mine['gflop'] / mine['seconds']:.0f} | {r['ratio_model']:.2f} | "
            f"{e2e['seconds']:.1f} | {e2e['peak_rss_mb']:.0f} | {r['ratio_e2e']:.2f} | "
            f"{noqc['seconds']:.1f} | {noqc['peak_rss_mb']:.0f} | {r['ratio_noqc']:.2f} | "
            f"{100 * r['qc_added']:.0f}% |")
    lines += ["", "Each step's share of the default command's time (median seconds):", "",
              "| scan | model | backend | " + " | ".join(STEP_NAMES.get(s, s) for s in STEPS)
              + " |", "|" + " --- |" * (3 + len(STEPS))]
    for r in rows:
        e2e = r["e2e"]
        lines.append(f"| {r['scan']} | {r['model']} | {r['backend']} | " + " | ".join(
            f"{100 * e2e.get('step_' + s, 0) / e2e['seconds']:.0f}% "
            f"({e2e.get('step_' + s, 0):.1f} s)" for s in STEPS) + " |")
    print("\n".join(lines))
    if args.out:
        from meshseg.io import atomic_path

        args.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("latest.json", json.dumps({"meta": meta, "rows": rows}, indent=2)),
                           ("latest.md", "\n".join(lines) + "\n")):
            with atomic_path(args.out / name) as tmp:
                tmp.write_text(text)


if __name__ == "__main__":
    main()
