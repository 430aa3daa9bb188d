"""Every checkpoint loader refuses NaN/Inf weights and impossible configurations with one
"PATH: ..." WeightsError, before allocating anything the configuration asks for."""

from __future__ import annotations

import json
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file

from meshseg.errors import WeightsError
from meshseg.models import weights
from meshseg.models.export import export_onnx, read_onnx
from meshseg.models.meshnet import MeshNet, MeshNetConfig, fold
from meshseg.models.weights import FORMAT, load_network, save_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "small.safetensors"
    save_checkpoint(path, MeshNet(MeshNetConfig(channels=2, dilations=(1, 2))).eval())
    return path


def rewrite(path, config=None, poison=None):
    """The checkpoint with its config replaced and/or one weight set to `poison`."""
    state = load_file(str(path))
    if poison is not None:
        key = sorted(state)[0]
        state[key].view(-1)[0] = poison
    header = {"format": FORMAT, "architecture": "meshnet", "meta": "{}",
              "config": json.dumps(config or MeshNetConfig(channels=2, dilations=(1, 2))
                                   .to_dict())}
    save_file(state, str(path), metadata=header)
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_safetensors_with_non_finite_weights_is_refused(checkpoint, value):
    rewrite(checkpoint, poison=value)
    with pytest.raises(WeightsError, match=rf"^{checkpoint}: weight .* NaN or infinite"):
        load_network(checkpoint)


@pytest.mark.parametrize("change, message", [
    ({"channels": 10**9}, "checkpoint config describes an impossible network"),
    ({"channels": 10**5}, "weights do not match the config"),
    ({"channels": -3}, "malformed checkpoint config"),
    ({"channels": 0}, "malformed checkpoint config"),
    ({"dilations": [1, 10**9]}, "malformed checkpoint config"),
    ({"dilations": [1, 2, 4]}, "weights do not match the config"),
    ({"in_channels": 10**6}, "weights do not match the config"),
])
def test_impossible_configs_are_refused_without_allocating(checkpoint, change, message):
    config = {**MeshNetConfig(channels=2, dilations=(1, 2)).to_dict(), **change}
    rewrite(checkpoint, config=config)
    tracemalloc.start()
    with pytest.raises(WeightsError, match=rf"^{checkpoint}: {message}"):
        load_network(checkpoint)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2**20


def test_a_valid_checkpoint_still_loads_with_real_tensors(checkpoint):
    model = load_network(checkpoint).model
    assert all(p.device.type == "cpu" for p in model.parameters())
    out = model(torch.zeros(1, 1, 8, 8, 8))
    assert out.shape == (1, 2, 8, 8, 8) and torch.isfinite(out).all()


def test_onnx_with_non_finite_weights_or_huge_dilation_is_refused(tmp_path):
    layers = fold(MeshNet(MeshNetConfig(channels=2, dilations=(1, 2))).eval())
    poisoned = [layers[0].__class__(layers[0].weight.clone(), layers[0].bias.clone(),
                                    layers[0].dilation, layers[0].activation), *layers[1:]]
    poisoned[0].weight.view(-1)[0] = float("nan")
    path = tmp_path / "nan.onnx"
    export_onnx(poisoned, path)
    with pytest.raises(WeightsError, match=rf"^{path}: weight .* NaN or infinite"):
        read_onnx(path)
    wide = [layers[0].__class__(layers[0].weight, layers[0].bias, 10**6, "relu"), *layers[1:]]
    path = tmp_path / "wide.onnx"
    export_onnx(wide, path)
    with pytest.raises(WeightsError, match=rf"^{path}: Conv node .* dilations"):
        read_onnx(path)


def test_an_oversized_extra_tensor_is_refused_from_the_header(tmp_path, checkpoint,
                                                              monkeypatch):
    """Issue 20 item 16: a checkpoint carrying an extra 4 GiB tensor (a sparse file here) is
    refused by the shapes in its header, before any tensor is read (it reached 11.5 GB)."""
    raw = checkpoint.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    data = raw[8 + size:]
    extra = 1 << 30  # float32 values: 4 GiB
    header["extra"] = {"dtype": "F32", "shape": [extra],
                       "data_offsets": [len(data), len(data) + 4 * extra]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    big = tmp_path / "big.safetensors"
    with big.open("wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text + data)
        handle.truncate(8 + len(text) + len(data) + 4 * extra)
    def no_read(path):
        raise AssertionError("tensors read before the header was checked")

    monkeypatch.setattr(weights, "_read_tensors", no_read)
    with pytest.raises(WeightsError, match="unexpected tensor extra"):
        load_network(big)
