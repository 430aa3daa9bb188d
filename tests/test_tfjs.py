"""Importing TF.js MeshNets: checked against a plain-numpy channels-last reference."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meshseg.errors import WeightsError
from meshseg.models.tfjs import load_tfjs
from meshseg.pipeline.infer import run_layers

CPU = torch.device("cpu")
CHANNELS = 3
DILATIONS = (1, 2, 8, 1)  # 8 exceeds the test volume's extent on two axes
N_CLASSES = 2
BN_EPSILON = 1e-3


def conv_config(name: str, filters: int, size: int, dilation: int,
                activation: str = "linear", **extra) -> dict:
    config = {"name": name, "filters": filters, "kernel_size": [size] * 3,
              "strides": [1, 1, 1], "dilation_rate": [dilation] * 3, "padding": "same",
              "data_format": "channels_last", "activation": activation, "use_bias": True}
    return {"class_name": "Conv3D", "config": {**config, **extra}}


def make_model(activation: str = "elu", batch_norm: bool = False,
               seed: int = 0) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Keras layer list and named weights of a small MeshNet, in the style brainchop exports.

    With batch_norm, each block is Conv3D(linear) -> BatchNormalization -> Activation; without,
    the first block puts its activation in the Conv3D and the others use Activation layers.
    """
    rng = np.random.default_rng(seed)
    layers = [{"class_name": "InputLayer",
               "config": {"name": "input", "batch_input_shape": [None, 8, 8, 8, 1]}}]
    weights = {}
    c_in = 1
    for index, dilation in enumerate(DILATIONS):
        name = f"conv3d_{index}"
        inline = index == 0 and not batch_norm
        layers.append(conv_config(name, CHANNELS, 3, dilation, activation if inline else "linear"))
        weights[f"{name}/kernel"] = rng.normal(0, 0.4, (3, 3, 3, c_in, CHANNELS))
        weights[f"{name}/bias"] = rng.normal(0, 0.1, CHANNELS)
        if batch_norm:
            bn = f"bn_{index}"
            layers.append({"class_name": "BatchNormalization",
                           "config": {"name": bn, "axis": -1, "epsilon": BN_EPSILON,
                                      "center": True, "scale": True}})
            weights[f"{bn}/gamma"] = rng.uniform(0.5, 1.5, CHANNELS)
            weights[f"{bn}/beta"] = rng.normal(0, 0.2, CHANNELS)
            weights[f"{bn}/moving_mean"] = rng.normal(0, 0.3, CHANNELS)
            weights[f"{bn}/moving_variance"] = rng.uniform(0.2, 2.0, CHANNELS)
        if not inline:
            layers.append({"class_name": "Activation",
                           "config": {"name": f"act_{index}", "activation": activation}})
        c_in = CHANNELS
    layers.append(conv_config("output", N_CLASSES, 1, 1))
    weights["output/kernel"] = rng.normal(0, 0.4, (1, 1, 1, CHANNELS, N_CLASSES))
    weights["output/bias"] = rng.normal(0, 0.1, N_CLASSES)
    return layers, {k: v.astype(np.float32) for k, v in weights.items()}


def write_tfjs(folder: Path, layers: list[dict], weights: dict[str, np.ndarray],
               functional: bool = True, dtype: str = "float32", extra_bytes: int = 0) -> Path:
    """Write model.json + model.bin the way the TF.js converter does (Keras 2 functional)."""
    layers = json.loads(json.dumps(layers))
    if functional:
        for previous, layer in zip(layers, layers[1:]):
            layer["name"] = layer["config"]["name"]
            layer["inbound_nodes"] = [[[previous["config"]["name"], 0, 0, {}]]]
        layers[0]["name"], layers[0]["inbound_nodes"] = layers[0]["config"]["name"], []
        model = {"class_name": "Functional",
                 "config": {"name": "model", "layers": layers,
                            "input_layers": [[layers[0]["name"], 0, 0]],
                            "output_layers": [[layers[-1]["name"], 0, 0]]}}
    else:
        model = {"class_name": "Sequential", "config": {"name": "seq", "layers": layers}}
    names = sorted(weights)  # the converter lists weights by name, not in graph order
    manifest = [{"paths": ["model.bin"],
                 "weights": [{"name": n, "shape": list(weights[n].shape), "dtype": dtype}
                             for n in names]}]
    document = {"format": "layers-model", "modelTopology": {"model_config": model},
                "weightsManifest": manifest}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps(document))
    data = b"".join(weights[n].astype("<f4").tobytes() for n in names)
    (folder / "model.bin").write_bytes(data + b"\0" * extra_bytes)
    return folder / "model.json"


