"""The main job: load -> validate -> conform -> infer -> un-conform -> write.

`segment` is the pure pipeline on a `Volume`; `segment_file` adds reading,
writing and the per-input record that cohort reports are made of.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from meshseg.archs import INSTALL_HINT
from meshseg.catalog import LoadedModel
from meshseg.conform import conform, to_unit_range, unconform
from meshseg.errors import DeviceError, MeshsegError, WeightsError
from meshseg.infer import PRECISIONS, Box, OnLayer, Runner, lesion_probability, torch_runner
from meshseg.io import WARNINGS_SEP, Volume, first_line, load_volume, save_like
from meshseg.metrics import CONNECTIVITY, largest_lesion, voxel_ml
from meshseg.validate import check_volume

Progress = Callable[[str, float], None]
"""Called with a stage name (load, conform, layers, unconform, write) and its fraction done."""



@dataclass(frozen=True)
class Outputs:
    """Where one input's results go."""

    mask: Path
    prob: Path | None = None

    def done(self) -> bool:
        """True when every requested output exists (the mask is written last)."""
        return self.mask.exists() and (self.prob is None or self.prob.exists())


@dataclass
class Result:
    """One input's outcome: a row of the cohort report."""

    input: str
    output: str
    status: str  # "ok", "skipped" or "failed"
    model: str
    device: str
    threshold: float = 0.5
    lesion_ml: float | None = None
    voxels: int | None = None
    components: int | None = None
    seconds: float = 0.0
    error: str = ""
    warnings: str = ""  # the input's header repairs, WARNINGS_SEP-separated


def runner(model: LoadedModel, device: torch.device, backend: str = "torch",
           slab: int | None = None, precision: str = "fp32") -> Runner:
    """The network on the chosen backend: layer-by-layer torch, or onnxruntime; a non-MeshNet
    architecture runs whole on torch, in tiles (`window_runner`; `slab` does not apply).

    Raises:
        WeightsError: an ONNX-only model asked to run on the torch backend, or a non-MeshNet
            model on the onnx backend.
    """
    if model.network is not None:
        if backend == "onnx":
            raise WeightsError(f"{model.name}: the onnx backend runs MeshNet models only "
                               f"({model.architecture})")
        return window_runner(model.network, model.window, device, precision)
    if backend == "onnx":
        if precision != "fp32":
            raise DeviceError(f"--precision {precision}: the onnx backend runs in fp32 only")
        from meshseg.export import onnx_runner, to_onnx  # onnx takes ~1 s to import: only here

        return onnx_runner(model.onnx or to_onnx(model.layers).SerializeToString(), device)
    if not model.layers:
        raise WeightsError(f"{model.name}: an ONNX model runs only with --backend onnx")
    return torch_runner(model.layers, device, slab=slab, precision=precision)


def window_runner(network: nn.Module, window: int, device: torch.device,
                  precision: str = "fp32") -> Runner:
    """A whole network as a `Runner`: MONAI's sliding-window inference over the crop in
    window^3 tiles (the size it trained on; 25% overlap, Gaussian-weighted blending), so
    networks tied to their training size (UNETR, U-Mamba-Enc) and crops of any shape work.

    Raises:
        DeviceError: fp16 on the CPU.
        WeightsError: MONAI is not installed.
    """
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError("--precision fp16 needs CUDA; use bf16 on the CPU")
    try:
        from monai.inferers import sliding_window_inference
    except ImportError as err:
        raise WeightsError(f"tiled inference needs MONAI: {INSTALL_HINT}") from err
    network = network.to(device).eval()

    def run(x: torch.Tensor, on_layer: OnLayer | None, keep: Box) -> torch.Tensor:
        report = on_layer or (lambda done, total: None)
        report(0, 1)
        with torch.no_grad(), torch.autocast(device.type, dtype=PRECISIONS[precision],
                                             enabled=precision != "fp32"):
            logits = sliding_window_inference(x[None].to(device), (window,) * 3, 1, network,
                                              overlap=0.25, mode="gaussian")
        report(1, 1)
        return logits[0][(slice(None), *keep)].float().cpu()

    return run


def segment(volume: Volume, run: Runner, progress: Progress | None = None,
            crop: str = "head") -> np.ndarray:
    """Lesion probability (float32) on the volume's own grid; `crop` as in lesion_probability."""
    report = progress or (lambda stage, fraction: None)
    check_volume(volume)
    report("conform", 0.0)
    conformed, record = conform(volume)
    report("conform", 1.0)
    prob = lesion_probability(to_unit_range(conformed), run, crop=crop,
                              on_layer=lambda i, n: report("layers", i / n))
    report("unconform", 0.0)
    native = unconform(prob, record)
    report("unconform", 1.0)
    return native


def to_mask(prob: np.ndarray, postprocess: str = "none", threshold: float = 0.5) -> np.ndarray:
    """Lesion where the probability exceeds `threshold` (0.5 is argmax of two classes);
    'largest' then keeps one lesion."""
    mask = prob > threshold
    if postprocess == "largest":
        mask = largest_lesion(mask)
    return mask.astype(np.uint8)


def lesion_stats(mask: np.ndarray, affine: np.ndarray) -> tuple[float, int, int]:
    """(volume in mL, voxel count, number of 26-connected lesions) of a 0/1 mask."""
    voxels = int(mask.sum())
    components = ndimage.label(mask, structure=CONNECTIVITY)[1] if voxels else 0
    return voxels * voxel_ml(affine), voxels, int(components)


def segment_file(path: Path, outputs: Outputs, model: LoadedModel, run: Runner, device: str, *,
                 overwrite: bool = False, postprocess: str | None = None,
                 threshold: float = 0.5, progress: Progress | None = None) -> Result:
    """Segment one file; user-facing problems become a failed Result, never an exception."""
    start = time.perf_counter()
    result = Result(input=str(path), output=str(outputs.mask), status="ok",
                    model=model.name, device=device, threshold=threshold)
    if outputs.done() and not overwrite:
        result.status = "skipped"
        return result
    report = progress or (lambda stage, fraction: None)
    try:
        report("load", 0.0)
        volume = load_volume(path)
        result.warnings = WARNINGS_SEP.join(volume.warnings)
        report("load", 1.0)
        prob = segment(volume, run, progress=report, crop=model.crop)
        mask = to_mask(prob, postprocess or model.postprocess, threshold)
        report("write", 0.0)
        if outputs.prob is not None:
            save_like(prob, volume, outputs.prob, np.float32)
        save_like(mask, volume, outputs.mask, np.uint8)
        report("write", 1.0)
        result.lesion_ml, result.voxels, result.components = lesion_stats(mask, volume.affine)
    except MeshsegError as err:
        result.status, result.error = "failed", str(err)
    except MemoryError:
        result.status, result.error = "failed", f"{path}: out of memory (try a smaller --slab)"
    except Exception as err:  # noqa: BLE001 - a bug must not stop the rest of the cohort
        result.status, result.error = "failed", (f"{path}: unexpected {type(err).__name__} "
                                                 f"({first_line(err)}); please report it")
    result.seconds = round(time.perf_counter() - start, 3)
    return result
