"""Whole-volume MeshNet inference: a wavefront of slabs moving through all layers at once.

MeshNet's receptive field spans most of the head, so cutting the volume into patches would
change the result. Instead every layer runs over the whole volume, in slabs of rows along D
(axis i of the conformed array). A slab of a layer's output needs the same rows of the layer
below plus a halo of `padding` rows on each side, so all layers move down the volume together:
each layer keeps only the rows its successor still needs, a sliding window of about
2 * padding + 2 slabs rows, instead of whole activation volumes. Memory is then a fixed
number of rows whatever the depth of the volume, and on CUDA every window lives on the GPU.

Each layer is also computed only where the kept part of the final output depends on it
(`_regions`), so the later layers skip the outer shell. The result equals the plain
full-volume forward pass.

Activations are channels-last (D, H, W, C in memory), the layout oneDNN's CPU kernels run
fastest on; a slab's input rows are then a dense view of a window, without copies.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from meshseg.errors import DeviceError, WeightsError
from meshseg.models.meshnet import ACTIVATIONS, FoldedLayer

# Automatic slab size: rows whose input + output activations of a layer fill this many bytes.
# Windows hold about two slabs beyond their halo, so smaller slabs mean less memory; below a
# few rows the convolution calls get too small to run at full speed. 16 MiB ran as fast as 32
# on three real scans (2 cores, 2026-12-02: 2.2-4.9 s against 2.7-5.0 s) with ~200 MB less at
# peak; 8 and 12 MiB were slower on one or two of them.
CPU_SLAB_BYTES = 16 * 2**20
CUDA_FREE_SHARE = 16

BYTES_PER_FLOAT = 4
WINDOW_SLACK = 0.25  # free rows per window, as a share of its two slabs; see _Rows
Box = tuple[slice, slice, slice]


def _slab_rows(layer: FoldedLayer, shape_dhw: tuple[int, int, int], device: torch.device,
               slab: int | None) -> int:
    """Rows per slab: `slab` when given, else the byte budget divided by one row's in+out size."""
    depth, height, width = shape_dhw
    if slab is not None:
        return max(1, min(slab, depth))
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = free_bytes // CUDA_FREE_SHARE
    else:
        budget = CPU_SLAB_BYTES
    c_out, c_in = layer.weight.shape[:2]
    row_bytes = (c_in + c_out) * height * width * BYTES_PER_FLOAT  # an upper bound for halves
    return int(min(depth, max(1, budget // row_bytes)))


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


def _window_pads(region: slice, pad: int, low_bound: int,
                 high_bound: int) -> tuple[slice, int, int]:
    """Input index range of an output range widened by `pad`, clipped to what the source holds
    ([low_bound, high_bound)), and the zeros it lacks per side."""
    low, high = region.start - pad, region.stop + pad
    return (slice(max(low, low_bound), min(high, high_bound)), max(low_bound - low, 0),
            max(high - high_bound, 0))


@dataclass
class _Rows:
    """Rows [start, stop) of one layer's output along D, over the H and W extent it holds.

    A layer's rows run over [first, last): the rows its consumer reads, including the zero rows
    that stand for the consumer's padding beyond the volume (so no slab is ever padded in D by
    a copy). Row `start` sits at buffer index `offset`. Forgetting rows only moves `start`; the held
    rows are moved to the buffer's front only when an extend would run past its end, so each
    row is copied about once rather than once per slab (deep halos made that the main cost).
    """

    data: torch.Tensor  # (1, C, capacity, h, w)
    start: int
    stop: int
    height: slice
    width: slice
    first: int
    last: int
    offset: int = 0

    def rows(self, low: int, high: int) -> torch.Tensor:
        return self.data[:, :, self.offset + low - self.start:self.offset + high - self.start]

    def forget_below(self, row: int) -> None:
        """Drop rows before `row` (no longer needed)."""
        new_start = min(max(row, self.start), self.stop)
        self.offset += new_start - self.start
        self.start = new_start

    def room(self) -> int:
        return self.data.shape[2] - (self.stop - self.start)

    def extend(self, rows: int) -> torch.Tensor:
        """Take the next `rows` rows and return their (uninitialised) buffer for the caller to
        fill, so that a slab's activation is written straight into the window (one pass)."""
        held = self.stop - self.start
        if self.offset + held + rows > self.data.shape[2]:
            self._compact()
        self.stop += rows
        return self.data[:, :, self.offset + held:self.offset + held + rows]

    def _compact(self) -> None:
        """Move the held rows to the buffer's front in pieces no longer than the gap, so that
        no piece overlaps its destination (overlapping copies are undefined in PyTorch)."""
        held, gap = self.stop - self.start, self.offset
        if gap == 0:
            raise RuntimeError("window buffer full (a bug in meshseg.infer's schedule)")
        for first in range(0, held, gap):
            count = min(gap, held - first)
            self.data[:, :, first:first + count] = self.data[:, :, gap + first:gap + first + count]
        self.offset = 0


def _window_buffer(channels: int, rows: int, region: Box, span: tuple[int, int],
                   dtype: torch.dtype, device: torch.device) -> _Rows:
    """An empty channels-last window of `rows` rows over a region's H and W extent, for the
    rows span [first, last) of a layer's output."""
    height, width = region[1].stop - region[1].start, region[2].stop - region[2].start
    storage = torch.empty((1, rows, height, width, channels), dtype=dtype, device=device)
    return _Rows(storage.permute(0, 4, 1, 2, 3), span[0], span[0], region[1], region[2],
                 *span)


def _slab(source: _Rows, layer: FoldedLayer, weight: torch.Tensor, bias: torch.Tensor,
          rows: slice, region: Box, shape_dhw: tuple[int, int, int],
          device: torch.device) -> torch.Tensor:
    """conv(input), before the activation, for output `rows` over the region's H and W:
    (1, C_out, rows, h, w).

    The input is the source's rows widened by the padding; wherever that leaves the volume the
    missing rows and columns are zeros, exactly as padding=dilation gives at the border. Window
    buffers hold their zero rows, so only the network's input is ever padded in D by a copy.
    """
    pad = layer.padding
    depth_in, low, high = _window_pads(rows, pad, source.first, source.last)
    height_in, top, bottom = _window_pads(region[1], pad, 0, shape_dhw[1])
    width_in, left, right = _window_pads(region[2], pad, 0, shape_dhw[2])
    window = source.rows(depth_in.start, depth_in.stop)[
        :, :, :, height_in.start - source.height.start:height_in.stop - source.height.start,
        width_in.start - source.width.start:width_in.stop - source.width.start]
    window = window.to(device, weight.dtype, non_blocking=True)
    if not (low == high and top == bottom and left == right):
        window = F.pad(window, (left, right, top, bottom, low, high))
        low, top, left = 0, 0, 0
    return _conv3d(window, weight, bias, (low, top, left), layer.dilation)


# act(y) written into a window in one pass: activating in place and then copying read and
# wrote every activation twice. aten's out= variants run the same vectorised kernels as
# nn.ELU / nn.ReLU when y and out share their layout.
_ACTIVATE_INTO: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {
    "relu": lambda y, out: torch.clamp(y, min=0, out=out),
    "elu": lambda y, out: torch.ops.aten.elu.out(y, out=out),
}


def _activate_into(y: torch.Tensor, activation: str | None, out: torch.Tensor) -> None:
    """out = act(y), bit for bit as the activation module gives it; out is channels-last.

    A y in another layout (the first layer's, from a single input channel) would make aten
    iterate element by element with scalar maths, whose last bit can differ from the
    vectorised kernel's: that y is activated in place and copied.
    """
    if activation is None:
        out.copy_(y)
    elif y.is_contiguous(memory_format=torch.channels_last_3d):
        _ACTIVATE_INTO[activation](y, out)
    else:
        out.copy_(ACTIVATIONS[activation](inplace=True)(y))


def _conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            padding: tuple[int, int, int], dilation: int) -> torch.Tensor:
    """F.conv3d, but straight to oneDNN on the CPU: PyTorch's heuristic sends thin slabs with
    few input channels (the first layer) to a generic kernel about 10x slower."""
    if x.device.type == "cpu" and torch.backends.mkldnn.is_available():
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), [1, 1, 1],
                                                 [dilation] * 3, 1)
    return F.conv3d(x, weight, bias, padding=padding, dilation=dilation)