def reference_forward(volume: np.ndarray, layers: list[dict],
                      weights: dict[str, np.ndarray]) -> np.ndarray:
    """Keras semantics in plain numpy, channels last: (Z, Y, X) -> (Z, Y, X, classes).

    out[z,y,x,o] = sum over taps a,b,c and inputs i of w[a,b,c,i,o] * in[z+(a-1)d, y+(b-1)d,
    x+(c-1)d, i] (zero outside the volume) + bias; then batch norm and activation layers.
    """
    x = volume[..., None].astype(np.float64)
    for layer in layers[1:]:
        config, kind = layer["config"], layer["class_name"]
        if kind == "Conv3D":
            kernel = weights[f"{config['name']}/kernel"].astype(np.float64)
            k, d = kernel.shape[0], config["dilation_rate"][0]
            pad = d * (k // 2)
            padded = np.pad(x, [(pad, pad)] * 3 + [(0, 0)])
            out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
            for a, b, c in itertools.product(range(k), repeat=3):
                window = padded[a * d:a * d + x.shape[0], b * d:b * d + x.shape[1],
                                c * d:c * d + x.shape[2]]
                out += window @ kernel[a, b, c]
            x = activate(out + weights[f"{config['name']}/bias"], config["activation"])
        elif kind == "BatchNormalization":
            w = {key: weights[f"{config['name']}/{key}"]
                 for key in ("gamma", "beta", "moving_mean", "moving_variance")}
            x = (w["gamma"] * (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + BN_EPSILON)
                 + w["beta"])
        else:
            x = activate(x, config["activation"])
    return x


def activate(x: np.ndarray, name: str) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0)
    if name == "elu":
        return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))
    return x


@pytest.mark.parametrize(("activation", "batch_norm", "functional"), [
    ("elu", False, True), ("relu", True, True), ("elu", True, False),
])
def test_load_tfjs_matches_numpy_reference(tmp_path, activation, batch_norm, functional):
    layers, weights = make_model(activation, batch_norm)
    model = load_tfjs(write_tfjs(tmp_path, layers, weights, functional=functional))
    assert (model.channels, model.activation, model.n_classes) == (CHANNELS, activation, N_CLASSES)
    assert model.n_parameters == sum(w.size for w in weights.values())
    assert [layer.dilation for layer in model.layers] == [*DILATIONS, 1]
    assert model.source == tmp_path / "model.json"
    volume = np.random.default_rng(1).uniform(0, 1, (9, 6, 7)).astype(np.float32)
    logits = run_layers(torch.from_numpy(volume)[None], model.layers, CPU, slab=4)
    expected = reference_forward(volume, layers, weights).transpose(3, 0, 1, 2)
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_load_tfjs_accepts_the_model_folder(tmp_path):
    layers, weights = make_model()
    write_tfjs(tmp_path, layers, weights)
    assert load_tfjs(tmp_path).source == tmp_path / "model.json"


def drop_weight(layers, weights):
    del weights["conv3d_1/bias"]
    return layers, weights


def extra_weight(layers, weights):
    weights["stray/kernel"] = np.zeros(3, np.float32)
    return layers, weights


def nan_weight(layers, weights):
    weights["conv3d_2/kernel"][0, 0, 0, 0, 0] = np.nan
    return layers, weights


def wrong_kernel_shape(layers, weights):
    weights["conv3d_2/kernel"] = weights["conv3d_2/kernel"][:, :, :, :2]
    return layers, weights


def change_conv(**changes):
    def mutate(layers, weights):
        layers[2]["config"].update(changes)
        return layers, weights
    return mutate


def change_layer(index, layer):
    def mutate(layers, weights):
        layers[index] = layer
        return layers, weights
    return mutate


@pytest.mark.parametrize(("mutate", "message"), [
    (drop_weight, "weight conv3d_1/bias is missing"),
    (extra_weight, "not used by any layer: stray/kernel"),
    (nan_weight, "conv3d_2/kernel holds NaN"),
    (wrong_kernel_shape, r"conv3d_2/kernel has shape \[3, 3, 3, 2, 3\], expected"),
    (change_conv(strides=[2, 2, 2]), "strides"),
    (change_conv(padding="valid"), "padding"),
    (change_conv(dilation_rate=[1, 2, 1]), "dilation_rate"),
    (change_conv(kernel_size=[5, 5, 5]), "kernel_size"),
    (change_conv(activation="tanh"), "unsupported activation 'tanh'"),
    (change_layer(2, {"class_name": "MaxPooling3D", "config": {"name": "pool"}}),
     "unsupported type MaxPooling3D"),
    (change_layer(-1, conv_config("output", N_CLASSES, 1, 1, "relu")),
     "last layer is not a linear"),
])
def test_malformed_topology_or_weights_raise(tmp_path, mutate, message):
    path = write_tfjs(tmp_path, *mutate(*make_model()))
    with pytest.raises(WeightsError, match=message) as caught:
        load_tfjs(path)
    assert str(caught.value).startswith(str(path))


