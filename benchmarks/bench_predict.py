"""Speed and memory of inference, as ratios against plain PyTorch measured in the same run.

Every measurement runs in a fresh Python process so that its peak resident memory
(ru_maxrss) is its own. For each model and backend it reports:

- plain: the network as an ordinary torch.nn.Module, one forward pass over the whole
  conformed 256^3 volume - what a straightforward replication does; the reference of every
  ratio;
- model: meshseg's inference on the same conformed volume (crop, layers, softmax);
- e2e: the whole `meshseg predict` command on the native-space example scan (load, conform,
  infer, resample, write);
- matmul: a 4096^2 float32 (and bfloat16) matrix product, the rate the convolutions could at
  best reach on this machine. Each network row states the FLOPs it computed (meshseg skips
  the background and the outer shell) and its GFLOP/s, against that limit.

Times are medians of --repeat runs. Results go to benchmarks/results/latest.{json,md}.
Usage: python benchmarks/bench_predict.py [--repeat 3] [--models ...] [--backends ...]
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
SHARED_MODEL = ROOT.parent / "shared" / "models" / "brainchop-t2-lesion-11ch" / "model.json"
MODELS = {"meshnet5": 5, "meshnet16": 16, "meshnet26": 26, "brainchop11": None}


def child(kind: str, model: str, backend: str, scan: str) -> dict:
    """One measurement in this process; returns seconds, peak RSS and GFLOP computed."""
    import resource

    import torch

    if kind == "matmul":
        return matmul_rates(torch)

    from meshseg import catalog
    from meshseg.conform import conform, to_unit_range
    from meshseg.infer import lesion_probability, resolve_device
    from meshseg.io import load_volume
    from meshseg.model import ACTIVATIONS
    from meshseg.predict import runner

    loaded = catalog.load(model)
    device = resolve_device("cuda" if backend == "cuda" else "cpu")
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
        engine, precision = {"onnx": ("onnx", "fp32"), "bf16": ("torch", "bf16")}.get(
            backend, ("torch", "fp32"))
        network, seen = runner(loaded, device, engine, precision=precision), {}

        def run(x, on_layer, keep):
            seen.update(shape=tuple(x.shape[1:]), keep=keep)
            return network(x, on_layer, keep)

        lesion_probability(volume01, run, crop=loaded.crop)
        flops = computed_flops(loaded.layers, seen["shape"],
                               None if engine == "onnx" else seen["keep"])
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
    from meshseg.infer import _regions

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


def end_to_end(model: str, backend: str, scan: Path, folder: Path) -> dict:
    """`meshseg predict` as a user runs it, timed from outside, peak RSS from wait4."""
    cmd = [sys.executable, "-m", "meshseg", "predict", str(scan), "-m", model, "-q",
           "--overwrite", "-o", str(folder / "mask.nii.gz"),
           "--device", "cuda" if backend == "cuda" else "cpu",
           "--backend", "onnx" if backend == "onnx" else "torch",
           "--precision", "bf16" if backend == "bf16" else "fp32"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {status}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024}


def make_models(folder: Path, wanted: list[str]) -> dict[str, str]:
    """Checkpoint paths per model name (random MeshNet-X weights: speed ignores values)."""
    from meshseg.model import MeshNet, MeshNetConfig
    from meshseg.weights import save_checkpoint

    paths = {}
    for name in wanted:
        if MODELS[name] is None:
            if SHARED_MODEL.exists():
                paths[name] = str(SHARED_MODEL)
            continue
        path = folder / f"{name}.safetensors"
        save_checkpoint(path, MeshNet(MeshNetConfig(channels=MODELS[name])).eval(),
                        {"note": "random weights, for timing only"})
        paths[name] = str(path)
    return paths


def median_of(repeat: int, fn, *args) -> dict:
    """Medians, per key, of `repeat` calls of fn(*args)."""
    runs = [fn(*args) for _ in range(repeat)]
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--backends", default="torch,bf16,onnx,cuda",
                        help="torch (fp32), bf16 (torch in bfloat16), onnx, cuda")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "MODEL", "BACKEND", "SCAN"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    import torch

    backends = [b for b in args.backends.split(",") if b != "cuda" or torch.cuda.is_available()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scan = folder / "example_t2.nii.gz"
        subprocess.run([sys.executable, "-m", "meshseg", "example", str(scan)], check=True,
                       cwd=ROOT, capture_output=True)
        limits = measure(["matmul", "-", "-", "-"])
        print(json.dumps({"matmul": limits}), flush=True)
        for name, model in make_models(folder, args.models.split(",")).items():
            plain_backend = "cuda" if backends == ["cuda"] else "torch"
            plain = median_of(args.repeat, measure, ["plain", model, plain_backend, str(scan)])
            for backend in backends:
                row = {"model": name, "backend": backend, "plain": plain,
                       "model_only": median_of(args.repeat, measure,
                                               ["model", model, backend, str(scan)]),
                       "e2e": median_of(args.repeat, end_to_end, model, backend, scan, folder)}
                row["ratio_model"] = row["model_only"]["seconds"] / plain["seconds"]
                row["ratio_e2e"] = row["e2e"]["seconds"] / plain["seconds"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_results(rows, limits, args)


def write_results(rows: list[dict], limits: dict, args: argparse.Namespace) -> None:
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "repeat": args.repeat, "matmul": limits}
    (args.out / "latest.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"Measured {meta['date']} on {meta['cpus']} CPUs ({meta['machine']}), torch "
             f"{meta['torch']}, median of {meta['repeat']} runs. A float32 matrix product "
             f"reached {limits['fp32_gflops']:.0f} GFLOP/s (bfloat16: "
             f"{limits['bf16_gflops']:.0f}).", "",
             "| model | backend | plain s | plain MB | plain GFLOP/s | model s | model MB | "
             "model GFLOP | model GFLOP/s | model/plain | e2e s | e2e MB | e2e/plain |",
             "|" + " --- |" * 13]
    for r in rows:
        plain, mine = r["plain"], r["model_only"]
        lines.append(
            f"| {r['model']} | {r['backend']} | {plain['seconds']:.1f} | "
            f"{plain['peak_rss_mb']:.0f} | {plain['gflop'] / plain['seconds']:.0f} | "
            f"{mine['seconds']:.1f} | {mine['peak_rss_mb']:.0f} | {mine['gflop']:.0f} | "
            f"{mine['gflop'] / mine['seconds']:.0f} | {r['ratio_model']:.2f} | "
            f"{r['e2e']['seconds']:.1f} | {r['e2e']['peak_rss_mb']:.0f} | "
            f"{r['ratio_e2e']:.2f} |")
    (args.out / "latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
