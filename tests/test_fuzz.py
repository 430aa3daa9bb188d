"""Hostile inputs: generated variants of one small valid scan, through the whole pipeline.

Each variant either fails as one MeshsegError line (and no output is written) or gives a mask
on its own grid; a variant whose voxels and grid read back unchanged gives the valid scan's
mask exactly. No variant may raise anything else.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from meshseg.cli import main
from meshseg.io import load_volume
from meshseg.models.catalog import LoadedModel
from meshseg.models.meshnet import MeshNet, MeshNetConfig, fold
from meshseg.pipeline.infer import torch_runner
from meshseg.pipeline.predict import Outputs, segment_file
from tests.conftest import blob, grid_affine

SHAPE = (40, 48, 40)
NIFTI1_END = 352  # header (348) + extender (4)


def valid_image(nifti2: bool = False) -> nib.Nifti1Image:
    """A small 'head' (int16, oblique grid) with a bright ball: the valid scan."""
    rng = np.random.default_rng(0)
    data = np.where(blob(SHAPE, (20, 24, 20), 16), 300.0, 0.0) + rng.random(SHAPE) * 20
    data[blob(SHAPE, (23, 21, 20), 6)] = 1000.0
    affine = grid_affine(zooms=(1.2, 1.0, 1.5), angles_deg=(6, -4, 3), origin=(-20, -30, -25))
    klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = klass(data.astype(np.int16), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def nifti_bytes(img: nib.Nifti1Image, header: nib.Nifti1Header | None = None,
                extension: bytes = b"", offset: int | None = None) -> bytes:
    """A single-file NIfTI byte string: `header` (default: the image's, vox_offset set to
    follow the extensions) as given, its extender and `extension` bytes, then the voxels."""
    data = np.asarray(img.dataobj).astype(img.get_data_dtype()).tobytes(order="F")
    if header is None:
        header = img.header.copy()
        header["vox_offset"] = offset if offset is not None else (
            header.single_vox_offset + len(extension))
    end = header.sizeof_hdr + 4
    extender = b"\x01\0\0\0" if extension else b"\0\0\0\0"
    prefix = header.binaryblock + extender + extension
    assert len(prefix) >= end
    return prefix + data


def with_fields(img: nib.Nifti1Image, **fields) -> bytes:
    """The valid scan with raw header fields overwritten (no consistency fixes)."""
    header = img.header.copy()
    header["vox_offset"] = header.single_vox_offset
    for key, value in fields.items():
        if key[:3] == "dim" and key[3:].isdigit():
            header["dim"][int(key[3:])] = value
        else:
            header[key] = value
    return nifti_bytes(img, header)


def extension_block(size_field: int, length: int = 32) -> bytes:
    """One header extension whose esize field says `size_field` (length bytes are present)."""
    return struct.pack("<ii", size_field, 6) + b"x" * (length - 8)


def scaled(img: nib.Nifti1Image, factor: float, dtype=np.float32) -> bytes:
    """The valid scan's voxels times `factor`, stored as `dtype`."""
    data = np.asarray(img.dataobj, dtype=np.float64) * factor
    out = nib.Nifti1Image(data.astype(dtype), img.affine, header=img.header)
    out.header.set_data_dtype(dtype)
    return nifti_bytes(out)


def gzip_fixed(raw: bytes) -> bytes:
    """gzip with a fixed mtime, so corruption offsets are repeatable."""
    return gzip.compress(raw, mtime=0)


