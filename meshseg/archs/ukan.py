"""A 3-D U-KAN (after Li et al. 2024, whose code is 2-D), with its KAN layer, written for meshseg.

Three convolutional encoder stages (32, 64, 256 channels, each followed by 2x max-pooling),
then two tokenised KAN stages (strided 3^3 patch embeddings to 320 and 512 channels), and a
decoder that mirrors them with additive skips and trilinear 2x up-sampling. A KAN block is
LayerNorm, then three times (KAN linear layer over the channels, depthwise 3^3 convolution,
batch norm, ReLU), added to its input. Embedding widths 256, 320, 512 as in the original.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EMBED = (256, 320, 512)
GRID_SIZE, SPLINE_ORDER, GRID_RANGE = 5, 3, (-1.0, 1.0)


class KANLinear(nn.Module):
    """A Kolmogorov-Arnold layer in the efficient-KAN form: out = W_b silu(x) + W_s B(x).

    B(x) holds, per input feature, the GRID_SIZE + SPLINE_ORDER cubic B-spline bases on a
    uniform grid over GRID_RANGE (extended by SPLINE_ORDER knots each side), so each
    input-output pair has a learnable spline; `spline_scaler` scales each spline as a whole.
    """

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        low, high = GRID_RANGE
        self.step = (high - low) / GRID_SIZE
        knots = low + self.step * torch.arange(-SPLINE_ORDER, GRID_SIZE + SPLINE_ORDER + 1)
        self.register_buffer("knots", knots.float(), persistent=False)
        n_bases = GRID_SIZE + SPLINE_ORDER
        self.base_weight = nn.Parameter(torch.empty(n_out, n_in))
        self.spline_weight = nn.Parameter(torch.empty(n_out, n_in, n_bases))
        self.spline_scaler = nn.Parameter(torch.empty(n_out, n_in))
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5))
        # small random splines, of the size efficient-KAN's noise initialisation gives
        nn.init.uniform_(self.spline_weight, -0.05 / GRID_SIZE, 0.05 / GRID_SIZE)

    def bases(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n_in) -> (..., n_in, GRID_SIZE + SPLINE_ORDER) by the Cox-de Boor recursion;
        inside GRID_RANGE the bases of each feature sum to 1."""
        x = x.unsqueeze(-1)
        k = self.knots
        b = ((x >= k[:-1]) & (x < k[1:])).to(x.dtype)
        for order in range(1, SPLINE_ORDER + 1):
            width = order * self.step  # uniform knots: every support has the same width
            b = ((x - k[:-order - 1]) * b[..., :-1] + (k[order + 1:] - x) * b[..., 1:]) / width
        return b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n_in) -> (..., n_out)."""
        spline = (self.spline_weight * self.spline_scaler.unsqueeze(-1)).flatten(1)
        return F.linear(F.silu(x), self.base_weight) + F.linear(self.bases(x).flatten(-2),
                                                                spline)


def _on_channels(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a layer that works on the last axis to the channels of (N, C, D, H, W)."""
    return layer(x.movedim(1, -1)).movedim(-1, 1)


def _conv_bn_relu(c_in: int, c_out: int, groups: int = 1, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, groups=groups),
            nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]


class KANBlock(nn.Module):
    """x + 3 x (KAN linear over channels, depthwise 3^3 conv, batch norm, ReLU)(norm(x))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.kans = nn.ModuleList(KANLinear(dim, dim) for _ in range(3))
        self.convs = nn.ModuleList(nn.Sequential(*_conv_bn_relu(dim, dim, groups=dim))
                                   for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _on_channels(self.norm, x)
        for kan, conv in zip(self.kans, self.convs):
            y = conv(_on_channels(kan, y))
        return x + y


class Embed(nn.Module):
    """Tokenisation: a strided 3^3 convolution (half the side), then LayerNorm over channels."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _on_channels(self.norm, self.conv(x))


def _encoder(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_relu(c_in, c_out), *_conv_bn_relu(c_out, c_out))


def _decoder(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_relu(c_in, c_in), *_conv_bn_relu(c_in, c_out))


class UKAN(nn.Module):
    """U-KAN for (N, 1, D, H, W) inputs whose sides are multiples of 32."""

    def __init__(self) -> None:
        super().__init__()
        e0, e1, e2 = EMBED
        self.encoders = nn.ModuleList([_encoder(1, e0 // 8), _encoder(e0 // 8, e0 // 4),
                                       _encoder(e0 // 4, e0)])
        self.embeds = nn.ModuleList([Embed(e0, e1), Embed(e1, e2)])
        self.blocks = nn.ModuleList([KANBlock(e1), KANBlock(e2)])
        self.norms = nn.ModuleList([nn.LayerNorm(e1), nn.LayerNorm(e2)])
        self.decoders = nn.ModuleList([_decoder(e2, e1), _decoder(e1, e0), _decoder(e0, e0 // 4),
                                       _decoder(e0 // 4, e0 // 8), _decoder(e0 // 8, e0 // 8)])
        self.decoder_blocks = nn.ModuleList([KANBlock(e1), KANBlock(e0)])
        self.decoder_norms = nn.ModuleList([nn.LayerNorm(e1), nn.LayerNorm(e0)])
        self.head = nn.Conv3d(e0 // 8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> logits (N, 2, D, H, W)."""
        skips = []
        for encoder in self.encoders:
            x = F.relu(F.max_pool3d(encoder(x), 2))
            skips.append(x)
        for embed, block, norm in zip(self.embeds, self.blocks, self.norms):
            x = _on_channels(norm, block(embed(x)))
            skips.append(x)
        skips.pop()  # the bottleneck itself
        for index, decoder in enumerate(self.decoders):
            x = F.relu(F.interpolate(decoder(x), scale_factor=2, mode="trilinear"))
            if skips:
                x = x + skips.pop()
            if index < len(self.decoder_blocks):
                x = _on_channels(self.decoder_norms[index], self.decoder_blocks[index](x))
        return self.head(x)


def ukan() -> UKAN:
    """The 3-D U-KAN with embedding widths 256, 320, 512."""
    return UKAN()