def test_batch_norm_after_activation_cannot_be_folded(tmp_path):
    layers, weights = make_model(batch_norm=True)
    layers[2], layers[3] = layers[3], layers[2]  # Conv3D -> Activation -> BatchNormalization
    with pytest.raises(WeightsError, match="follows an activation"):
        load_tfjs(write_tfjs(tmp_path, layers, weights))


def test_non_chain_graph_is_rejected(tmp_path):
    path = write_tfjs(tmp_path, *make_model())
    document = json.loads(path.read_text())
    document["modelTopology"]["model_config"]["config"]["layers"][3]["inbound_nodes"] = \
        [[["input", 0, 0, {}]]]
    path.write_text(json.dumps(document))
    with pytest.raises(WeightsError, match="plain chain"):
        load_tfjs(path)


def test_bin_with_extra_bytes_is_rejected(tmp_path):
    layers, weights = make_model()
    size = 4 * sum(w.size for w in weights.values())
    with pytest.raises(WeightsError, match=f"hold {size + 4} bytes but the manifest lists {size}"):
        load_tfjs(write_tfjs(tmp_path, layers, weights, extra_bytes=4))


def test_truncated_bin_is_rejected(tmp_path):
    path = write_tfjs(tmp_path, *make_model())
    bin_path = tmp_path / "model.bin"
    size = bin_path.stat().st_size
    bin_path.write_bytes(bin_path.read_bytes()[:-8])
    with pytest.raises(WeightsError, match=f"hold {size - 8} bytes but the manifest lists {size}"):
        load_tfjs(path)


def test_non_float32_dtype_is_rejected(tmp_path):
    with pytest.raises(WeightsError, match="dtype 'float16'; only float32"):
        load_tfjs(write_tfjs(tmp_path, *make_model(), dtype="float16"))


def test_quantized_weights_are_rejected(tmp_path):
    path = write_tfjs(tmp_path, *make_model())
    document = json.loads(path.read_text())
    document["weightsManifest"][0]["weights"][0]["quantization"] = {"dtype": "uint8"}
    path.write_text(json.dumps(document))
    with pytest.raises(WeightsError, match="quantized"):
        load_tfjs(path)


@pytest.mark.parametrize(("shard", "message"), [
    ("missing.bin", "missing.bin is missing"),
    ("../model.bin", "not a plain file name"),
])
def test_shard_paths_are_checked(tmp_path, shard, message):
    path = write_tfjs(tmp_path, *make_model())
    document = json.loads(path.read_text())
    document["weightsManifest"][0]["paths"] = [shard]
    path.write_text(json.dumps(document))
    with pytest.raises(WeightsError, match=message):
        load_tfjs(path)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not a readable JSON"),
    ("[1, 2]", "not a TF.js model"),
    ('{"modelTopology": {}, "weightsManifest": []}', "no weightsManifest"),
])
def test_unreadable_model_json(tmp_path, text, message):
    path = tmp_path / "model.json"
    path.write_text(text)
    with pytest.raises(WeightsError, match=message):
        load_tfjs(path)


def test_missing_model_json(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_tfjs(tmp_path / "model.json")


def test_shared_brainchop_model(shared_model):
    model = load_tfjs(shared_model)
    assert (model.n_parameters, model.channels, model.activation, model.n_classes) == \
        (26_556, 11, "elu", 2)
    assert [layer.dilation for layer in model.layers[:-1]] == [1, 2, 4, 8, 16, 8, 4, 2, 1]
    assert model.layers[-1].weight.shape == (2, 11, 1, 1, 1)
    x = torch.rand(1, 12, 10, 14, generator=torch.Generator().manual_seed(0))
    expected = x[None]
    for layer in model.layers:
        expected = F.conv3d(expected, layer.weight, layer.bias, padding=layer.padding,
                            dilation=layer.dilation)
        expected = F.elu(expected) if layer.activation == "elu" else expected
    logits = run_layers(x, model.layers, CPU, slab=5)
    torch.testing.assert_close(logits, expected[0], rtol=1e-5, atol=1e-5)
