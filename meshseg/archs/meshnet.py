"""MeshNet as a registry builder (the network itself lives in meshseg.models.meshnet)."""

from __future__ import annotations

from meshseg.models.meshnet import MeshNet, MeshNetConfig


def meshnet(channels: int = 26, activation: str = "relu", batchnorm: bool = True) -> MeshNet:
    """MeshNet-`channels` for 1 input channel and 2 classes (the paper's widths: 5, 16, 26);
    batchnorm=False is the norm-folded form of brainchop's models, to fine-tune them."""
    return MeshNet(MeshNetConfig(channels=channels, activation=activation,
                                 batchnorm=batchnorm))
