"""U-Mamba (Ma et al. 2024), nnU-Net style, written for meshseg.

A residual U-Net of 5 stages (16, 32, 64, 128, 256 features, 3^3 kernels, strides 1, 2, 2, 2,
2, conv bias, InstanceNorm3d with affine, LeakyReLU 0.01) with Mamba layers (d_state 16, d_conv
4, expand 2): after the bottleneck only (Bot), or after every encoder stage (Enc). As in the
original 3-D code the deeper half of the encoder and the last decoder stage have one residual
block instead of two, up-sampling is nearest-neighbour plus a 1x1 convolution, and a 1x1 head
is built at every decoder stage though only the full-resolution one is used (deep supervision
off); the unused heads are kept so the count is the paper's.

The Mamba layer comes from mamba_ssm (CUDA kernels) when it imports and CUDA is present, else
from the pure-PyTorch mambapy package. Both have the same parameters under the same names, so a
checkpoint trained with one loads into the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURES = (16, 32, 64, 128, 256)
STRIDES = (1, 2, 2, 2, 2)
ENCODER_BLOCKS = (2, 2, 2, 1, 1)  # the original halves the deeper encoder stages
DECODER_BLOCKS = (2, 2, 2, 1)  # lowest resolution first
CLASSES = 2


def mamba(d_model: int) -> nn.Module:
    """A Mamba mixer over (N, L, d_model) sequences: mamba_ssm on CUDA, else mambapy."""
    if torch.cuda.is_available():
        try:
            from mamba_ssm import Mamba
        except ImportError:
            pass
        else:
            return Mamba(d_model=d_model, d_state=16, d_conv=4, expand=2)
    from mambapy.mamba import MambaBlock, MambaConfig

    return MambaBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=16, d_conv=4,
                                  expand_factor=2))


class MambaLayer(nn.Module):
    """LayerNorm then Mamba over the voxels of a feature map, in float32.

    With `channel_tokens` the sequence runs over the channels and each token is a whole
    feature map (U-Mamba-Enc does this where a map has no more voxels than channels), so
    `dim` is then the voxel count.
    """

    def __init__(self, dim: int, channel_tokens: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = mamba(dim)
        self.channel_tokens = channel_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        with torch.autocast(x.device.type, enabled=False):
            tokens = x.float().flatten(2)  # (N, C, V)
            if self.channel_tokens:
                return self.mamba(self.norm(tokens)).reshape(shape)
            out = self.mamba(self.norm(tokens.transpose(1, 2)))
            return out.transpose(1, 2).reshape(shape)


class ResBlock(nn.Module):
    """conv-norm-act, conv-norm, plus the input (through a strided 1x1 convolution when
    `project`), then act: nnU-Net's residual block."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, project: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm1 = nn.InstanceNorm3d(c_out, affine=True)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(c_out, affine=True)
        self.project = nn.Conv3d(c_in, c_out, 1, stride=stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(F.leaky_relu(self.norm1(self.conv1(x)), 0.01)))
        return F.leaky_relu(y + (x if self.project is None else self.project(x)), 0.01)


def _stage(c_in: int, c_out: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """A projecting residual block, then `blocks - 1` plain ones."""
    return nn.Sequential(ResBlock(c_in, c_out, stride, project=True),
                         *(ResBlock(c_out, c_out) for _ in range(blocks - 1)))


class UMamba(nn.Module):
    """U-Mamba for (N, 1, D, H, W) inputs whose sides are multiples of 16.

    With `size` (Enc) every encoder stage ends in a Mamba layer laid out for size^3 inputs;
    without it (Bot) one Mamba layer follows the bottleneck.
    """

    def __init__(self, size: int | None = None) -> None:
        super().__init__()
        self.stem = _stage(1, FEATURES[0], ENCODER_BLOCKS[0])
        widths = (FEATURES[0],) + FEATURES
        self.encoder = nn.ModuleList(_stage(c_in, c_out, n, s) for c_in, c_out, n, s in
                                     zip(widths, FEATURES, ENCODER_BLOCKS, STRIDES))
        self.per_stage = size is not None
        self.mambas = nn.ModuleList(
            [MambaLayer(FEATURES[-1])] if size is None else
            [_encoder_mamba(c, side) for c, side in zip(FEATURES, _sides(size))])
        skips = FEATURES[-2::-1]
        self.ups = nn.ModuleList(nn.Conv3d(below, skip, 1)
                                 for below, skip in zip(FEATURES[::-1], skips))
        self.decoder = nn.ModuleList(_stage(2 * c, c, n) for c, n in zip(skips, DECODER_BLOCKS))
        self.heads = nn.ModuleList(nn.Conv3d(c, CLASSES, 1) for c in skips)
        self.apply(_he_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> logits (N, 2, D, H, W)."""
        x = self.stem(x)
        skips = []
        for index, stage in enumerate(self.encoder):
            x = stage(x)
            if self.per_stage:
                x = self.mambas[index](x)
            skips.append(x)
        if not self.per_stage:
            x = self.mambas[0](x)
        skips.pop()
        for up, stage in zip(self.ups, self.decoder):
            x = stage(torch.cat((up(F.interpolate(x, scale_factor=2, mode="nearest")),
                                 skips.pop()), 1))
        return self.heads[-1](x)


def _sides(size: int) -> list[int]:
    """Feature-map side after each encoder stage for a size^3 input."""
    sides = []
    for stride in STRIDES:
        size //= stride
        sides.append(size)
    return sides


def _encoder_mamba(channels: int, side: int) -> MambaLayer:
    """U-Mamba-Enc's rule: voxels as tokens, unless the map has no more voxels than
    channels, then channels as tokens."""
    voxels = side**3
    return MambaLayer(voxels, channel_tokens=True) if voxels <= channels else \
        MambaLayer(channels)


def _he_init(module: nn.Module) -> None:
    """nnU-Net's initialisation: He normal (LeakyReLU slope 0.01) for 3-D convolutions,
    zero biases; the Mamba layers keep their own."""
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def umamba_bot() -> UMamba:
    """U-Mamba-Bot: one Mamba layer after the bottleneck."""
    return UMamba()


def umamba_enc(size: int = 128) -> UMamba:
    """U-Mamba-Enc laid out for size^3 inputs (128 or larger gives the paper's count)."""
    return UMamba(size)
