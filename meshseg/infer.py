"""Whole-volume MeshNet inference, one layer at a time, in slabs along the first axis.

MeshNet's receptive field spans most of the head, so cutting the volume into patches would
change the result. Instead each layer runs over the whole volume, computed in slabs of rows
along D (axis i of the conformed array): a slab of output rows reads the matching input rows
plus a halo of `padding` rows on each side. Only two activation volumes exist at a time (the
layer's input and output, on the CPU); the convolution's temporary memory (and, on CUDA, the
GPU memory) is bounded by one slab. The result equals the plain full-volume forward pass.

Activations are kept channels-last, (D, H, W, C) in memory, with `margin` zero rows before and
after the volume along D: any slab plus its halo is then a dense view of that buffer (no padding
copies, one straight copy to and from the GPU), and channels-last is also the layout that the
oneDNN CPU kernels run fastest on.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from meshseg.errors import DeviceError
from meshseg.model import ACTIVATIONS, FoldedLayer

# Automatic slab size: rows whose input + output activations of a layer fill this many bytes.
# On the CPU the slab only bounds the convolution's scratch memory (inputs are views), and
# speed hardly depends on it; on CUDA a slab is what sits on the GPU, so use a share of the free
# memory and leave the rest to cuDNN's workspace and the caching allocator.
CPU_SLAB_BYTES = 64 * 2**20
CUDA_FREE_SHARE = 8

BYTES_PER_FLOAT = 4


def _slab_rows(layer: FoldedLayer, shape_dhw: tuple[int, int, int], device: torch.device,
               slab: int | None) -> int:
    """Rows per slab: `slab` when given, else the byte budget divided by one row's in+out size."""
    depth, height, width = shape_dhw
    if slab is not None:
        return min(slab, depth)
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = free_bytes // CUDA_FREE_SHARE
    else:
        budget = CPU_SLAB_BYTES
    c_out, c_in = layer.weight.shape[:2]
    row_bytes = (c_in + c_out) * height * width * BYTES_PER_FLOAT  # an upper bound for halves
    return int(min(depth, max(1, budget // row_bytes)))


def _channels_last_buffer(channels: int, depth: int, height: int, width: int, margin: int,
                          pin: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (1, C, margin + D + margin, H, W) float32 tensor stored as (D, H, W, C), margins zeroed.

    Built as a permuted view rather than with memory_format= so pinned allocation (CUDA) needs
    no extra support; slicing it along D keeps it a dense channels-last block.
    """
    storage = torch.empty((1, depth + 2 * margin, height, width, channels), pin_memory=pin,
                          dtype=dtype)
    buffer = storage.permute(0, 4, 1, 2, 3)
    buffer[:, :, :margin].zero_()
    buffer[:, :, margin + depth:].zero_()
    return buffer


Box = tuple[slice, slice, slice]


def _regions(layers: list[FoldedLayer], shape_dhw: tuple[int, int, int], keep: Box) -> list[Box]:
    """Per layer, the part of its output that the kept part of the final output depends on.

    A layer's output is read by the next layer within its padding, so going backwards from
    `keep` each earlier region grows by the paddings of the layers after it (clipped to the
    volume). Computing only these regions gives exactly the full-volume values inside `keep`
    and saves the outer shell of the later layers.
    """
    regions, grow = [], 0
    for layer in reversed(layers):
        regions.append(tuple(slice(max(k.start - grow, 0), min(k.stop + grow, n))
                             for k, n in zip(keep, shape_dhw)))
        grow += layer.padding
    return regions[::-1]


def _window_pads(region: slice, pad: int, size: int) -> tuple[slice, int, int]:
    """Input index range of an output range widened by `pad`, and the zeros it lacks per side."""
    low, high = region.start - pad, region.stop + pad
    return slice(max(low, 0), min(high, size)), max(-low, 0), max(high - size, 0)


def _run_layer(x: torch.Tensor, out: torch.Tensor, layer: FoldedLayer, margin: int,
               rows: int, device: torch.device, region: Box) -> None:
    """out[region] = act(conv(x)), slab by slab along D; x and out are margin buffers.

    Rows beyond the volume along D fall in the zeroed margin, which is exactly the zero
    padding that padding=dilation gives at the border. Along H and W the window is widened by
    the padding and zero-padded where it leaves the volume (by the convolution itself when
    both sides need the same amount, as for a full-width region).
    """
    pad = layer.padding
    weight = layer.weight.to(device, out.dtype)
    bias = layer.bias.to(device, out.dtype)
    activation = ACTIVATIONS[layer.activation](inplace=True) if layer.activation else None
    on_cuda = device.type == "cuda"
    rows_d, rows_h, rows_w = region
    window_h, top, bottom = _window_pads(rows_h, pad, x.shape[3])
    window_w, left, right = _window_pads(rows_w, pad, x.shape[4])
    symmetric = top == bottom and left == right
    for start in range(rows_d.start, rows_d.stop, rows):
        stop = min(start + rows, rows_d.stop)
        window = x[:, :, margin + start - pad:margin + stop + pad, window_h, window_w]
        if on_cuda:
            window = window.to(device, non_blocking=True)
        if symmetric:
            y = F.conv3d(window, weight, bias, padding=(0, top, left), dilation=layer.dilation)
        else:
            window = F.pad(window, (left, right, top, bottom))
            y = F.conv3d(window, weight, bias, dilation=layer.dilation)
        if activation is not None:
            y = activation(y)
        out[:, :, margin + start:margin + stop, rows_h, rows_w].copy_(y, non_blocking=on_cuda)
    if on_cuda:
        # The copies back to (pinned) host memory are asynchronous: wait before the host reads.
        torch.cuda.synchronize(device)


def run_layers(x: torch.Tensor, layers: list[FoldedLayer], device: torch.device,
               slab: int | None = None,
               on_layer: Callable[[int, int], None] | None = None,
               keep: Box | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run the folded network over a whole volume: (C_in, D, H, W) -> logits (n_classes, D, H, W).

    `keep` (a box of D, H, W slices; default all) is the part of the output wanted: the result
    is then the logits inside `keep` only, equal to those of the full-volume pass, and each
    layer computes just the region that they depend on (see `_regions`).

    `dtype` torch.bfloat16 (or float16 on CUDA) computes and stores activations in half
    precision: half the memory, and faster where the hardware has bf16 units (AMX, tensor
    cores); logits differ from float32 by about 1e-2 relative. The result is float32.

    x is float32 on the CPU; the result is float32 on the CPU. Each layer is computed in slabs of
    `slab` rows along D (None: chosen per layer so that one slab's input + output take about
    64 MiB on the CPU, or 1/8 of the free GPU memory on CUDA). On CUDA each input slab with its
    halo is copied to the GPU, convolved, and copied back into pinned host memory, so GPU memory
    stays bounded by one slab whatever the volume size. `on_layer(done, total)` is called after
    each layer with done = 1 .. total.

    CUDA convolutions follow PyTorch's global precision settings (cuDNN may use TF32 on Ampere
    and newer GPUs, about 1e-3 relative error); this function does not change them.

    Raises:
        ValueError: x is not a 4-D float32 CPU tensor matching the first layer, or slab < 1.
    """
    if x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"run_layers needs a 4-D float32 CPU tensor, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    if not layers:
        raise ValueError("run_layers needs at least one layer")
    if x.shape[0] != layers[0].weight.shape[1]:
        raise ValueError(f"input has {x.shape[0]} channels; the first layer expects "
                         f"{layers[0].weight.shape[1]}")
    if slab is not None and slab < 1:
        raise ValueError(f"slab must be a positive number of rows, got {slab}")
    _, depth, height, width = x.shape
    keep = keep or (slice(0, depth), slice(0, height), slice(0, width))
    regions = _regions(layers, (depth, height, width), keep)
    margin = max(layer.padding for layer in layers)
    pin = device.type == "cuda"
    with torch.inference_mode():
        current = _channels_last_buffer(x.shape[0], depth, height, width, margin, pin, dtype)
        current[0, :, margin:margin + depth].copy_(x)
        for index, (layer, region) in enumerate(zip(layers, regions)):
            # Only `region` of each buffer is written; the rest is never read (see _regions).
            out = _channels_last_buffer(layer.weight.shape[0], depth, height, width, margin, pin,
                                        dtype)
            shape = tuple(r.stop - r.start for r in region)
            rows = _slab_rows(layer, shape, device, slab)
            _run_layer(current, out, layer, margin, rows, device, region)
            current = out  # the previous input is released here: two volumes at a time
            if on_layer is not None:
                on_layer(index + 1, len(layers))
    kept_d = slice(margin + keep[0].start, margin + keep[0].stop)
    # Cloned outside inference mode: callers get an ordinary tensor they may modify in place.
    return current[0, :, kept_d, keep[1], keep[2]].to(torch.float32, copy=True,
                                                      memory_format=torch.contiguous_format)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Smallest box (one slice per axis) holding every True voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


OnLayer = Callable[[int, int], None]
Runner = Callable[[torch.Tensor, OnLayer | None, Box], torch.Tensor]
"""A network on some backend: ((C_in, D, H, W) float32 CPU tensor, on_layer, keep box) ->
logits inside the box (n_classes, d, h, w) on the CPU; on_layer(done, total) reports progress."""


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_runner(layers: list[FoldedLayer], device: torch.device,
                 slab: int | None = None, precision: str = "fp32") -> Runner:
    """The layer-by-layer PyTorch backend as a `Runner`.

    Raises:
        DeviceError: fp16 on the CPU (PyTorch's CPU convolutions have no fast float16 path).
    """
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError("--precision fp16 needs CUDA; use bf16 on the CPU")
    dtype = PRECISIONS[precision]
    return lambda x, on_layer, keep: run_layers(x, layers, device, slab=slab,
                                                on_layer=on_layer, keep=keep, dtype=dtype)


# The head: connected voxels brighter than this share of the 99th percentile. Background
# noise of T2 scans sits well below it once conformed; scalp and brain sit well above.
HEAD_LEVEL = 0.08
HEAD_SLACK = 4  # voxels added around the detected head before the network's margin


def head_box(volume01: np.ndarray) -> Box:
    """Bounding box of the head: the largest connected region above the background noise.

    Found on a 2x subsampled copy (the box only needs voxel accuracy after the slack), it is
    widened by HEAD_SLACK and never exceeds the box of the voxels > 0, so a scan with a zero
    background is cropped exactly as brainchop crops it.
    """
    nonzero = _bounding_box(volume01 > 0)
    coarse = volume01[::2, ::2, ::2]
    level = HEAD_LEVEL * float(np.percentile(coarse[coarse > 0], 99))
    labels, count = ndimage.label(coarse > level)
    if count == 0:
        return nonzero
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    box = _bounding_box(labels == largest)
    return tuple(slice(max(2 * b.start - HEAD_SLACK, n.start), min(2 * b.stop + HEAD_SLACK, n.stop))
                 for b, n in zip(box, nonzero))


def lesion_probability(volume01: np.ndarray, run: Runner, margin: int = 18,
                       on_layer: OnLayer | None = None, crop: str = "nonzero") -> np.ndarray:
    """Lesion (class 1) probability for a conformed volume scaled to 0..1, as brainchop runs it.

    The network sees the bounding box of the voxels > 0 padded with `margin` zero voxels on
    every side (brainchop's 18), whether or not the box touches the volume border, so the
    context beyond the head is zeros either way. Softmax over the classes gives probabilities;
    like brainchop, which removes the padding before putting labels back, only the bounding box
    is written: the result is float32 of volume01's shape, 0 outside the box. An all-zero
    volume returns zeros without running the network.
    """
    volume01 = np.asarray(volume01, dtype=np.float32)
    if volume01.ndim != 3:
        raise ValueError(f"lesion_probability needs a 3-D volume, got shape {volume01.shape}")
    probability = np.zeros(volume01.shape, dtype=np.float32)
    foreground = volume01 > 0
    if not foreground.any():
        return probability
    box = head_box(volume01) if crop == "head" else _bounding_box(foreground)
    cropped = np.pad(volume01[box], margin)  # brainchop pads with zeros, not with image voxels
    inner = tuple(slice(margin, n - margin) for n in cropped.shape)
    logits = run(torch.from_numpy(cropped)[None], on_layer, inner)
    probability[box] = torch.softmax(logits, dim=0)[1].numpy()
    return probability


_CUDA_NAME = re.compile(r"cuda(:\d+)?")


def resolve_device(name: str) -> torch.device:
    """Turn a --device value into a torch device, never falling back silently.

    "auto" -> the first CUDA device when CUDA works, else the CPU; "cpu"; "cuda" / "cuda:N".

    Raises:
        DeviceError: an unknown name, or CUDA (or device N) that this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not _CUDA_NAME.fullmatch(name):
        raise DeviceError(f"--device {name}: unknown device (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        reason = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
                  else "no usable NVIDIA GPU or driver was found")
        raise DeviceError(f"--device {name}: CUDA is not available on this machine ({reason})")
    device = torch.device(name)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"--device {name}: this machine has {count} CUDA device(s) "
                          f"(cuda:0 to cuda:{count - 1})")
    return device
