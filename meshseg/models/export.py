"""MeshNet as an ONNX graph, and the onnxruntime and OpenVINO backends of predict that run it.

The graph is assembled directly from the folded layers with onnx.helper rather than
traced with torch.onnx.export: a MeshNet is a plain chain of Conv and activation nodes,
building it needs no tracer (whose TorchScript path is deprecated and whose dynamo path
pulls in onnxscript), it works as well for imported brainchop models, and the spatial
axes are dynamic by construction.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from meshseg.errors import DeviceError, WeightsError
from meshseg.io import atomic_path, first_line
from meshseg.models.meshnet import MAX_DILATION, FoldedLayer
from meshseg.models.weights import check_finite
from meshseg.pipeline.infer import check_classes

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17; newer onnx writes versions older runtimes refuse
INPUT, OUTPUT = "volume", "logits"
_ONNX_ACTIVATIONS = {"relu": "Relu", "elu": "Elu"}


def to_onnx(layers: list[FoldedLayer], name: str = "meshnet") -> onnx.ModelProto:
    """(1, C_in, D, H, W) -> logits (1, n_classes, D, H, W), with D, H, W dynamic."""
    nodes, weights = [], []
    current = INPUT
    for index, layer in enumerate(layers):
        w, b = f"w{index}", f"b{index}"
        weights += [numpy_helper.from_array(layer.weight.numpy(), w),
                    numpy_helper.from_array(layer.bias.numpy(), b)]
        conv_out = OUTPUT if index == len(layers) - 1 and not layer.activation else f"c{index}"
        k, pad = layer.weight.shape[-1], layer.padding
        nodes.append(helper.make_node("Conv", [current, w, b], [conv_out], kernel_shape=[k] * 3,
                                      dilations=[layer.dilation] * 3, pads=[pad] * 6))
        current = conv_out
        if layer.activation:
            act_out = OUTPUT if index == len(layers) - 1 else f"a{index}"
            nodes.append(helper.make_node(_ONNX_ACTIVATIONS[layer.activation], [current],
                                          [act_out]))
            current = act_out
    c_in, n_classes = layers[0].weight.shape[1], layers[-1].weight.shape[0]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, c_in, "D", "H", "W"])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1, n_classes, "D", "H", "W"])],
        initializer=weights)
    model = helper.make_model(graph, producer_name="meshseg", ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def export_onnx(layers: list[FoldedLayer], path, name: str = "meshnet") -> None:
    """Write the ONNX graph atomically."""
    model = to_onnx(layers, name)
    with atomic_path(path, suffix=".part.onnx") as tmp:
        onnx.save(model, str(tmp))


def verify_onnx(layers: list[FoldedLayer], path, shape: tuple[int, int, int] = (24, 28, 20),
                tolerance: float = 1e-4) -> float:
    """Largest |onnxruntime - torch| logit difference on a random volume; refuses a mismatch.

    Raises:
        WeightsError: the difference exceeds `tolerance` (relative to the logits' scale).
    """
    from meshseg.pipeline.infer import run_layers

    x = torch.from_numpy(np.random.default_rng(0).random((1, *shape), dtype=np.float32))
    device = torch.device("cpu")
    expected = run_layers(x, layers, device)
    got = onnx_runner(read_onnx(path), device, str(path))(x)
    error = float((got - expected).abs().max())
    if error > tolerance * max(1.0, float(expected.abs().max())):
        raise WeightsError(f"{path}: ONNX output differs from PyTorch by {error:.2e}")
    return error


def read_onnx(path) -> bytes:
    """An .onnx file's bytes, checked to be a model that maps one volume to two classes'
    logits, with only standard ONNX operators (so neither runtime fails on it mid-run).

    Raises:
        WeightsError: missing, not ONNX, not a single 5-D input and output, a class count
            other than 2, an operator outside the ONNX standard, NaN/Inf weights, or a
            dilation beyond MAX_DILATION.
    """
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except (OSError, ValueError, DecodeError, onnx.checker.ValidationError) as err:
        raise WeightsError(f"{path}: not a readable ONNX model ({err})") from err
    inputs = model.graph.input
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 5:
        raise WeightsError(f"{path}: expected one (1, C, D, H, W) input")
    check_output(path, model.graph.output)
    unknown = sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in model.graph.node
                      if not onnx.defs.has(n.op_type, n.domain)})
    if unknown:
        raise WeightsError(f"{path}: uses operators outside the ONNX standard "
                           f"({', '.join(unknown)}); meshseg runs standard ONNX only")
    for initializer in model.graph.initializer:
        check_finite(path, initializer.name, numpy_helper.to_array(initializer))
    for node in model.graph.node:
        dilations = next((list(a.ints) for a in node.attribute if a.name == "dilations"), [])
        if node.op_type == "Conv" and any(not 1 <= d <= MAX_DILATION for d in dilations):
            raise WeightsError(f"{path}: Conv node {node.name or node.output[0]} has "
                               f"dilations {dilations} (each must be 1..{MAX_DILATION})")
    return model.SerializeToString()


def check_output(path, outputs) -> None:
    """One (1, 2, D, H, W) output: background and lesion logits (a symbolic class count is
    checked on every volume by predict's runner, `infer.check_classes`).

    Raises:
        WeightsError: not one 5-D output, or a fixed class count other than 2.
    """
    dims = outputs[0].type.tensor_type.shape.dim if len(outputs) == 1 else []
    if len(dims) != 5:
        raise WeightsError(f"{path}: expected one (1, 2, D, H, W) output, "
                           f"found {len(outputs)} output(s)")
    if dims[1].HasField("dim_value"):
        check_classes(path, dims[1].dim_value)


def onnx_parameters(model_bytes: bytes) -> int:
    """Number of weight values held by the graph's initializers."""
    model = onnx.load_from_string(model_bytes)
    return int(sum(np.prod(t.dims) for t in model.graph.initializer))


def onnx_runner(model_bytes: bytes, device: torch.device, name: str = "ONNX model"):
    """An infer.Runner on onnxruntime: (C, D, H, W) -> logits (2, D, H, W).

    Raises:
        DeviceError: CUDA was asked for but this onnxruntime has no CUDA provider.
        WeightsError: onnxruntime cannot load the graph, or (on a volume) it gives other than
            two classes.
    """
    import onnxruntime as ort

    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeviceError("--backend onnx --device cuda: this onnxruntime has no CUDA "
                              "provider (install onnxruntime-gpu)")
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})]
    else:
        providers = ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(model_bytes, options, providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise WeightsError(f"{name}: onnxruntime cannot load this model "
                           f"({first_line(err)})") from err
    feed, fetch = session.get_inputs()[0].name, session.get_outputs()[0].name

    def run(x: torch.Tensor, on_layer=None, keep=None) -> torch.Tensor:
        logits = session.run([fetch], {feed: x[None].numpy()})[0][0]
        if on_layer is not None:
            on_layer(1, 1)  # onnxruntime runs the whole graph in one call
        return torch.from_numpy(logits[(slice(None), *keep)] if keep else logits)

    return run


OPENVINO_HINT = "OpenVINO is not installed: pip install 'meshseg[openvino]'"


def openvino_runner(model_bytes: bytes, device: torch.device, precision: str = "fp32",
                    name: str = "ONNX model"):
    """An infer.Runner on OpenVINO's CPU plugin: the ONNX graph compiled for the CPU's own
    kernels, (C, D, H, W) -> logits inside `keep` (n_classes, d, h, w).

    It runs the whole crop in one call, so its activations are whole volumes: 1.3-2.2x the
    memory of torch's slabs, for 0.9-1.3x their time on the 2-core machine measured
    (docs/benchmarks.md). It uses torch's thread count (`infer.set_threads`).

    Raises:
        DeviceError: a device other than the CPU, or bf16 on a CPU without bf16 instructions.
        WeightsError: OpenVINO is not installed.
    """
    from meshseg.pipeline.infer import check_precision

    if device.type != "cpu":
        raise DeviceError(f"--backend openvino runs on the CPU only, not {device}")
    if precision not in ("fp32", "bf16"):
        raise DeviceError(f"--precision {precision}: the openvino backend runs fp32 or bf16")
    check_precision(precision, device)
    try:
        import openvino
    except ImportError as err:
        raise WeightsError(OPENVINO_HINT) from err
    core = openvino.Core()
    try:
        compiled = core.compile_model(core.read_model(model_bytes, b""), "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    except RuntimeError as err:  # OpenVINO's errors are RuntimeErrors with a long text
        raise WeightsError(f"{name}: OpenVINO cannot load this model "
                           f"({first_line(err)})") from err

    def run(x: torch.Tensor, on_layer=None, keep=None) -> torch.Tensor:
        logits = compiled({0: x[None].numpy()})[0][0]
        if on_layer is not None:
            on_layer(1, 1)  # one call runs the whole graph
        return torch.from_numpy(np.ascontiguousarray(logits[(slice(None), *keep)] if keep
                                                     else logits))

    return run
