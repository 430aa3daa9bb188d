"""MedNeXt v1 (Roy et al. 2023): a U-Net of ConvNeXt blocks, written for meshseg.

MONAI's MedNeXt uses other expansion ratios in its down-sampling blocks and does not give the
paper's counts; this follows the original v1 design: 32 base channels, kernel 3, GroupNorm with
one group per channel, no deep supervision, residual blocks. Stages run at 32, 64, 128, 256
and 512 channels; skips are added, not concatenated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BASE_CHANNELS = 32
KERNEL = 3
LEVELS = 4  # down-sampling steps; 9 stages = 4 down, bottleneck, 4 up


class Block(nn.Module):
    """Depthwise k^3 convolution, GroupNorm, 1x1 expansion by `ratio`, GELU, 1x1 compression.

    `step` 2 makes the depthwise convolution down-sample (`up` False) or up-sample (`up` True,
    transposed, padded by one voxel at the start of each axis to exactly double the size).
    A residual connection is added when `residual`: the identity for step 1, else a strided
    1x1 (transposed) convolution.
    """

    def __init__(self, c_in: int, c_out: int, ratio: int, residual: bool, step: int = 1,
                 up: bool = False) -> None:
        super().__init__()
        conv = nn.ConvTranspose3d if up else nn.Conv3d
        self.up = up
        self.depthwise = conv(c_in, c_in, KERNEL, stride=step, padding=KERNEL // 2, groups=c_in)
        self.norm = nn.GroupNorm(c_in, c_in)
        self.expand = nn.Conv3d(c_in, ratio * c_in, 1)
        self.compress = nn.Conv3d(ratio * c_in, c_out, 1)
        self.residual = residual
        self.shortcut = conv(c_in, c_out, 1, stride=step) if residual and step > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.compress(F.gelu(self.expand(self.norm(self.depthwise(x)))))
        if self.up:
            y = F.pad(y, (1, 0, 1, 0, 1, 0))
        if not self.residual:
            return y
        if self.shortcut is None:
            return x + y
        shortcut = self.shortcut(x)
        return y + (F.pad(shortcut, (1, 0, 1, 0, 1, 0)) if self.up else shortcut)


class MedNeXt(nn.Module):
    """MedNeXt v1 with per-stage expansion `ratios` and block `counts` (9 stages each).

    `resample_residual` adds the residual 1x1 paths to the down- and up-sampling blocks.
    """

    def __init__(self, ratios: tuple[int, ...], counts: tuple[int, ...],
                 resample_residual: bool) -> None:
        super().__init__()
        widths = [BASE_CHANNELS * 2 ** min(i, 2 * LEVELS - i) for i in range(2 * LEVELS + 1)]
        self.stem = nn.Conv3d(1, BASE_CHANNELS, 1)
        self.stages = nn.ModuleList(
            nn.Sequential(*(Block(w, w, r, True) for _ in range(n)))
            for w, r, n in zip(widths, ratios, counts))
        self.resamplers = nn.ModuleList(
            Block(widths[i], widths[i + 1], ratios[i + 1], resample_residual, step=2,
                  up=i >= LEVELS)
            for i in range(2 * LEVELS))
        self.head = nn.ConvTranspose3d(BASE_CHANNELS, 2, 1)
        # The original keeps a one-value parameter to work around a checkpointing bug; kept
        # (never used) so the parameter count is the paper's.
        self.dummy = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> logits (N, 2, D, H, W); D, H, W multiples of 16."""
        x = self.stem(x)
        skips = []
        for level in range(LEVELS):
            x = self.stages[level](x)
            skips.append(x)
            x = self.resamplers[level](x)
        x = self.stages[LEVELS](x)
        for level in range(LEVELS, 2 * LEVELS):
            x = self.stages[level + 1](self.resamplers[level](x) + skips.pop())
        return self.head(x)


_B_RATIOS = (2, 3, 4, 4, 4, 4, 4, 3, 2)


def mednext_s() -> MedNeXt:
    """MedNeXt-S: expansion 2, two blocks per stage; the paper's count has no residual
    paths around the resampling blocks (the original S preset has them: 5,550,915)."""
    return MedNeXt((2,) * 9, (2,) * 9, resample_residual=False)


def mednext_b() -> MedNeXt:
    """MedNeXt-B: expansion 2-4, two blocks per stage, residual resampling."""
    return MedNeXt(_B_RATIOS, (2,) * 9, resample_residual=True)


def mednext_m() -> MedNeXt:
    """MedNeXt-M: as B with 3-4 blocks per stage."""
    return MedNeXt(_B_RATIOS, (3, 4, 4, 4, 4, 4, 4, 4, 3), resample_residual=True)
