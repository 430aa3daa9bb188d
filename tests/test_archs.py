"""The benchmark architectures: paper parameter counts, forward passes on small volumes, the
Mamba CPU path, the KAN layer, `meshseg arch`, and training and predicting by name.

Forward passes use the smallest cube each network takes (twice its down-sampling); those that
take seconds on two CPU cores are marked slow.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from meshseg import archs
from meshseg.cli import main
from meshseg.errors import InputError, WeightsError
from meshseg.io import load_volume
from meshseg.models import catalog
from meshseg.models.weights import load_network
from meshseg.pipeline import predict
from meshseg.training.train import fit
from tests.test_data import write_pair
from tests.test_train import config  # noqa: F401 (the tiny training run's fixture)

# over ~3 s each on two busy CPU cores; MedNeXt-S and the Mamba layer test stand in for
# their siblings in the fast suite
SLOW_FORWARD = {"swinunetr", "unetr", "mednext-b", "mednext-m", "umamba-bot", "umamba-enc",
                "ukan"}


def test_arch_command_lists_the_paper_counts():
    """All 14 networks, counted for in=1, out=2 at 256^3, equal the paper's counts."""
    result = CliRunner().invoke(main, ["arch", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == list(archs.PAPER_PARAMETERS)
    assert {r["name"]: r["parameters"] for r in rows} == archs.PAPER_PARAMETERS
    assert all(set(r) == {"name", "parameters", "source", "unavailable"} for r in rows)
    assert not any(r["unavailable"] for r in rows)


def test_arch_without_monai_lists_every_network(monkeypatch):
    """Issue 20 item 7: without MONAI, `meshseg arch` lists all 14 (MeshNets counted, the
    rest marked) and exits 0, with one line on what to install; it exited 1 listing nothing."""
    monkeypatch.setitem(sys.modules, "monai", None)  # import monai raises ImportError
    result = CliRunner().invoke(main, ["arch"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "not installed" in result.stdout and "meshnet-5" in result.stdout
    assert archs.INSTALL_HINT in result.stderr


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FORWARD else n
    for n in archs.ARCHITECTURES])
def test_forward_on_a_small_volume(name):
    arch = archs.get(name)
    side = 2 * arch.downsampling if arch.downsampling > 1 else 8
    options = {"size": side} if "size" in arch.options else {}
    torch.manual_seed(0)
    network = archs.build(name, **options).eval()
    with torch.no_grad():
        logits = network(torch.rand(1, 1, side, side, side))
    assert logits.shape == (1, 2, side, side, side)
    assert torch.isfinite(logits).all()


def test_unknown_names_options_and_sizes_are_refused():
    with pytest.raises(InputError, match="unknown architecture 'unet3d' .known: meshnet, "
                                         "segresnet"):
        archs.build("unet3d")
    with pytest.raises(InputError, match="MeshNet-16 is --architecture meshnet --channels 16"):
        archs.get("meshnet-16")
    with pytest.raises(InputError, match="architecture vnet takes no option size"):
        archs.build("vnet", size=64)
    with pytest.raises(InputError, match="size 40: architecture unetr needs a multiple of 16 "
                                         "that is at least 32"):
        archs.build("unetr", size=40)
    assert archs.settings("meshnet-5") == {"architecture": "meshnet", "channels": 5}
    assert archs.settings("ukan") == {"architecture": "ukan"}


def test_any_meshnet_width_by_name():
    """meshnet-N selects MeshNet with N channels, so cv can compare any width."""
    assert archs.settings("meshnet-12") == {"architecture": "meshnet", "channels": 12}
    assert archs.count_parameters("meshnet-12", {}) == 31_778  # the bundled MeshNet-12
    assert archs.count_parameters("meshnet-26", {}) == archs.PAPER_PARAMETERS["meshnet-26"]
    for bad in ("meshnet-0", "meshnet-07", "meshnet-", "meshnet-x", "meshnet-12b"):
        with pytest.raises(InputError, match=f"unknown architecture '{bad}'"):
            archs.settings(bad)
    with pytest.raises(InputError, match="MeshNet-12 is --architecture meshnet --channels 12"):
        archs.get("meshnet-12")


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)  # makes `import monai` fail
    with pytest.raises(InputError, match=r"architecture segresnet needs MONAI: pip install "
                                         r"'meshseg\[benchmark\]'"):
        archs.build("segresnet")


def test_mamba_cpu_path_has_mamba_ssm_parameter_layout():
    from meshseg.archs.umamba import MambaLayer

    layer = MambaLayer(8)
    assert {name for name, _ in layer.mamba.named_parameters()} == {
        "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
        "dt_proj.bias", "A_log", "D", "out_proj.weight"}
    x = torch.rand(2, 8, 3, 5, 4)  # a token count that is not a power of two
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    tokens = MambaLayer(3 * 5 * 4, channel_tokens=True)(x)  # Enc's channel-token layout
    assert tokens.shape == x.shape


def test_kan_layer_shapes_and_spline_bases():
    from meshseg.archs.ukan import GRID_SIZE, SPLINE_ORDER, KANLinear

    layer = KANLinear(4, 3)
    assert layer(torch.rand(2, 5, 4)).shape == (2, 5, 3)
    assert sum(p.numel() for p in layer.parameters()) == 4 * 3 * (2 + GRID_SIZE + SPLINE_ORDER)
    inside = torch.linspace(-1, 0.999, 101).reshape(-1, 1).expand(-1, 4)
    bases = layer.bases(inside)
    assert bases.shape == (101, 4, GRID_SIZE + SPLINE_ORDER)
    torch.testing.assert_close(bases.sum(-1), torch.ones(101, 4))
    assert (bases >= 0).all()
    assert layer.bases(torch.full((1, 4), 5.0)).abs().sum() == 0  # no support beyond the grid


def test_tiled_inference_equals_the_whole_pass_for_a_pointwise_network():
    """Windows smaller than the crop, overlapping, blended: a 1x1x1 network must come out as
    if run on the whole crop, inside the kept box only."""
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 2, 1)
    x = torch.rand(1, 20, 27, 33)
    keep = (slice(2, 18), slice(3, 24), slice(0, 33))
    run = predict.window_runner(network, 16, torch.device("cpu"))
    with torch.no_grad():
        expected = network(x[None])[0][(slice(None), *keep)]
    torch.testing.assert_close(run(x, None, keep), expected)