def corrupt_gzip(raw: bytes, how: str) -> bytes:
    data = bytearray(gzip_fixed(raw))
    if how == "flip":  # a byte in the middle of the deflate stream
        data[len(data) // 2] ^= 0x5A
    elif how == "crc":
        data[-8] ^= 0xFF
    elif how == "length":
        data[-1] ^= 0x01
    elif how == "truncated":
        del data[-100:]
    elif how == "trailing":
        data += b"garbage!"
    return bytes(data)


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    gz: bool = False
    expect: str = "any"  # "refused", "same" (voxels and grid unchanged), "warned" or "any"


def named_cases() -> list[Case]:
    """Every trigger of issue 13, and the nearby fields."""
    one, two = valid_image(), valid_image(nifti2=True)
    n1 = nifti_bytes(one)
    cases = [Case("valid", n1, expect="same"), Case("valid-gz", gzip_fixed(n1), True, "same"),
             Case("valid-nifti2", nifti_bytes(two), expect="same")]
    cases += [Case(f"dim0={d}", with_fields(one, dim0=d), expect="refused")
              for d in (-1, 0, 2, 8, 9, 100)]
    cases += [Case("dim4=3", with_fields(one, dim0=4, dim4=3), expect="refused"),
              Case("dim1=0", with_fields(one, dim1=0), expect="refused"),
              Case("dim1=-5", with_fields(one, dim1=-5), expect="refused"),
              Case("dim1=30000", with_fields(one, dim1=30000), expect="refused"),
              Case("nifti2-dim1=2^40", with_fields(two, dim1=2**40), expect="refused"),
              Case("5d-ones", with_fields(one, dim0=5, dim4=1, dim5=1), expect="same")]
    cases += [Case(f"datatype={code}", with_fields(one, datatype=code), expect="refused")
              for code in (0, 1, 32, 128, 255, 1536, 1792, 2048, 2304, 9999)]
    cases += [Case("bitpix=8", with_fields(one, bitpix=8), expect="same"),
              Case("datatype=uint16", with_fields(one, datatype=512), expect="any")]
    nan, inf = float("nan"), float("inf")
    cases += [Case(f"scl_inter={v}", with_fields(one, scl_slope=2.0, scl_inter=v),
                   expect="refused") for v in (nan, inf, -inf)]
    cases += [Case(f"scl_slope={v}", with_fields(one, scl_slope=v, scl_inter=0.0),
                   expect="refused") for v in (inf, -inf, 1e35, 1e-44)]
    cases += [Case("scl_slope=1-inter-nan", with_fields(one, scl_slope=1.0), expect="refused")]
    cases += [Case(f"scl_slope={v}", with_fields(one, scl_slope=v, scl_inter=0.0),
                   expect="same") for v in (0.0, nan, 1.0)]
    cases += [Case("scl_slope=-3", with_fields(one, scl_slope=-3.0, scl_inter=0.0), expect="any"),
              Case("float32*1e-40", scaled(one, 1e-40), expect="refused"),
              Case("float32*1e-30", scaled(one, 1e-30), expect="refused"),
              Case("float32*1e35", scaled(one, 1e35), expect="refused"),
              Case("float64*1e300", scaled(one, 1e300, np.float64), expect="refused"),
              Case("float32+1e9", _offset_values(one, 1e9), expect="refused")]
    cases += [Case("vox_offset=0", with_fields(one, vox_offset=0), expect="warned"),
              Case("vox_offset=100", with_fields(one, vox_offset=100), expect="warned"),
              Case("vox_offset=353", with_fields(one, vox_offset=353), expect="refused"),
              Case("vox_offset=1e30", with_fields(one, vox_offset=1e30), expect="refused"),
              Case("vox_offset=inf", with_fields(one, vox_offset=inf), expect="refused"),
              Case("vox_offset=nan", with_fields(one, vox_offset=nan), expect="refused"),
              Case("vox_offset=-16", with_fields(one, vox_offset=-16), expect="refused"),
              Case("nifti2-vox_offset=-8", with_fields(two, vox_offset=-8), expect="refused"),
              Case("nifti2-vox_offset=0", with_fields(two, vox_offset=0), expect="warned"),
              Case("vox_offset=0-with-extension",
                   nifti_bytes(one, extension=extension_block(32), offset=0),
                   expect="refused")]
    cases += [Case("extension-valid", nifti_bytes(one, extension=extension_block(32)),
                   expect="same")]
    cases += [Case(f"extension-esize={s}", nifti_bytes(one, extension=extension_block(s)),
                   expect="warned") for s in (0, 7, 24, -16, 48, 10**6)]
    cases += [Case("magic=ni1", with_fields(one, magic=b"ni1"), expect="refused"),
              Case("magic=xyz", with_fields(one, magic=b"xyz"), expect="refused"),
              Case("sizeof_hdr=0", with_fields(one, sizeof_hdr=0), expect="warned"),
              Case("sform-nan", with_fields(one, srow_x=[nan] * 4), expect="refused"),
              Case("qform-nan", with_fields(one, sform_code=0, quatern_b=nan),
                   expect="refused"),
              Case("pixdim-negative-qform", with_fields(one, sform_code=0,
                                                        pixdim=[1, -1.2, 1, 1.5, 0, 0, 0, 0]),
                   expect="warned"),
              Case("all-codes-0", with_fields(one, sform_code=0, qform_code=0), expect="any"),
              Case("qform-nan-sform-ok", with_fields(one, quatern_b=nan), expect="refused"),
              Case("pixdim-zero-no-sform", with_fields(one, sform_code=0, qform_code=0,
                                                       pixdim=[1, 0, 1, 1, 0, 0, 0, 0]),
                   expect="refused"),
              Case("xyzt_units=239", with_fields(one, xyzt_units=239), expect="warned"),
              Case("truncated", n1[: len(n1) - 1000], expect="refused"),
              Case("header-only", n1[:NIFTI1_END], expect="refused"),
              Case("empty", b"", expect="refused")]
    cases += [Case(f"gzip-{how}", corrupt_gzip(n1, how), True, "refused")
              for how in ("flip", "crc", "length", "truncated", "trailing")]
    return cases


def _offset_values(img: nib.Nifti1Image, offset: float) -> bytes:
    """The valid scan's voxels shifted far from zero (float32 cannot resolve the range)."""
    data = np.asarray(img.dataobj, dtype=np.float64) + offset
    out = nib.Nifti1Image(data.astype(np.float32), img.affine, header=img.header)
    out.header.set_data_dtype(np.float32)
    return nifti_bytes(out)


def flipped(seed: int) -> Case:
    """The valid scan (NIfTI-1, NIfTI-2 or gzipped) with 1-4 random header bytes replaced,
    or for a gzipped file 1-4 random bytes anywhere."""
    rng = np.random.default_rng(seed)
    kind = ("nifti1", "nifti2", "gz")[seed % 3]
    raw = bytearray(nifti_bytes(valid_image(nifti2=kind == "nifti2")))
    if kind == "gz":
        raw = bytearray(gzip_fixed(bytes(raw)))
    span = len(raw) if kind == "gz" else (NIFTI1_END if kind == "nifti1" else 544)
    for _ in range(int(rng.integers(1, 5))):
        raw[int(rng.integers(0, span))] = int(rng.integers(0, 256))
    return Case(f"flip-{kind}-seed{seed}", bytes(raw), kind == "gz")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(LoadedModel, runner, path) of a 2-channel, 1-block MeshNet with random weights: the
    tests compare masks between variants, so any fixed network will do."""
    torch.manual_seed(0)
    network = MeshNet(MeshNetConfig(channels=2, dilations=(1,))).eval()
    model = LoadedModel(name="tiny", layers=fold(network), postprocess="none",
                        architecture="MeshNet-2", parameters=0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    from meshseg.models.weights import save_checkpoint

    save_checkpoint(path, network)
    return model, torch_runner(model.layers, torch.device("cpu")), path


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The valid scan's loaded voxels, affine and mask."""
    model, run, _ = tiny
    folder = tmp_path_factory.mktemp("reference")
    path = folder / "valid.nii"
    path.write_bytes(nifti_bytes(valid_image()))
    out = Outputs(mask=folder / "valid_lesion.nii.gz")
    assert segment_file(path, out, model, run, "cpu").status == "ok"
    volume = load_volume(path)
    return volume.data, volume.affine, np.asarray(nib.load(out.mask).dataobj)


def check_case(case: Case, folder: Path, tiny, reference) -> str:
    """Run one variant through segment_file; assert the contract; return its outcome."""
    model, run, _ = tiny
    path = folder / (case.name.replace("=", "_") + (".nii.gz" if case.gz else ".nii"))
    path.write_bytes(case.data)
    outputs = Outputs(mask=folder / f"{path.name}_lesion.nii.gz")
    result = segment_file(path, outputs, model, run, "cpu")
    if result.status == "failed":
        assert "\n" not in result.error and str(path) in result.error, result.error
        assert "unexpected" not in result.error, result.error  # the safety net, not the gate
        assert not outputs.mask.exists()
        assert case.expect in ("refused", "any"), f"{case.name} refused: {result.error}"
        return "refused"
    assert result.status == "ok", result
    assert case.expect != "refused", f"{case.name} accepted"
    mask_img = nib.load(outputs.mask)
    volume = load_volume(path)
    assert mask_img.shape == volume.data.shape
    np.testing.assert_allclose(mask_img.affine, volume.affine, atol=1e-4)
    data, affine, mask = reference
    unchanged = (volume.data.shape == data.shape and np.array_equal(volume.data, data)
                 and np.allclose(volume.affine, affine, atol=1e-6))
    if case.expect in ("same", "warned"):
        assert unchanged, f"{case.name}: voxels or grid differ from the valid scan"
        assert bool(result.warnings) == (case.expect == "warned"), result.warnings
    if unchanged:
        np.testing.assert_array_equal(np.asarray(mask_img.dataobj), mask)
    return "warned" if result.warnings else "accepted"


def test_named_hostile_inputs(tmp_path, tiny, reference):
    outcomes = {case.name: check_case(case, tmp_path, tiny, reference) for case in named_cases()}
    assert outcomes["vox_offset=0"] == "warned" and outcomes["gzip-crc"] == "refused"


def test_random_header_flips(tmp_path, tiny, reference):
    outcomes = [check_case(flipped(seed), tmp_path, tiny, reference) for seed in range(30)]
    assert "refused" in outcomes and "accepted" in outcomes


@pytest.mark.slow
def test_random_flip_sweep(tmp_path, tiny, reference):
    """400 seeds; every failing seed is listed, not only the first."""
    failures = []
    for seed in range(1000, 1400):
        try:
            check_case(flipped(seed), tmp_path, tiny, reference)
        except AssertionError as err:
            failures.append(f"seed {seed}: {str(err).splitlines()[0]}")
    assert not failures, "\n".join(failures)


def test_cohort_with_bad_inputs_in_the_middle(tmp_path, tiny):
    """Good, refused, good, refused, good: every good one is written, the run exits 1."""
    _, _, model_path = tiny
    valid = nifti_bytes(valid_image())
    files = {"a.nii": valid, "b.nii": with_fields(valid_image(), datatype=9999),
             "c.nii.gz": gzip_fixed(valid), "d.nii.gz": corrupt_gzip(valid, "crc"),
             "e.nii": with_fields(valid_image(), dim0=9)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    result = CliRunner().invoke(main, ["predict", str(tmp_path), "-m", str(model_path),
                                       "--device", "cpu", "-q"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    written = sorted(p.name for p in tmp_path.glob("*_lesion.nii.gz"))
    assert written == ["a_lesion.nii.gz", "c_lesion.nii.gz"]
    errors = [line for line in result.output.splitlines() if line.startswith("meshseg: error")]
    assert len(errors) == 3 and all(("b.nii" in e) or ("d.nii.gz" in e) or ("e.nii" in e)
                                    for e in errors)


def test_fifo_and_device_inputs_are_refused_before_any_read(tmp_path, tiny):
    """Issue 20 item 12: a FIFO named x.nii.gz and a symlink to /dev/zero named .nii.gz fail
    at once (hashing them used to hang the cohort); the good scan after them is written."""
    _, _, model_path = tiny
    os.mkfifo(tmp_path / "a_fifo.nii.gz")
    (tmp_path / "b_zero.nii.gz").symlink_to("/dev/zero")
    (tmp_path / "c.nii").write_bytes(nifti_bytes(valid_image()))
    result = CliRunner().invoke(main, ["predict", str(tmp_path), "-m", str(model_path),
                                       "--device", "cpu", "--no-qc", "-q"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if "not a regular file" in line]
    assert len(errors) == 2 and (tmp_path / "c_lesion.nii.gz").is_file()