def _input_strides(x: torch.Tensor) -> torch.Tensor:
    """(1, C, D, H, W) view of the network's input; a single channel gets channels-last strides.

    With one channel both layouts hold the same bytes, and PyTorch then tells oneDNN the
    classic one: oneDNN wrote the first layer's output in a blocked layout and reordered it
    back, which took as long as the convolution. Channels-last strides make it write the
    channels-last output the windows use.
    """
    x = x.contiguous()[None]
    if x.shape[1] != 1:
        return x
    depth, height, width = x.shape[2:]
    return x.as_strided(x.shape, (depth * height * width, 1, height * width, width, 1))


def _slab_stop(start: int, rows: int, end: int, depth: int) -> int:
    """End of the slab from `start`: at most `rows` rows, never across the volume's edges, so
    a slab is either all zero padding or all inside the volume."""
    edge = 0 if start < 0 else depth if start < depth else end
    return min(start + rows, end, edge)


def _pointwise(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 convolution as one matrix product over the channels-last slab (PyTorch sends
    small 1x1x1 convolutions to a slow generic kernel)."""
    out = F.linear(y.permute(0, 2, 3, 4, 1), weight.flatten(1), bias)
    return out.permute(0, 4, 1, 2, 3)


def run_layers(x: torch.Tensor, layers: list[FoldedLayer], device: torch.device,
               slab: int | None = None,
               on_layer: Callable[[int, int], None] | None = None,
               keep: Box | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run the folded network over a whole volume: (C_in, D, H, W) -> logits (n_classes, D, H, W).

    x is float32 on the CPU; the result is float32 on the CPU. Layers advance together in slabs
    of `slab` rows along D (None: per layer, so that a slab's input + output take about 16 MiB
    on the CPU, or 1/16 of the free GPU memory on CUDA); each layer holds only the rows still
    needed above it. On CUDA the windows and weights live on the GPU and only the input rows
    and the final logits cross the bus. `on_layer(done, total)` reports progress in slabs.

    `keep` (a box of D, H, W slices; default all) is the part of the output wanted: the result
    is then the logits inside `keep` only, equal to those of the full-volume pass, and each
    layer computes just the region that they depend on (see `_regions`).

    `dtype` torch.bfloat16 (or float16 on CUDA) computes and stores activations in half
    precision: half the memory (not faster on the CPUs measured: oneDNN's bf16 dilated
    convolutions are slower than float32, see docs/benchmarks.md);
    logits differ from float32 by about 1e-2 relative. The result is float32.

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
    shape = tuple(x.shape[1:])
    keep = keep or tuple(slice(0, n) for n in shape)
    # A final linear 1x1x1 layer (MeshNet's classifier) runs on each slab of the layer before it, so
    # that layer's output never needs a window of its own.
    head = (layers[-1] if len(layers) > 1 and layers[-1].weight.shape[-1] == 1
            and layers[-1].activation is None else None)
    body = layers[:-1] if head is not None else layers
    regions = _regions(layers, shape, keep)[:len(body)]
    rows = [_slab_rows(layer, tuple(r.stop - r.start for r in region), device, slab)
            for layer, region in zip(body, regions)]
    total = sum(math.ceil((r[0].stop - r[0].start) / n) for r, n in zip(regions, rows))
    # Made outside inference mode: callers get an ordinary tensor they may modify in place.
    result = torch.empty((layers[-1].weight.shape[0], *(k.stop - k.start for k in keep)))
    # Each layer's output rows: what its consumer reads, zero rows beyond the volume included.
    spans = [(regions[i + 1][0].start - body[i + 1].padding,
              regions[i + 1][0].stop + body[i + 1].padding) for i in range(len(body) - 1)]
    spans.append((regions[-1][0].start, regions[-1][0].stop))
    with torch.inference_mode():
        weights = [(layer.weight.to(device, dtype), layer.bias.to(device, dtype))
                   for layer in layers]
        sources = [_Rows(_input_strides(x), 0, shape[0], slice(0, shape[1]),
                         slice(0, shape[2]), 0, shape[0])]
        for index, layer in enumerate(body[:-1]):  # window: 2 slabs, the next halo, slack
            window_rows = (math.ceil((1 + WINDOW_SLACK) * (rows[index] + rows[index + 1]))
                           + 2 * body[index + 1].padding)
            sources.append(_window_buffer(layer.weight.shape[0], window_rows, regions[index],
                                          spans[index], dtype, device))
        next_row = [span[0] for span in spans]
        done = 0
        while next_row[-1] < spans[-1][1]:
            progressed = False
            for index, layer in enumerate(body):
                start, end = next_row[index], spans[index][1]
                if start >= end:
                    continue  # finished
                zeros = start < 0 or start >= shape[0]  # rows of padding beyond the volume
                stop = _slab_stop(start, rows[index], end, shape[0])
                source = sources[index]
                if not zeros and source.stop < min(stop + layer.padding, source.last):
                    continue  # its input rows are not computed yet
                last = index == len(body) - 1
                if not last:
                    target = sources[index + 1]
                    target.forget_below(next_row[index + 1] - body[index + 1].padding)
                    if target.room() < stop - start:
                        continue  # the next layer must consume first
                next_row[index] = stop
                progressed = True
                if zeros:
                    target.extend(stop - start).zero_()
                    continue
                y = _slab(source, layer, *weights[index], slice(start, stop), regions[index],
                          shape, device)
                if last:
                    if layer.activation is not None:
                        y = ACTIVATIONS[layer.activation](inplace=True)(y)
                    if head is not None:
                        y = _pointwise(y, *weights[-1])
                    result[:, start - keep[0].start:stop - keep[0].start] = y[0].float().cpu()
                else:
                    _activate_into(y, layer.activation, target.extend(stop - start))
                done += 1
                if on_layer is not None:
                    on_layer(done, total)
            if not progressed:
                raise RuntimeError("layer-by-layer schedule stalled (a bug in meshseg.infer)")
    return result


def _bounding_box(mask: np.ndarray) -> Box:
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


def check_classes(name: str, n_classes: int) -> None:
    """Raises WeightsError unless the model gives two classes (background, lesion): any
    other count would still give a mask, of the wrong class."""
    if n_classes != 2:
        raise WeightsError(f"{name}: the model gives {n_classes} classes; meshseg needs 2 "
                           "(background, lesion)")


def cpu_has_bf16() -> bool:
    """Whether oneDNN can run bf16 convolutions on this CPU (AVX-512 BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, before any scan is read, a precision this device cannot compute.

    Raises:
        DeviceError: fp16 on the CPU (PyTorch's CPU convolutions have no fast float16 path),
            or bf16 on a CPU without bf16 instructions (oneDNN refuses its convolutions).
    """
    if device.type == "cuda":
        return
    if precision == "fp16":
        raise DeviceError("--precision fp16 needs CUDA; use bf16 on the CPU")
    if precision == "bf16" and not cpu_has_bf16():
        raise DeviceError("--precision bf16: this CPU has no bf16 instructions (AVX-512 BF16 "
                          "or AMX); use fp32")


def torch_runner(layers: list[FoldedLayer], device: torch.device,
                 slab: int | None = None, precision: str = "fp32") -> Runner:
    """The layer-by-layer PyTorch backend as a `Runner`.

    Raises:
        DeviceError: see `check_precision`.
    """
    check_precision(precision, device)
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

    The network sees a box of the volume padded with `margin` zero voxels on every side
    (brainchop's 18), whether or not the box touches the volume border, so the context beyond
    it is zeros either way: with crop="nonzero" brainchop's box of the voxels > 0, with
    crop="head" the head's box (`head_box`). Softmax over the classes gives probabilities.
    Only the head's box is computed and written (the result is float32 of volume01's shape, 0
    elsewhere): on a zero background it equals brainchop's box, and where noise makes the box
    of the voxels > 0 the whole volume, computing outside the head could only find lesions in
    noise (and `run` skips the work that only those voxels need). An all-zero volume returns
    zeros without running the network.
    """
    volume01 = np.asarray(volume01, dtype=np.float32)
    if volume01.ndim != 3:
        raise ValueError(f"lesion_probability needs a 3-D volume, got shape {volume01.shape}")
    if not (volume01 > 0).any():
        return np.zeros(volume01.shape, dtype=np.float32)
    head = head_box(volume01)
    box = head if crop == "head" else _bounding_box(volume01 > 0)
    cropped = np.pad(volume01[box], margin)  # brainchop pads with zeros, not with image voxels
    keep = tuple(slice(h.start - b.start + margin, h.stop - b.start + margin)
                 for h, b in zip(head, box))
    shape = volume01.shape
    del volume01  # lower peak memory: freed during the run when the caller keeps no reference
    logits = run(torch.from_numpy(cropped)[None], on_layer, keep)
    del cropped
    probability = np.zeros(shape, dtype=np.float32)  # made late: lower peak memory
    probability[head] = torch.softmax(logits, dim=0)[1].numpy()
    return probability


_CUDA_NAME = re.compile(r"cuda(:\d+)?")


def resolve_device(name: str) -> torch.device:
    """Turn a --device value into a torch device, never falling back silently.

    "auto" -> the first CUDA device when CUDA works, else the CPU; "cpu"; "cuda" / "cuda:N".

    Raises:
        DeviceError: an unknown name, MPS, or CUDA (or device N) that this machine does not
            have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.split(":")[0] == "mps":  # a Mac user's first try
        raise DeviceError(f"--device {name}: Apple's MPS is not supported; use --device cpu")
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


ITK_THREADS_VARIABLE = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"


def set_threads(threads: int | None) -> int:
    """Use at most `threads` CPU threads (None: leave torch's own choice, one per core), and
    return the count torch now uses.

    Users on shared nodes or SLURM allocations need meshseg to stay within their cores:
    torch's intra-op pool sizes itself to the whole machine. The same count goes to
    SimpleITK (QC registration; through ITK's environment variable when it is not imported
    yet, so that nothing is imported here) and to OMP_NUM_THREADS for OpenMP libraries
    started later (OpenVINO, data-loading workers).

    Raises:
        ValueError: threads < 1.
    """
    if threads is None:
        return torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ[ITK_THREADS_VARIABLE] = str(threads)
    if "SimpleITK" in sys.modules:
        sys.modules["SimpleITK"].ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return torch.get_num_threads()
