"""Import brainchop's TensorFlow.js MeshNet models (model.json + .bin weight shards).

A TF.js "layers-model" model.json holds a Keras topology (functional or sequential) and a
weightsManifest: groups of .bin shard files whose concatenated bytes are the listed tensors, in
order, little-endian. We read the topology as a chain Conv3D -> [BatchNormalization] ->
[Activation] ..., fold it into `FoldedLayer`s and check that it is a MeshNet: 3x3x3 "same"
convolutions with stride 1 and one activation, then a 1x1x1 convolution to the classes.

Keras stores kernels as [kd, kh, kw, in, out] for channels-last tensors [batch, d, h, w, c];
torch wants (out, in, kd, kh, kw) for [batch, c, d, h, w]. The spatial axes keep their order,
so the volume is fed in the same i, j, k order brainchop uses, without any transposition.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meshseg.errors import WeightsError
from meshseg.models.meshnet import (
    ACTIVATIONS,
    MAX_DILATION,
    FoldedLayer,
    MeshNet,
    MeshNetConfig,
    fold_batch_norm,
)
from meshseg.models.weights import check_finite, save_checkpoint, sha256_file

FLOAT32_BYTES = 4
KERAS_LINEAR = "linear"
# Layers that are the identity at inference time.
IDENTITY_LAYERS = frozenset({"Dropout", "SpatialDropout3D"})
BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")


@dataclass(frozen=True)
class TfjsModel:
    """A brainchop MeshNet ready for `meshseg.infer.run_layers`."""

    layers: list[FoldedLayer]
    channels: int
    activation: str
    n_classes: int
    n_parameters: int  # float32 values in the weight files (batch-norm statistics included)
    source: Path
    files: tuple[Path, ...] = ()  # model.json and its weight shards, for provenance


def load_tfjs(model_json: Path) -> TfjsModel:
    """Read a TF.js layers-model (model.json beside its .bin files; a folder means its model.json).

    Raises:
        WeightsError: the file is missing, malformed, not float32, inconsistent with its .bin
            files, or not a MeshNet-type chain; the message names the file and the problem.
    """
    path = Path(model_json)
    if path.is_dir():
        path = path / "model.json"
    document = _read_json(path)
    arrays = _read_weights(document, path)
    weights = _Weights(arrays, path)
    layers = _build_layers(_layer_chain(document, path), weights, path)
    unused = sorted(set(arrays) - weights.used)
    if unused:
        raise WeightsError(f"{path}: weights not used by any layer: {', '.join(unused)}")
    activation = _check_meshnet(layers, path)
    return TfjsModel(layers=layers, channels=layers[0].weight.shape[0], activation=activation,
                     n_classes=layers[-1].weight.shape[0],
                     n_parameters=sum(a.size for a in arrays.values()), source=path,
                     files=(path, *_shard_paths(document, path)))


def _shard_paths(document: dict[str, Any], path: Path) -> list[Path]:
    """The weight files the manifest names (already checked readable by `_read_weights`)."""
    return [path.parent / name for group in document["weightsManifest"]
            for name in group["paths"]]


def save_as_checkpoint(model_json: Path, output: Path) -> TfjsModel:
    """Convert a brainchop model to a meshseg checkpoint that predicts exactly as brainchop
    feeds the original: its meta says to crop to the voxels > 0 and keep the largest lesion,
    and records the sha256 of every source file."""
    model = load_tfjs(model_json)
    meta = {"crop": "nonzero", "postprocess": "largest",
            "converted_from": {f.name: sha256_file(f) for f in model.files}}
    save_checkpoint(output, to_meshnet(model), meta)
    return model


def to_meshnet(model: TfjsModel) -> MeshNet:
    """The imported layers as a meshseg MeshNet without batch norms (they are already folded
    into the convolutions), so it saves as a safetensors checkpoint and folds back exactly."""
    *blocks, head = model.layers
    config = MeshNetConfig(channels=model.channels, activation=model.activation,
                           n_classes=model.n_classes, batchnorm=False,
                           dilations=tuple(layer.dilation for layer in blocks))
    network = MeshNet(config)
    convs = [block.conv for block in network.blocks] + [network.classifier]
    with torch.no_grad():
        for conv, layer in zip(convs, model.layers):
            conv.weight.copy_(layer.weight)
            conv.bias.copy_(layer.bias)
    return network.eval()


def _read_json(path: Path) -> dict[str, Any]:
    """The parsed model.json, which must be a JSON object."""
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(document, dict):
        raise WeightsError(f"{path}: not a TF.js model (top level is not a JSON object)")
    return document


def _read_weights(document: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the weightsManifest by name, as float32 arrays of their listed shape."""
    manifest = document.get("weightsManifest")
    if not isinstance(manifest, list) or not manifest:
        raise WeightsError(f"{path}: no weightsManifest (is this a TF.js layers-model?)")
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        if not isinstance(group, dict) or not isinstance(group.get("paths"), list) \
                or not isinstance(group.get("weights"), list):
            raise WeightsError(f"{path}: weightsManifest group without 'paths' and 'weights'")
        specs = [_weight_spec(entry, path) for entry in group["weights"]]
        data = _read_shards(group["paths"], path)
        expected = sum(math.prod(shape) for _, shape in specs) * FLOAT32_BYTES
        if len(data) != expected:
            raise WeightsError(f"{path}: weight files {', '.join(group['paths'])} hold "
                               f"{len(data)} bytes but the manifest lists {expected}")
        offset = 0
        for name, shape in specs:
            if name in weights:
                raise WeightsError(f"{path}: weight {name} is listed twice")
            count = math.prod(shape)
            values = np.frombuffer(data, dtype="<f4", count=count, offset=offset)
            check_finite(path, name, values)
            weights[name] = values.astype(np.float32).reshape(shape)
            offset += count * FLOAT32_BYTES
    return weights


