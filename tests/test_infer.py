"""Slab-wise layer-by-layer inference equals the plain full-volume MeshNet forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meshseg.errors import DeviceError
from meshseg.models.meshnet import ACTIVATIONS, MeshNet, MeshNetConfig, fold
from meshseg.pipeline import infer
from meshseg.pipeline.infer import (
    head_box,
    lesion_probability,
    resolve_device,
    run_layers,
    torch_runner,
)
from tests.conftest import blob
from tests.test_model import randomise_batch_norms

CPU = torch.device("cpu")


def small_meshnet(in_channels: int = 1, activation: str = "elu", seed: int = 0) -> MeshNet:
    """A narrow eval-mode MeshNet with all 9 paper dilations and random batch norms."""
    torch.manual_seed(seed)
    model = MeshNet(MeshNetConfig(channels=3, activation=activation, in_channels=in_channels))
    randomise_batch_norms(model, seed)
    return model.eval()


def forward(model: MeshNet, x: torch.Tensor) -> torch.Tensor:
    """The reference: one full-volume forward pass, (C, D, H, W) -> (n_classes, D, H, W)."""
    with torch.no_grad():
        return model(x[None])[0]


@pytest.mark.parametrize("slab", [1, 3, 7, None])
@pytest.mark.parametrize(("shape", "in_channels", "activation"), [
    ((20, 24, 18), 1, "elu"),
    ((9, 21, 5), 2, "relu"),  # D and W smaller than the largest dilation (16)
])
def test_run_layers_equals_full_volume_forward(shape, in_channels, activation, slab):
    model = small_meshnet(in_channels, activation)
    x = torch.rand(in_channels, *shape, generator=torch.Generator().manual_seed(3))
    logits = run_layers(x, fold(model), CPU, slab=slab)
    assert logits.dtype == torch.float32 and logits.is_contiguous()
    assert not logits.is_inference()
    torch.testing.assert_close(logits, forward(model, x), rtol=1e-5, atol=1e-5)


def test_run_layers_reports_each_layer():
    calls = []
    layers = fold(small_meshnet())
    run_layers(torch.rand(1, 4, 5, 6), layers, CPU, on_layer=lambda i, n: calls.append((i, n)))
    done = [i for i, _ in calls]
    assert done == list(range(1, len(calls) + 1)) and calls[-1][0] == calls[-1][1]


@pytest.mark.parametrize(("x", "slab", "message"), [
    (torch.rand(2, 4, 4, 4), None, "channels"),
    (torch.rand(4, 4, 4), None, "4-D"),
    (torch.rand(1, 4, 4, 4, dtype=torch.float64), None, "float32"),
    (torch.rand(1, 4, 4, 4), 0, "slab"),
])
def test_run_layers_rejects_bad_arguments(x, slab, message):
    with pytest.raises(ValueError, match=message):
        run_layers(x, fold(small_meshnet()), CPU, slab=slab)


def test_run_layers_needs_layers():
    with pytest.raises(ValueError, match="at least one layer"):
        run_layers(torch.rand(1, 4, 4, 4), [], CPU)


@pytest.mark.parametrize(("center", "margin"), [((14, 12, 10), 18), ((3, 12, 20), 4)])
def test_lesion_probability_is_softmax_of_the_padded_crop(center, margin):
    """The second case's head touches the volume border: the crop still gets `margin` zeros."""
    shape = (28, 26, 24)
    head = blob(shape, center, 6)
    rng = np.random.default_rng(0)
    volume = np.where(head, rng.uniform(0.2, 1.0, shape), 0).astype(np.float32)
    model = small_meshnet()

    probability = lesion_probability(volume, torch_runner(fold(model), CPU, slab=5),
                                     margin=margin)

    box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(head))
    crop = torch.from_numpy(np.pad(volume[box], margin))[None]
    inner = tuple(slice(margin, n - margin) for n in crop.shape[1:])
    expected = np.zeros(shape, np.float32)
    expected[box] = torch.softmax(forward(model, crop), dim=0)[(1, *inner)].numpy()
    assert probability.dtype == np.float32 and probability.shape == shape
    np.testing.assert_allclose(probability, expected, rtol=1e-5, atol=1e-6)
    assert probability[box].min() > 0


def test_lesion_probability_of_an_empty_volume_is_zero_without_running():
    calls = []
    probability = lesion_probability(np.zeros((6, 7, 8), np.float32),
                                     lambda x, on_layer, keep: calls.append(x))
    assert probability.shape == (6, 7, 8) and not probability.any() and calls == []


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=f"--device {name}: CUDA is not available"):
            resolve_device(name)


