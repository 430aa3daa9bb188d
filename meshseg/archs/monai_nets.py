"""The baselines MONAI provides, in the configurations that reproduce the paper's counts.

Each is built for 3-D volumes, 1 input channel and 2 classes; docs/architectures.md lists
the count each configuration gives and why.
"""

from __future__ import annotations

from torch import nn


def segresnet() -> nn.Module:
    """SegResNet with MONAI's defaults (8 initial filters, blocks 1, 2, 2, 4 down)."""
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, in_channels=1, out_channels=2)


def swinunetr() -> nn.Module:
    """Swin-UNETR v2 (a residual convolution before each Swin stage), feature size 24."""
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=2, feature_size=24, use_v2=True,
                     spatial_dims=3)


def unetr(size: int = 256) -> nn.Module:
    """UNETR for size^3 inputs: its positional embeddings hold one vector per 16^3 patch.

    MONAI >= 1.4 gives every transformer block a LayerNorm for cross-attention that UNETR
    never calls (12 x 1,536 parameters); it is replaced by an identity so the network holds
    only what it uses, as in the paper's count.
    """
    from monai.networks.nets import UNETR

    network = UNETR(in_channels=1, out_channels=2, img_size=size, spatial_dims=3)
    for block in network.vit.blocks:
        if not block.with_cross_attention:
            block.norm_cross_attn = nn.Identity()
    return network


def vnet() -> nn.Module:
    """V-Net with MONAI's defaults (16 to 256 channels, four down transitions)."""
    from monai.networks.nets import VNet

    return VNet(spatial_dims=3, in_channels=1, out_channels=2)


def resunet() -> nn.Module:
    """MONAI's UNet, channels 16-256 with stride-2 steps and no residual units.

    num_res_units=0 is what reproduces the paper's 1,979,610; 1, 2 or 3 residual units give
    2,448,988 / 4,806,481 / 7,163,974.
    """
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=0)