@pytest.mark.parametrize("change, message", [
    ({"architecture": "unet3d"}, "unknown architecture 'unet3d'"),
    ({"architecture": "resunet"}, "crop 12: architecture resunet needs a multiple of 16"),
    ({"architecture": "segresnet", "crop": 16, "checkpointing": True},
     "checkpointing=True: layer checkpointing is for MeshNet only"),
])
def test_train_refuses_what_the_architecture_cannot_take(config, change, message):  # noqa: F811
    with pytest.raises(InputError, match=message):
        fit(replace(config, **change))
    assert not config.out.exists()


@pytest.fixture
def baseline_config(config, tmp_path):  # noqa: F811
    """The tiny training run on 32^3 volumes, training the residual U-Net (the fastest
    baseline) on whole 32^3 cubes."""
    rows = ["image,mask,subject"]
    for i, centre in enumerate([(8, 9, 10), (20, 16, 14), (12, 20, 22), (16, 16, 16)]):
        pair = write_pair(tmp_path / "in32", f"s{i}", shape=(32, 32, 32), center=centre,
                          radius=4, seed=i)
        rows.append(f"{pair.image.name},{pair.mask.name},s{i}")
    (tmp_path / "in32" / "train.csv").write_text("\n".join(rows) + "\n")
    return replace(config, data=tmp_path / "in32" / "train.csv", architecture="resunet",
                   crop=32)


@pytest.fixture
def baseline_run(baseline_config):
    """The residual U-Net trained for one epoch: its run folder."""
    return fit(baseline_config)


def test_train_a_baseline_then_run_it(baseline_run):
    checkpoint = load_network(baseline_run / "best.safetensors")
    assert (checkpoint.architecture, checkpoint.options, checkpoint.window) == ("resunet", {}, 32)
    assert checkpoint.meta["config"]["architecture"] == "resunet"

    model = catalog.load(str(baseline_run / "best.safetensors"))
    assert model.architecture == "Residual U-Net" and model.parameters == 1_979_610
    run = predict.runner(model, torch.device("cpu"))
    keep = (slice(2, 30), slice(0, 32), slice(5, 20))
    logits = run(torch.rand(1, 32, 32, 32), None, keep)
    assert logits.shape == (2, 28, 32, 15) and torch.isfinite(logits).all()
    with pytest.raises(WeightsError, match="onnx backend runs MeshNet models only"):
        predict.runner(model, torch.device("cpu"), backend="onnx")
    export = CliRunner().invoke(main, ["export", "onnx", str(baseline_run / "best.safetensors"),
                                       "-o", str(baseline_run / "x.onnx")])
    assert export.exit_code == 2 and "ONNX export is for MeshNet models only" in export.output


@pytest.mark.slow
def test_segment_a_scan_with_a_trained_baseline(baseline_run, baseline_config):
    """The whole predict pipeline (conform, tiles over the head crop, back to the scan)."""
    model = catalog.load(str(baseline_run / "best.safetensors"))
    run = predict.runner(model, torch.device("cpu"))
    volume = load_volume(baseline_config.data.parent / "s0.nii.gz")
    prob = predict.segment(volume, model, run)
    assert prob.shape == volume.data.shape and 0 <= prob.min() and prob.max() <= 1
