"""Conform to FreeSurfer's model space and back: geometry, intensity scaling, shapes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.freesurfer.mghformat import MGHHeader
from nibabel.processing import resample_from_to

from meshseg.io import Volume, load_volume
from meshseg.pipeline.conform import (
    CONFORMED_SHAPE,
    ConformRecord,
    conform,
    conformed_affine,
    robust_range,
    to_conformed,
    to_unit_range,
    unconform,
)
from tests.conftest import blob, grid_affine

# (shape, zooms mm, rotation degrees, axis flips, axis permutation, origin mm)
NATIVE_GRIDS = {
    "anisotropic 0.9x0.9x3 mm RAS": ((48, 48, 16), (0.9, 0.9, 3.0), (0, 0, 0), (1, 1, 1),
                                     (0, 1, 2), (-20.0, 30.0, 10.0)),
    "oblique 17 degrees": ((40, 44, 36), (1.2, 1.2, 1.2), (17, -12, 8), (1, 1, 1), (0, 1, 2),
                           (5.0, -5.0, 5.0)),
    "LPS": ((40, 40, 41), (1.0, 1.1, 0.9), (0, 0, 0), (-1, -1, 1), (0, 1, 2), (0.0, 0.0, 0.0)),
    "permuted IRP, shifted origin": ((30, 40, 50), (1.0, 1.0, 1.0), (0, 0, 0), (-1, 1, -1),
                                     (2, 0, 1), (12.5, -40.0, 60.0)),
    "oblique anisotropic permuted": ((50, 18, 46), (0.9, 3.0, 0.9), (0, 20, -15), (1, -1, 1),
                                     (1, 2, 0), (-30.0, 10.0, 25.0)),
}
# Share of the blob's voxels allowed to differ after native -> conformed -> native.
ROUND_TRIP_TOLERANCE = 0.01


def native_affine(name: str) -> tuple[tuple[int, int, int], np.ndarray]:
    shape, zooms, angles, flips, perm, origin = NATIVE_GRIDS[name]
    return shape, grid_affine(zooms, angles, flips, origin, perm)


def float_volume(data: np.ndarray, affine: np.ndarray) -> Volume:
    """An in-memory scan whose header says float32 (so it is rescaled)."""
    return Volume(data=data.astype(np.float32), affine=affine, header=nib.Nifti1Header())


@pytest.mark.parametrize("name", sorted(NATIVE_GRIDS))
def test_conformed_affine_is_freesurfer_lia_grid_centred_on_c_ras(name):
    shape, affine = native_affine(name)
    target = conformed_affine(shape, affine)

    assert nib.aff2axcodes(target) == ("L", "I", "A")
    np.testing.assert_allclose(nib.affines.voxel_sizes(target), 1.0)
    c_ras = affine @ np.r_[np.asarray(shape) / 2.0, 1.0]
    np.testing.assert_allclose(target @ [128, 128, 128, 1], c_ras, atol=1e-9)
    # Independent route: FreeSurfer's own header fields (Mdc rows = axis directions, c_ras).
    mgh = MGHHeader()
    mgh.set_data_shape(CONFORMED_SHAPE)
    mgh["delta"] = (1.0, 1.0, 1.0)
    mgh["Mdc"] = [[-1, 0, 0], [0, 0, -1], [0, 1, 0]]
    mgh["Pxyz_c"] = c_ras[:3]
    np.testing.assert_allclose(target, mgh.get_affine(), atol=1e-4)


@pytest.mark.parametrize("name", sorted(NATIVE_GRIDS))
def test_blob_survives_conform_and_unconform(name, write_nifti):
    shape, affine = native_affine(name)
    truth = blob(shape, center=np.asarray(shape) * 0.45 + 0.3, radius=min(shape) * 0.3)
    volume = load_volume(write_nifti(truth.astype(np.float32), affine))

    conformed, record = conform(volume)
    back = unconform(to_unit_range(conformed), record)

    assert back.shape == shape and back.dtype == np.float32
    mismatched = np.count_nonzero((back > 0.5) != truth)
    assert mismatched <= ROUND_TRIP_TOLERANCE * truth.sum()
    # The blob sits at the same world position on the conformed grid (conform alone).
    native_centre = affine @ np.r_[np.argwhere(truth).mean(axis=0), 1.0]
    conformed_centre = record.affine @ np.r_[np.argwhere(conformed > 127).mean(axis=0), 1.0]
    np.testing.assert_allclose(conformed_centre, native_centre, atol=0.5)


def test_record_keeps_native_grid():
    shape, affine = native_affine("LPS")
    _, record = conform(float_volume(np.ones(shape), affine))

    assert isinstance(record, ConformRecord)
    assert record.native_shape == shape
    np.testing.assert_array_equal(record.native_affine, affine)
    np.testing.assert_allclose(record.affine, conformed_affine(shape, affine))


def test_robust_range_cuts_a_few_bright_outliers():
    # 5000 zeros, 4997 tissue values in 1..95, 3 outliers at 10000: 3 < 0.1% of the
    # 5000 non-zero voxels, so they are cut. Bins are 10 wide; the cut-off count is
    # reached in bin 9 (90..100), and FreeSurfer's bound is the lower edge of bin 8.
    data = np.concatenate([np.zeros(5000), np.linspace(1, 95, 4997), [1e4] * 3])
    assert robust_range(data.astype(np.float32)) == (0.0, 80.0)


def test_robust_range_keeps_outliers_that_are_not_rare():
    # 10 outliers are more than 0.1% of 5000 non-zero voxels: the top stays near them.
    data = np.concatenate([np.zeros(5000), np.linspace(1, 95, 4990), [1e4] * 10])
    low, high = robust_range(data.astype(np.float32))
    assert low == 0.0 and high == pytest.approx(9980.0)


def test_robust_range_low_bound_is_minimum_and_constant_is_degenerate():
    data = np.linspace(-50, 200, 10_000, dtype=np.float32)
    low, high = robust_range(data)
    assert low == -50.0 and 199.0 < high < 200.0
    assert robust_range(np.full((4, 4, 4), 7.0, np.float32)) == (7.0, 7.0)


def scan_with_outliers(shape=(40, 40, 40)) -> np.ndarray:
    """Background 0, a head of value 100, and 3 bright outlier voxels at 10000."""
    data = np.where(blob(shape, np.asarray(shape) / 2, 15), 100.0, 0.0)
    data[20, 20, 5:8] = 1e4
    return data


def test_outliers_do_not_darken_the_scan_and_nothing_wraps():
    conformed, _ = conform(float_volume(scan_with_outliers(), np.eye(4)))

    assert conformed.dtype == np.uint8 and conformed.shape == CONFORMED_SHAPE
    # Naive min-max would put the head at 100/10000*255 = 3; a wrapped overshoot at 27.
    assert conformed[128, 128, 128] == 255
    assert conformed[0, 0, 0] == 0


def test_integer_float_and_scaled_files_give_the_same_conformed_scan(write_nifti):
    data = scan_with_outliers()
    as_int16 = load_volume(write_nifti(data, dtype=np.int16, name="int16.nii.gz"))
    as_float = load_volume(write_nifti(data, dtype=np.float32, name="float32.nii.gz"))
    # uint8 storage with scl_slope=50 holds the same values (2 * 50 = 100, 200 * 50 = 1e4).
    as_scaled_uint8 = load_volume(write_nifti(data / 50, dtype=np.uint8, slope=50.0,
                                              name="uint8_slope.nii.gz"))

    reference, _ = conform(as_float)
    np.testing.assert_array_equal(conform(as_int16)[0], reference)
    np.testing.assert_array_equal(conform(as_scaled_uint8)[0], reference)


def test_negative_minimum_keeps_background_zero():
    data = scan_with_outliers()
    data[2:6, 2:6, 2:6] = -100.0
    conformed, _ = conform(float_volume(data, np.eye(4)))

    assert conformed[0, 0, 0] == 0  # outside the scan's field of view
    assert conformed[128, 100, 128] == 0  # native background 0, inside the field of view
    assert conformed[128, 128, 128] == 255


def test_conformed_uint8_scan_comes_back_identical(write_nifti):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, CONFORMED_SHAPE, dtype=np.uint8)
    affine = conformed_affine((181, 217, 181), grid_affine(origin=(-90.0, -126.0, -72.0)))
    volume = load_volume(write_nifti(data, affine, name="orig.nii", dtype=np.uint8))

    conformed, record = conform(volume)

    np.testing.assert_array_equal(conformed, data)
    np.testing.assert_allclose(record.affine, affine, atol=1e-9)


def test_uint8_scan_in_ras_order_is_shifted_by_whole_voxels_only(write_nifti):
    rng = np.random.default_rng(1)
    lia = rng.integers(1, 256, CONFORMED_SHAPE, dtype=np.uint8)
    lia_affine = conformed_affine(CONFORMED_SHAPE, grid_affine(origin=(-128.0, -128.0, -128.0)))
    lia_to_ras = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("LIA"),
                                                 nib.orientations.axcodes2ornt("RAS"))
    ras = nib.Nifti1Image(lia, lia_affine).as_reoriented(lia_to_ras)
    volume = load_volume(write_nifti(np.asarray(ras.dataobj), ras.affine, name="ras.nii",
                                     dtype=np.uint8))

    conformed, _ = conform(volume)

    # RAS voxel 128 is LIA voxel (127, 127, 128) on the flipped axes, so FreeSurfer's
    # centre moves one voxel: conformed[i, j, k] = lia[i - 1, j - 1, k], exact copies.
    expected = np.zeros_like(lia)
    expected[1:, 1:, :] = lia[:-1, :-1, :]
    np.testing.assert_array_equal(conformed, expected)


def test_to_unit_range_spans_zero_to_one_and_constant_gives_zeros():
    values = np.array([[[3, 10], [255, 3]]], dtype=np.uint8)
    unit = to_unit_range(values)
    assert unit.dtype == np.float32
    np.testing.assert_allclose(unit, (values - 3.0) / 252.0)
    np.testing.assert_array_equal(to_unit_range(np.full((2, 2, 2), 9, np.uint8)), 0.0)


@pytest.fixture(scope="module")
def wide_record() -> ConformRecord:
    """A 300 mm wide native grid: wider than the conformed 256 mm field of view."""
    shape, affine = (100, 12, 10), grid_affine(zooms=(3.0, 2.0, 2.0))
    return ConformRecord(shape, affine, conformed_affine(shape, affine))


def test_unconform_3d_maps_to_native_grid_with_zero_outside(wide_record):
    native = unconform(np.ones(CONFORMED_SHAPE, np.float32), wide_record)

    assert native.shape == wide_record.native_shape and native.dtype == np.float32
    assert native[50, 6, 5] == pytest.approx(1.0)
    assert native[0, 6, 5] == 0.0 and native[-1, 6, 5] == 0.0  # beyond +-128 mm


def test_unconform_4d_keeps_channels_apart(wide_record):
    maps = np.stack([np.zeros(CONFORMED_SHAPE, np.float32), np.ones(CONFORMED_SHAPE, np.float32)])

    native = unconform(maps, wide_record)

    assert native.shape == (2,) + wide_record.native_shape and native.dtype == np.float32
    assert native[0].max() == 0.0 and native[1, 50, 6, 5] == pytest.approx(1.0)


def test_unconform_rejects_maps_not_on_the_conformed_grid(wide_record):
    with pytest.raises(ValueError, match="256"):
        unconform(np.zeros((10, 10, 10), np.float32), wide_record)


@pytest.mark.parametrize("name", ["oblique 17 degrees", "oblique anisotropic permuted"])
def test_resampling_only_the_covered_box_equals_the_whole_grid(name):
    # conform computes only the target voxels near the scan, in slabs on threads; that must
    # give exactly what nibabel's resampler gives over the whole 256^3 grid
    shape, affine = native_affine(name)
    data = np.random.default_rng(1).random(shape, dtype=np.float32)
    record = ConformRecord(shape, affine, conformed_affine(shape, affine))
    whole = resample_from_to(nib.Nifti1Image(data, affine), (CONFORMED_SHAPE, record.affine),
                             order=1, mode="constant", cval=0.0)
    np.testing.assert_allclose(to_conformed(data, affine, record),
                               np.asarray(whole.dataobj), rtol=0, atol=1e-6)
