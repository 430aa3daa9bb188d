"""meshseg with the shared brainchop model reproduces brainchop's own pipeline.

The reference below is written from the shared model README alone, independently of
meshseg.models.tfjs and meshseg.pipeline.infer: read model.bin with numpy, min-max the
conformed uint8 volume, crop to voxels > 0 plus 18 zero voxels, run torch's conv3d layer after
layer on the whole crop, argmax, put the labels back, keep the largest 26-connected lesion.
"""

import json

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from scipy import ndimage

from meshseg.cli import main
from meshseg.pipeline.conform import CONFORMED_SHAPE, conformed_affine
from tests.conftest import blob

PAD = 18


def brainchop_reference(conformed_u8: np.ndarray, model_json) -> np.ndarray:
    """brainchop's pipeline for a MeshNet layers model, as its README describes it."""
    spec = json.loads(model_json.read_text())
    raw = np.fromfile(model_json.parent / spec["weightsManifest"][0]["paths"][0], "<f4")
    tensors, offset = {}, 0
    for entry in spec["weightsManifest"][0]["weights"]:
        size = int(np.prod(entry["shape"]))
        tensors[entry["name"]] = raw[offset:offset + size].reshape(entry["shape"])
        offset += size
    convs = [layer["config"] for layer in spec["modelTopology"]["model_config"]["config"]["layers"]
             if layer["class_name"] == "Conv3D"]

    x = conformed_u8.astype(np.float32)
    x = (x - x.min()) / (x.max() - x.min())
    nz = np.argwhere(x > 0)
    lo, hi = nz.min(0), nz.max(0) + 1
    crop = np.pad(x[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], PAD)
    t = torch.from_numpy(crop)[None, None]
    with torch.no_grad():
        for i, cfg in enumerate(convs):
            kernel = torch.from_numpy(tensors[f"{cfg['name']}/kernel"]).permute(4, 3, 0, 1, 2)
            bias = torch.from_numpy(tensors[f"{cfg['name']}/bias"])
            d = cfg["dilation_rate"][0]
            t = F.conv3d(t, kernel.contiguous(), bias, padding=d * (kernel.shape[-1] // 2),
                         dilation=d)
            if i < len(convs) - 1:
                t = F.elu(t)
    labels = t[0].argmax(0).numpy()[PAD:-PAD, PAD:-PAD, PAD:-PAD].astype(bool)
    out = np.zeros(x.shape, bool)
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = labels
    comps, n = ndimage.label(out, structure=np.ones((3, 3, 3)))
    if n > 1:
        sizes = np.bincount(comps.ravel())
        sizes[0] = 0
        out = comps == sizes.argmax()
    return out


def phantom_head() -> np.ndarray:
    """A small conformed uint8 'head': grey brain, brighter CSF-like cavity, dark rim."""
    shape = CONFORMED_SHAPE
    c = np.array(shape) // 2
    vol = np.zeros(shape, np.float32)
    vol[blob(shape, c, 48)] = 90
    vol[blob(shape, c, 44)] = 110
    vol[blob(shape, c + (12, -6, 8), 14)] = 230
    rng = np.random.default_rng(1)
    vol[vol > 0] += rng.normal(0, 6, int((vol > 0).sum()))
    return np.clip(vol, 0, 255).astype(np.uint8)


def test_matches_brainchop_on_conformed_scan(shared_model, tmp_path):
    conformed = phantom_head()
    affine = conformed_affine(CONFORMED_SHAPE, np.eye(4))
    src = tmp_path / "conformed.nii.gz"
    nib.save(nib.Nifti1Image(conformed, affine), src)
    out = tmp_path / "mask.nii.gz"
    result = CliRunner().invoke(main, ["predict", str(src), "-o", str(out), "-m",
                                       str(shared_model), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    ours = np.asarray(nib.load(out).dataobj).astype(bool)
    theirs = brainchop_reference(conformed, shared_model)
    assert theirs.sum() > 0, "the phantom should contain a lesion for the model to find"
    differ = int((ours != theirs).sum())
    assert differ <= max(2, theirs.sum() // 1000), (differ, int(theirs.sum()))


def test_axis_order_matters(shared_model):
    """Guards the test above: feeding the axes in another order changes the lesion."""
    conformed = phantom_head()
    straight = brainchop_reference(conformed, shared_model)
    swapped = brainchop_reference(np.swapaxes(conformed, 0, 2), shared_model)
    assert (np.swapaxes(swapped, 0, 2) != straight).sum() > straight.sum() // 10