def test_resolve_device_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match="2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", ""])
def test_resolve_device_rejects_unknown_names(name):
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["mps", "mps:0"])
def test_resolve_device_says_mps_is_not_supported(name):
    """Issue 20 item 10: a Mac user's first try read "unknown device"."""
    with pytest.raises(DeviceError, match=f"--device {name}: Apple's MPS is not supported; "
                                          "use --device cpu"):
        resolve_device(name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_layers_on_cuda_equals_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare at float32 precision
    model = small_meshnet()
    x = torch.rand(1, 20, 24, 18, generator=torch.Generator().manual_seed(5))
    for slab in (3, None):
        logits = run_layers(x, fold(model), torch.device("cuda"), slab=slab)
        assert logits.device == CPU
        torch.testing.assert_close(logits, forward(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("keep", [
    (slice(5, 12), slice(3, 20), slice(4, 9)),   # interior: every side shrinks
    (slice(0, 20), slice(0, 6), slice(10, 18)),  # touches some borders only
    (slice(7, 8), slice(11, 12), slice(0, 1)),   # a single voxel
])
@pytest.mark.parametrize("slab", [1, 4, None])
def test_keep_region_equals_the_full_pass(keep, slab):
    model = small_meshnet()
    x = torch.rand(1, 20, 24, 18, generator=torch.Generator().manual_seed(3))
    full = run_layers(x, fold(model), CPU)
    part = run_layers(x, fold(model), CPU, slab=slab, keep=keep)
    torch.testing.assert_close(part, full[(slice(None), *keep)], rtol=1e-5, atol=1e-6)


def _noisy_head(noise: float) -> tuple[np.ndarray, tuple[slice, ...]]:
    """An ellipsoid 'head' in a 96^3 volume with uniform background noise of `noise`."""
    rng = np.random.default_rng(0)
    volume = (rng.random((96, 96, 96), dtype=np.float32) * noise).astype(np.float32)
    grid = np.indices(volume.shape)
    head = ((grid[0] - 40) / 20) ** 2 + ((grid[1] - 50) / 30) ** 2 + ((grid[2] - 48) / 25) ** 2 < 1
    volume[head] = 0.5 + 0.1 * rng.random(int(head.sum()), dtype=np.float32)
    found = np.argwhere(head)
    return volume, tuple(slice(a, b + 1) for a, b in zip(found.min(0), found.max(0)))


def test_head_box_ignores_background_noise():
    volume, truth = _noisy_head(noise=0.02)
    box = head_box(volume)
    for got, want in zip(box, truth):
        assert got.start <= want.start and got.stop >= want.stop  # whole head inside
        assert (want.start - got.start) <= 6 and (got.stop - want.stop) <= 6  # and tight


def test_head_box_equals_brainchop_crop_without_noise():
    volume, truth = _noisy_head(noise=0.0)
    assert head_box(volume) == truth


def test_head_crop_keeps_the_head_result():
    """Within the head, cropping to the head changes nothing for a context-free network."""
    volume, truth = _noisy_head(noise=0.02)
    model = small_meshnet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv3d) and module.kernel_size == (3, 3, 3):
                centre = module.weight[:, :, 1, 1, 1].clone()
                module.weight.zero_()
                module.weight[:, :, 1, 1, 1] = centre
    run = torch_runner(fold(model), CPU)
    full = lesion_probability(volume, run)
    cropped = lesion_probability(volume, run, crop="head")
    np.testing.assert_allclose(cropped[truth], full[truth], rtol=1e-5, atol=1e-6)


def test_brainchop_crop_over_noise_is_computed_and_written_only_in_the_head():
    """Noise makes brainchop's crop (the voxels > 0) the whole volume: the network still sees
    exactly that crop, but only the head's box is computed and written."""
    volume, _ = _noisy_head(noise=0.02)
    model = small_meshnet()
    probability = lesion_probability(volume, torch_runner(fold(model), CPU), margin=4)

    head = head_box(volume)
    crop = torch.from_numpy(np.pad(volume, 4))[None]  # the box of the voxels > 0 is all
    full = torch.softmax(forward(model, crop), dim=0)[1, 4:-4, 4:-4, 4:-4].numpy()
    np.testing.assert_allclose(probability[head], full[head], rtol=1e-5, atol=1e-6)
    outside = np.ones(volume.shape, bool)
    outside[head] = False
    assert outside.any() and not probability[outside].any()


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="this CPU has no bf16 instructions (oneDNN refuses bf16 convolutions)")
def test_bf16_is_close_to_fp32():
    model = small_meshnet()
    x = torch.rand(1, 20, 24, 18, generator=torch.Generator().manual_seed(5))
    exact = run_layers(x, fold(model), CPU)
    half = run_layers(x, fold(model), CPU, slab=4, dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    assert float((half - exact).abs().max()) < 0.05 * float(exact.abs().max())


def test_fp16_needs_cuda():
    with pytest.raises(DeviceError, match="fp16 needs CUDA"):
        torch_runner(fold(small_meshnet()), CPU, precision="fp16")


def test_random_shapes_boxes_and_slabs_equal_the_full_pass():
    rng = np.random.default_rng(0)
    model = small_meshnet()
    layers = fold(model)
    for _ in range(20):
        shape = tuple(int(n) for n in rng.integers(1, 26, 3))
        x = torch.from_numpy(rng.random((1, *shape), dtype=np.float32))
        starts = [int(rng.integers(0, n)) for n in shape]
        keep = tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(starts, shape))
        slab = [1, 2, 3, 5, None][int(rng.integers(5))]
        part = run_layers(x, layers, CPU, slab=slab, keep=keep)
        torch.testing.assert_close(part, forward(model, x)[(slice(None), *keep)],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("slack", [0, 0.5, 3])
def test_window_slack_does_not_change_results(monkeypatch, slack):
    # slack 0 compacts windows on nearly every slab, in pieces smaller than the held rows
    monkeypatch.setattr(infer, "WINDOW_SLACK", slack)
    model = small_meshnet()
    x = torch.rand(1, 23, 19, 21, generator=torch.Generator().manual_seed(5))
    for slab in (1, 2, None):
        torch.testing.assert_close(run_layers(x, fold(model), CPU, slab=slab),
                                   forward(model, x), rtol=1e-5, atol=1e-5)


def test_only_the_network_input_is_padded_by_a_copy(monkeypatch):
    # windows hold their zero rows, so deep halos never cost a padded copy of a whole window
    padded = []
    real_pad = torch.nn.functional.pad
    monkeypatch.setattr(infer.F, "pad", lambda t, *a, **k: padded.append(t.shape[1])
                        or real_pad(t, *a, **k))
    model = small_meshnet(in_channels=2)
    x = torch.rand(2, 30, 12, 12, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(run_layers(x, fold(model), CPU, slab=2), forward(model, x),
                               rtol=1e-5, atol=1e-5)
    assert padded and set(padded) == {2}  # only windows of the 2-channel input


@pytest.mark.parametrize("activation", ["elu", "relu", None])
@pytest.mark.parametrize("channels_last", [True, False])
def test_activation_into_a_window_is_bit_identical_to_the_module(activation, channels_last):
    # written straight into the window (one pass), the values must stay those of nn.ELU/ReLU,
    # also for a y in another layout (the first layer's), where aten's kernel would differ
    y = torch.randn(1, 11, 3, 17, 19, generator=torch.Generator().manual_seed(7)) * 4
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last_3d)
    module = ACTIVATIONS[activation](inplace=True) if activation else torch.nn.Identity()
    expected = module(y.clone())
    window = infer._window_buffer(11, 8, (slice(0, 3), slice(0, 17), slice(0, 19)), (0, 8),
                                  torch.float32, CPU)
    window.extend(2).zero_()
    infer._activate_into(y, activation, window.extend(3))
    assert torch.equal(window.rows(2, 5), expected)
    assert torch.equal(window.rows(0, 2), torch.zeros(1, 11, 2, 17, 19))


@pytest.mark.parametrize("in_channels", [1, 2])
def test_non_contiguous_input_equals_the_full_pass(in_channels):
    # a single channel is handed to oneDNN with channels-last strides (a view of x): that
    # view must follow x's values whatever x's own strides
    model = small_meshnet(in_channels)
    x = torch.rand(in_channels, 13, 11, 17, generator=torch.Generator().manual_seed(8))
    flipped = x.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    assert not flipped.is_contiguous()
    torch.testing.assert_close(run_layers(flipped, fold(model), CPU, slab=4),
                               forward(model, x), rtol=1e-5, atol=1e-5)