def _weight_spec(entry: Any, path: Path) -> tuple[str, tuple[int, ...]]:
    """(name, shape) of one manifest entry; only plain float32 is accepted."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise WeightsError(f"{path}: weightsManifest entry without a name: {entry!r}")
    name, shape = entry["name"], entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise WeightsError(f"{path}: weight {name} has an invalid shape {shape!r}")
    if "quantization" in entry:
        raise WeightsError(f"{path}: weight {name} is quantized; only float32 weights "
                           "are supported (convert the model without quantization)")
    if entry.get("dtype") != "float32":
        raise WeightsError(f"{path}: weight {name} has dtype {entry.get('dtype')!r}; "
                           "only float32 is supported")
    return name, tuple(shape)


def _read_shards(names: list[Any], path: Path) -> bytes:
    """The concatenated bytes of one group's shard files, which sit beside model.json."""
    chunks = []
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise WeightsError(f"{path}: weight file {name!r} is not a plain file name")
        shard = path.parent / name
        try:
            chunks.append(shard.read_bytes())
        except FileNotFoundError as err:
            raise WeightsError(f"{path}: weight file {shard} is missing") from err
        except OSError as err:
            raise WeightsError(f"{path}: cannot read weight file {shard} ({err})") from err
    return b"".join(chunks)


