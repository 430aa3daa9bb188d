"""MeshNet: the paper's parameter counts, shapes, batch-norm folding and the config format."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from meshseg.models.meshnet import DILATIONS, MeshNet, MeshNetConfig, count_parameters, fold


def randomise_batch_norms(model: MeshNet, seed: int = 0) -> None:
    """Give every batch norm non-trivial running statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) - 0.5)


@pytest.mark.parametrize(("channels", "expected"), [(26, 147_474), (16, 56_194), (5, 5_682)])
def test_parameter_counts_match_the_paper(channels, expected):
    assert count_parameters(MeshNet(MeshNetConfig(channels=channels))) == expected


@pytest.mark.parametrize(("config", "size"), [
    (MeshNetConfig(channels=3), (7, 9, 5)),
    (MeshNetConfig(channels=4, activation="elu", n_classes=3), (12, 4, 6)),
    (MeshNetConfig(channels=2, in_channels=2, dilations=(1, 2, 1)), (3, 3, 3)),
])
def test_output_keeps_the_volume_size(config, size):
    x = torch.rand(2, config.in_channels, *size)
    with torch.no_grad():
        y = MeshNet(config).eval()(x)
    assert y.shape == (2, config.n_classes, *size)


@pytest.mark.parametrize(("activation", "batchnorm"),
                         [("relu", True), ("elu", True), ("elu", False)])
def test_fold_equals_the_eval_mode_network(activation, batchnorm):
    torch.manual_seed(1)
    model = MeshNet(MeshNetConfig(channels=4, activation=activation, batchnorm=batchnorm))
    if batchnorm:
        randomise_batch_norms(model)
    else:
        assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    layers = fold(model.train())  # fold uses running statistics whatever the mode
    x = torch.rand(1, 1, 10, 11, 9)
    with torch.no_grad():
        expected = model.eval()(x)
        y = x
        for layer in layers:
            y = F.conv3d(y, layer.weight, layer.bias, padding=layer.padding,
                         dilation=layer.dilation)
            if layer.activation == "relu":
                y = F.relu(y)
            elif layer.activation == "elu":
                y = F.elu(y)
    assert [layer.dilation for layer in layers] == [*DILATIONS, 1]
    assert [layer.activation for layer in layers] == [activation] * len(DILATIONS) + [None]
    assert all(layer.weight.dtype == torch.float32 for layer in layers)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_config_round_trips_through_json():
    config = MeshNetConfig(channels=11, activation="elu", in_channels=1, n_classes=3,
                           dilations=(1, 2, 1))
    restored = MeshNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert isinstance(restored.dilations, tuple)


def test_config_missing_keys_take_defaults():
    assert MeshNetConfig.from_dict({"channels": 5}) == MeshNetConfig(channels=5)


@pytest.mark.parametrize(("data", "message"), [
    ({"channels": 0}, "channels"),
    ({"channels": "26"}, "channels"),
    ({"channels": True}, "channels"),
    ({"in_channels": -1}, "in_channels"),
    ({"n_classes": 1}, "n_classes"),
    ({"activation": "tanh"}, "activation"),
    ({"dilations": []}, "dilations"),
    ({"dilations": [1, 0]}, "dilations"),
    ({"dilations": [1, 2.5]}, "dilations"),
    ({"dilations": "124"}, "dilations"),
    ({"batchnorm": "no"}, "batchnorm"),
    ({"channels": 26, "depth": 9}, "unknown keys: depth"),
])
def test_config_rejects_invalid_values(data, message):
    with pytest.raises(ValueError, match=message):
        MeshNetConfig.from_dict(data)


def test_config_from_non_mapping_is_an_error():
    with pytest.raises(ValueError, match="JSON object"):
        MeshNetConfig.from_dict([26, "relu"])
