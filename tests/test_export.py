"""ONNX export and the onnxruntime backend agree with the PyTorch backend."""

from importlib.util import find_spec

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from meshseg.cli import main
from meshseg.errors import DeviceError, WeightsError
from meshseg.models.export import onnx_runner, openvino_runner, read_onnx, to_onnx
from meshseg.models.meshnet import MeshNet, MeshNetConfig, fold
from meshseg.models.weights import save_checkpoint
from meshseg.pipeline.infer import run_layers
from tests.test_cli import head
from tests.test_model import randomise_batch_norms


@pytest.fixture
def checkpoint(tmp_path):
    model = MeshNet(MeshNetConfig(channels=3, activation="elu"))
    randomise_batch_norms(model, seed=0)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model.eval())
    return path, model.eval()


@pytest.mark.parametrize("shape", [(17, 23, 11), (30, 9, 26)])
def test_onnx_graph_equals_torch_on_any_size(checkpoint, shape):
    _, model = checkpoint
    layers = fold(model)
    run = onnx_runner(to_onnx(layers).SerializeToString(), torch.device("cpu"))
    x = torch.rand((1, *shape))
    torch.testing.assert_close(run(x), run_layers(x, layers, torch.device("cpu")),
                               rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x[None])[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(17, 23, 11), (30, 9, 26)])
def test_openvino_equals_torch_on_any_size_and_keeps_the_box(checkpoint, shape):
    """One compiled graph runs every crop size; the result is the logits inside `keep`."""
    pytest.importorskip("openvino")
    layers = fold(checkpoint[1])
    run = openvino_runner(to_onnx(layers).SerializeToString(), torch.device("cpu"))
    x = torch.rand((1, *shape))
    keep = (slice(2, 9), slice(1, shape[1] - 1), slice(0, 5))
    torch.testing.assert_close(run(x, None, keep),
                               run_layers(x, layers, torch.device("cpu"), keep=keep),
                               rtol=1e-4, atol=1e-5)


def test_openvino_refuses_cuda_and_fp16(checkpoint):
    graph = to_onnx(fold(checkpoint[1])).SerializeToString()
    with pytest.raises(DeviceError, match="CPU only"):
        openvino_runner(graph, torch.device("cuda"))
    with pytest.raises(DeviceError, match="fp32 or bf16"):
        openvino_runner(graph, torch.device("cpu"), "fp16")


def test_export_command_and_onnx_backend(checkpoint, tmp_path, write_nifti):
    path, _ = checkpoint
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", "onnx", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "max |onnxruntime - torch|" in result.output
    scan = write_nifti(head()[0])
    masks = {}
    runs = {"torch": ["-m", str(path), "--backend", "torch"], "onnx-file": ["-m", str(out)],
            "onnx-backend": ["-m", str(path), "--backend", "onnx"]}
    if find_spec("openvino") is not None:
        runs["openvino"] = ["-m", str(path), "--backend", "openvino"]
    for name, args in runs.items():
        target = tmp_path / f"{name}.nii.gz"
        result = CliRunner().invoke(main, ["predict", str(scan), "-o", str(target), "--prob",
                                           "-q", *args])
        assert result.exit_code == 0, result.output
        masks[name] = np.asarray(nib.load(tmp_path / f"{name}_prob.nii.gz").dataobj)
    np.testing.assert_allclose(masks["onnx-file"], masks["torch"], atol=1e-5)
    np.testing.assert_allclose(masks["onnx-backend"], masks["torch"], atol=1e-5)
    if "openvino" in masks:
        np.testing.assert_allclose(masks["openvino"], masks["torch"], atol=1e-5)


def test_onnx_model_refuses_torch_backend_and_bad_files(checkpoint, tmp_path, write_nifti):
    path, model = checkpoint
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(to_onnx(fold(model)).SerializeToString())
    scan = write_nifti(head()[0])
    result = CliRunner().invoke(main, ["predict", str(scan), "-m", str(onnx_path),
                                       "--backend", "torch"])
    assert result.exit_code == 1 and "runs only with --backend onnx" in result.output
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    with pytest.raises(WeightsError, match="junk.onnx: not a readable ONNX model"):
        read_onnx(junk)


def bad_onnx(path, *, classes: int = 2, custom_op: bool = False, outputs: int = 1,
             symbolic_classes: bool = False):
    """A 1x1x1-Conv ONNX model built with onnx.helper, wrong in the way asked for."""
    from onnx import TensorProto, helper, numpy_helper, save

    weight = numpy_helper.from_array(np.full((classes, 1, 1, 1, 1), 0.1, np.float32), "w")
    names = [f"out{i}" for i in range(outputs)]
    nodes = [helper.make_node("Conv", ["volume", "w"], ["conv" if custom_op else name])
             for name in names]
    if custom_op:
        nodes.append(helper.make_node("Frobnicate", ["conv"], names, domain="com.example"))
    channels = "C" if symbolic_classes else classes
    graph = helper.make_graph(
        nodes, "bad", [helper.make_tensor_value_info("volume", TensorProto.FLOAT,
                                                     [1, 1, "D", "H", "W"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, channels, "D", "H", "W"])
         for name in names], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    save(model, str(path))
    return path


@pytest.mark.parametrize("kind, expected", [
    ({"custom_op": True}, "uses operators outside the ONNX standard (com.example:Frobnicate)"),
    ({"outputs": 2}, "expected one (1, 2, D, H, W) output, found 2 output(s)"),
    ({"classes": 3}, "the model gives 3 classes; meshseg needs 2"),
    ({"classes": 3, "symbolic_classes": True}, "the model gives 3 classes; meshseg needs 2")])
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_bad_onnx_models_end_in_one_line_naming_the_file(tmp_path, write_nifti, kind, expected,
                                                        backend):
    """Issue 20 item 15: an unknown op or two outputs gave an onnxruntime traceback, three
    classes exit 0 and an empty mask; on every backend (the class count is checked on each
    backend's logits, predict.runner)."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    model = bad_onnx(tmp_path / "bad.onnx", **kind)
    scan = write_nifti(head()[0])
    out = tmp_path / "out.nii.gz"
    result = CliRunner().invoke(main, ["predict", str(scan), "-m", str(model),
                                       "--backend", backend, "-o", str(out), "--no-qc"])
    assert result.exit_code == 1, result.output
    assert f"{model}: {expected}" in result.output
    assert "Traceback" not in result.output and not out.exists()

