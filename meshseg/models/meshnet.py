"""MeshNet (Fedorov et al.): a stack of dilated 3x3x3 convolutions, no pooling, no skips.

Every block keeps the volume size (padding = dilation), so the receptive field grows with the
dilations 1, 2, 4, 8, 16, 8, 4, 2, 1 while memory stays one activation volume per layer. Tensors
are (N, C, D, H, W); D, H, W are the conformed array's nibabel axes i, j, k in that order.

For inference the batch norms are folded into their convolutions (`fold`), which turns the network
into a plain chain of convolutions that `meshseg.infer` runs layer by layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 16, 8, 4, 2, 1)
# Half the conformed volume's side: a larger dilation's taps fall only in the zero padding.
MAX_DILATION = 128

# The only activations MeshNet variants use: ReLU in the paper, ELU in brainchop's models.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU}


def _is_int(value: Any) -> bool:
    """True for a real integer; bool is an int subclass but never a valid size."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class MeshNetConfig:
    """Hyper-parameters that fix the shape of every MeshNet tensor (saved beside the weights)."""

    channels: int = 26
    activation: str = "relu"
    in_channels: int = 1
    n_classes: int = 2
    dilations: tuple[int, ...] = DILATIONS
    # False for networks whose batch norms were folded before we got them (brainchop's models)
    batchnorm: bool = True

    def __post_init__(self) -> None:
        for name in ("channels", "in_channels"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"MeshNet {name} must be a positive integer, got {value!r}")
        if not _is_int(self.n_classes) or self.n_classes < 2:
            raise ValueError(f"MeshNet n_classes must be an integer >= 2, got {self.n_classes!r}")
        if not isinstance(self.batchnorm, bool):
            raise ValueError(f"MeshNet batchnorm must be true or false, got {self.batchnorm!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MeshNet activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation!r}")
        dilations = self.dilations
        if (not isinstance(dilations, (tuple, list)) or not dilations
                or not all(_is_int(d) and 1 <= d <= MAX_DILATION for d in dilations)):
            raise ValueError(f"MeshNet dilations must be a non-empty list of integers "
                             f"1..{MAX_DILATION}, got {dilations!r}")
        object.__setattr__(self, "dilations", tuple(dilations))  # a list from JSON -> tuple

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (the dilations become a list)."""
        return {**asdict(self), "dilations": list(self.dilations)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MeshNetConfig:
        """Inverse of `to_dict`; missing keys take the defaults, unknown keys are an error.

        Raises:
            ValueError: `d` is not a mapping, has unknown keys, or holds invalid values.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"MeshNet config must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"MeshNet config has unknown keys: {', '.join(map(str, unknown))}")
        return cls(**d)


class MeshNet(nn.Module):
    """MeshNet: len(dilations) blocks of Conv3d(3x3x3, dilation d, padding d) + BatchNorm3d +
    activation, then a 1x1x1 Conv3d to class logits. With `batchnorm=False` the norm is the
    identity (a network imported with its batch norms already folded).

    The convolutions keep their bias next to the batch norm: the paper's parameter counts
    (147,474 / 56,194 / 5,682 for 26 / 16 / 5 channels) include it.
    """

    def __init__(self, config: MeshNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.in_channels] + [config.channels] * len(config.dilations)
        self.blocks = nn.Sequential(*(
            nn.Sequential(OrderedDict(
                conv=nn.Conv3d(c_in, config.channels, 3, padding=d, dilation=d, bias=True),
                bn=nn.BatchNorm3d(config.channels) if config.batchnorm else nn.Identity(),
                act=ACTIVATIONS[config.activation](),
            ))
            for c_in, d in zip(widths, config.dilations)
        ))
        self.classifier = nn.Conv3d(config.channels, config.n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, D, H, W) -> logits (N, n_classes, D, H, W), same D, H, W."""
        return self.classifier(self.blocks(x))


def count_parameters(module: nn.Module) -> int:
    """Number of learnable values (batch-norm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class FoldedLayer:
    """One inference layer: a convolution with any batch norm folded in, then an activation.

    weight is (out, in, k, k, k) float32 with k = 3 or 1; the convolution is zero-padded by
    `padding` voxels on every side so the output keeps the input's D, H, W.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    dilation: int
    activation: str | None

    @property
    def padding(self) -> int:
        """Zero voxels needed on each side to keep the size: dilation * (k - 1) / 2."""
        return self.dilation * (self.weight.shape[-1] // 2)


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                    beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an inference-mode batch norm that follows a convolution into the convolution.

    bn(conv(x)) = gamma * (w*x + b - mean) / sqrt(var + eps) + beta, so the output channel o is
    scaled by s = gamma / sqrt(var + eps) and shifted. Computed in float64, returned float32.
    """
    scale = gamma.double() / torch.sqrt(var.double() + eps)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    folded_w = weight.double() * scale.reshape(shape)
    folded_b = (bias.double() - mean.double()) * scale + beta.double()
    return folded_w.float().contiguous(), folded_b.float().contiguous()


def fold(model: MeshNet) -> list[FoldedLayer]:
    """The network as a chain of FoldedLayers, batch norms folded with their running statistics
    (eval-mode semantics, whatever mode the model is in); equals `model.eval()(x)` to float
    rounding."""
    layers = []
    with torch.no_grad():
        for block, d in zip(model.blocks, model.config.dilations):
            conv, bn = block.conv, block.bn
            if isinstance(bn, nn.BatchNorm3d):
                weight, bias = fold_batch_norm(conv.weight, conv.bias, bn.weight, bn.bias,
                                               bn.running_mean, bn.running_var, bn.eps)
            else:
                weight = conv.weight.detach().float().clone()
                bias = conv.bias.detach().float().clone()
            layers.append(FoldedLayer(weight, bias, d, model.config.activation))
        head = model.classifier
        layers.append(FoldedLayer(head.weight.detach().float().clone(),
                                  head.bias.detach().float().clone(), 1, None))
    return layers