def _layer_chain(document: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """The topology's layers in graph order, checked to form a single chain input -> output."""
    topology = document.get("modelTopology")
    if not isinstance(topology, dict):
        raise WeightsError(f"{path}: no modelTopology (is this a TF.js layers-model?)")
    model = topology.get("model_config", topology)
    kind = model.get("class_name") if isinstance(model, dict) else None
    config = model.get("config") if isinstance(model, dict) else None
    layers = config.get("layers") if isinstance(config, dict) else config
    if kind not in ("Functional", "Model", "Sequential") or not isinstance(layers, list) \
            or not all(isinstance(layer, dict) and isinstance(layer.get("config"), dict)
                       for layer in layers):
        raise WeightsError(f"{path}: modelTopology is not a Keras functional or sequential "
                           "model with a list of layers")
    if kind != "Sequential":
        _check_functional_chain(layers, config, path)
    return layers


def _check_functional_chain(layers: list[dict[str, Any]], config: dict[str, Any],
                            path: Path) -> None:
    """Each layer must take exactly the previous layer's output; the last is the output."""
    names = [layer.get("name", layer["config"].get("name")) for layer in layers]
    for previous, layer, name in zip(names, layers[1:], names[1:]):
        if _inbound_names(layer) != [previous]:
            raise WeightsError(f"{path}: layer {name} does not take just the output of "
                               f"{previous}; only a plain chain of layers (MeshNet) is supported")
    outputs = config.get("output_layers")
    if not names or not isinstance(outputs, list) or len(outputs) != 1 \
            or not isinstance(outputs[0], list) or outputs[0][:1] != names[-1:]:
        raise WeightsError(f"{path}: the model's single output must be its last layer")


def _inbound_names(layer: dict[str, Any]) -> list[Any]:
    """Names of the layers feeding `layer` (Keras 2 form: [[[name, node, tensor, kwargs], ...]])."""
    nodes = layer.get("inbound_nodes")
    if not isinstance(nodes, list) or len(nodes) != 1 or not isinstance(nodes[0], list):
        return []
    return [tensor[0] if isinstance(tensor, list) and tensor else None for tensor in nodes[0]]


class _Weights:
    """The manifest's tensors by name, handed out with a shape check; remembers what was used."""

    def __init__(self, arrays: dict[str, np.ndarray], path: Path) -> None:
        self.arrays = arrays
        self.path = path
        self.used: set[str] = set()

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.arrays:
            raise WeightsError(f"{self.path}: weight {name} is missing from the weightsManifest")
        return self.arrays[name].shape

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if self.shape(name) != shape:
            raise WeightsError(f"{self.path}: weight {name} has shape "
                               f"{list(self.arrays[name].shape)}, expected {list(shape)}")
        self.used.add(name)
        return torch.from_numpy(self.arrays[name])


def _build_layers(chain: list[dict[str, Any]], weights: _Weights,
                  path: Path) -> list[FoldedLayer]:
    """Fold the chain Conv3D -> [BatchNormalization] -> [Activation] ... into FoldedLayers."""
    layers: list[FoldedLayer] = []
    for index, layer in enumerate(chain):
        kind, config = layer.get("class_name"), layer["config"]
        name = config.get("name", f"#{index}")
        if (kind == "InputLayer" and index == 0) or kind in IDENTITY_LAYERS:
            continue
        if kind == "Conv3D":
            in_channels = layers[-1].weight.shape[0] if layers else None
            layers.append(_conv3d(config, name, in_channels, weights, path))
        elif not layers:
            raise WeightsError(f"{path}: layer {name} ({kind}) comes before any Conv3D")
        elif kind == "BatchNormalization":
            layers[-1] = _fold_bn(layers[-1], config, name, weights, path)
        elif kind == "Activation":
            layers[-1] = _activate(layers[-1], config.get("activation"), name, path)
        else:
            raise WeightsError(f"{path}: layer {name} has unsupported type {kind}")
    return layers


def _triple(config: dict[str, Any], key: str, default: list[int]) -> Any:
    """A Keras per-axis setting as a list of three (Keras accepts a single int too)."""
    value = config.get(key, default)
    return [value] * 3 if isinstance(value, int) else value


def _conv3d(config: dict[str, Any], name: str, in_channels: int | None, weights: _Weights,
            path: Path) -> FoldedLayer:
    """A FoldedLayer from a Keras Conv3D config and its [kd, kh, kw, in, out] kernel."""
    kernel_size = _triple(config, "kernel_size", [])
    dilation = _triple(config, "dilation_rate", [1, 1, 1])
    size = kernel_size[0] if isinstance(kernel_size, list) and kernel_size else None
    filters = config.get("filters")
    problems = []
    if size not in (1, 3) or kernel_size != [size] * 3:
        problems.append(f"kernel_size {kernel_size} (MeshNet uses 3x3x3 and a final 1x1x1)")
    if _triple(config, "strides", [1, 1, 1]) != [1, 1, 1]:
        problems.append(f"strides {config.get('strides')} (must be 1)")
    if config.get("padding") != "same" and not (size == 1 and config.get("padding") == "valid"):
        problems.append(f"padding {config.get('padding')!r} (must be 'same')")
    if not (isinstance(dilation, list) and len(dilation) == 3 and len(set(dilation)) == 1
            and isinstance(dilation[0], int) and 1 <= dilation[0] <= MAX_DILATION):
        problems.append(f"dilation_rate {config.get('dilation_rate')} (must be d, d, d with "
                        f"d in 1..{MAX_DILATION})")
    if config.get("data_format", "channels_last") != "channels_last":
        problems.append(f"data_format {config.get('data_format')!r} (must be channels_last)")
    if config.get("groups", 1) != 1:
        problems.append(f"groups {config.get('groups')} (must be 1)")
    if not isinstance(filters, int) or filters < 1:
        problems.append(f"filters {filters!r}")
    if problems:
        raise WeightsError(f"{path}: Conv3D layer {name} has unsupported {'; '.join(problems)}")
    kernel_name = f"{name}/kernel"
    if in_channels is None:  # the first convolution: its input width comes from the kernel
        kernel_shape = weights.shape(kernel_name)
        if len(kernel_shape) != 5:
            raise WeightsError(f"{path}: weight {kernel_name} has shape {list(kernel_shape)}, "
                               "expected a 5-D Conv3D kernel")
        in_channels = kernel_shape[3]
    kernel = weights.take(kernel_name, (size, size, size, in_channels, filters))
    bias = (weights.take(f"{name}/bias", (filters,)) if config.get("use_bias", True)
            else torch.zeros(filters))
    weight = kernel.permute(4, 3, 0, 1, 2).contiguous()  # -> (out, in, kd, kh, kw)
    layer = FoldedLayer(weight, bias.clone(), dilation[0], None)
    return _activate(layer, config.get("activation", KERAS_LINEAR), name, path)


def _fold_bn(layer: FoldedLayer, config: dict[str, Any], name: str, weights: _Weights,
             path: Path) -> FoldedLayer:
    """Fold a channels-last BatchNormalization (inference statistics) into the convolution."""
    channels = layer.weight.shape[0]
    axis = config.get("axis", -1)
    if axis not in (-1, 4, [-1], [4]):
        raise WeightsError(f"{path}: BatchNormalization {name} normalises axis {axis}, "
                           "not the channel axis")
    if layer.activation is not None:
        raise WeightsError(f"{path}: BatchNormalization {name} follows an activation and "
                           "cannot be folded into the convolution")
    epsilon = config.get("epsilon", 1e-3)
    if not isinstance(epsilon, (int, float)) or epsilon < 0:
        raise WeightsError(f"{path}: BatchNormalization {name} has epsilon {epsilon!r}")
    present = {"gamma": config.get("scale", True), "beta": config.get("center", True),
               "moving_mean": True, "moving_variance": True}
    defaults = {"gamma": torch.ones(channels), "beta": torch.zeros(channels)}
    values = {key: weights.take(f"{name}/{key}", (channels,)) if present[key] else defaults[key]
              for key in BN_WEIGHTS}
    if (values["moving_variance"] < 0).any():
        raise WeightsError(f"{path}: BatchNormalization {name} has a negative moving_variance")
    weight, bias = fold_batch_norm(layer.weight, layer.bias, values["gamma"], values["beta"],
                                   values["moving_mean"], values["moving_variance"],
                                   float(epsilon))
    return replace(layer, weight=weight, bias=bias)


def _activate(layer: FoldedLayer, activation: Any, name: str, path: Path) -> FoldedLayer:
    """Attach a Keras activation ("linear" changes nothing) to the layer it follows."""
    if activation == KERAS_LINEAR:
        return layer
    if activation not in ACTIVATIONS:
        raise WeightsError(f"{path}: layer {name} has unsupported activation {activation!r} "
                           f"(supported: {', '.join(sorted(ACTIVATIONS))}, linear)")
    if layer.activation is not None:
        raise WeightsError(f"{path}: layer {name} applies a second activation to one "
                           "convolution")
    return replace(layer, activation=activation)


def _check_meshnet(layers: list[FoldedLayer], path: Path) -> str:
    """Require a MeshNet chain: 1 input channel, equal-width 3x3x3 blocks with one activation,
    then a linear 1x1x1 layer to >= 2 classes. Returns the activation."""
    if len(layers) < 2:
        raise WeightsError(f"{path}: {len(layers)} convolution(s); a MeshNet has at least two")
    *blocks, head = layers
    activations = {layer.activation for layer in blocks}
    widths = {layer.weight.shape[0] for layer in blocks}
    problems = []
    if blocks[0].weight.shape[1] != 1:
        problems.append(f"the input has {blocks[0].weight.shape[1]} channels, not 1")
    if any(layer.weight.shape[-1] != 3 for layer in blocks):
        problems.append("a convolution before the last one is not 3x3x3")
    if len(widths) != 1:
        problems.append(f"the blocks have different widths {sorted(widths)}")
    if len(activations) != 1 or None in activations:
        problems.append("the blocks do not all use the same activation")
    if head.weight.shape[-1] != 1 or head.activation is not None:
        problems.append("the last layer is not a linear 1x1x1 convolution")
    if head.weight.shape[0] < 2:
        problems.append(f"the output has {head.weight.shape[0]} class(es), not at least 2")
    if problems:
        raise WeightsError(f"{path}: not a MeshNet-type model: {'; '.join(problems)}")
    return activations.pop()
