"""Lesion location: registration to MNI152, side, territories, and the affine as the truth.

The synthetic heads here are nilearn's MNI152 tissue maps rendered with T2 contrast on a 2 mm
grid and placed in the world by a known pose, so the true MNI position of every voxel (and of
a lesion painted into a chosen territory) is known exactly.
"""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from meshseg.errors import MeshsegError
from meshseg.io import Volume, load_volume
from meshseg.qc import checks, location
from tests.conftest import SHARED

REAL_SCANS = SHARED / "real-scans"
POSE = (np.array([6.0, -4.0, 10.0]), np.array([4.0, -9.0, 12.0]))  # degrees xyz, mm


def pose_matrix(angles_deg=POSE[0], shift_mm=POSE[1]) -> np.ndarray:
    """World-from-MNI rigid map: the head's position in the synthetic scanner."""
    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    out[:3, 3] = shift_mm
    return out


def territory_ball(abbreviation: str, radius_mm: float = 7.0) -> np.ndarray:
    """A ball on the MNI grid at the deepest point of the named territory."""
    space = location.mni_space()
    index = next(i for i, t in space.territories.items() if t.abbreviation == abbreviation)
    inside = ndimage.distance_transform_edt(space.labels == index)
    centre = np.unravel_index(inside.argmax(), inside.shape)
    grid = np.indices(space.shape, dtype=np.float32)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius_mm**2


def t2_like_mni() -> np.ndarray:
    """A T2-contrast brain on the MNI grid from the tissue priors (float32): CSF bright, grey
    matter middling, white matter dark."""
    space = location.mni_space()
    white, csf = location.tissue_priors()
    grey = np.clip(space.brain - white - csf, 0, 1)
    return (0.25 * white + 0.55 * grey + 1.0 * csf).astype(np.float32)


def synthetic_head(lesion_mni: np.ndarray | None = None, pose: np.ndarray | None = None
                   ) -> tuple[Volume, np.ndarray]:
    """A T2-contrast head (CSF bright, white matter dark) from the MNI priors on a 2 mm grid,
    its world position `pose` @ MNI, with the lesion (an MNI-grid mask) painted as fluid."""
    space = location.mni_space()
    image = t2_like_mni()
    lesion = np.zeros(space.shape, bool) if lesion_mni is None else lesion_mni
    image[lesion] = 0.9
    step = (slice(None, None, 2),) * 3
    affine = (pose_matrix() if pose is None else pose) @ space.affine @ np.diag([2, 2, 2, 1.0])
    volume = Volume(np.ascontiguousarray(image[step] * 1000, np.float32), affine,
                    nib.Nifti1Header())
    return volume, lesion[step].astype(np.uint8)


def locate(volume: Volume, mask: np.ndarray) -> dict:
    return location.locate(mask, volume, location.register(volume))


def test_atlas_labels_fix_the_shipped_abbreviations():
    territories = location.mni_space().territories
    assert len(territories) == 32
    assert territories[9].abbreviation == "MCAPL" and territories[10].abbreviation == "MCAPR"
    assert {territories[i].abbreviation for i in (12, 14, 16)} == {"MCATR", "MCAOR", "MCAIR"}
    assert len({t.abbreviation for t in territories.values()}) == 32


def test_lesion_painted_in_a_known_territory_is_found_there(tmp_path):
    """Territory, side, centroid, the pose itself, and the --mni mask on the atlas grid."""
    ball = territory_ball("MCAFR")
    volume, mask = synthetic_head(ball)
    registration = location.register(volume)
    probe = np.array([[0, 0, 0, 1], [40, -20, 30, 1], [-40, 30, -10, 1]], float).T
    error = np.linalg.norm((registration.scan_from_mni @ probe - pose_matrix() @ probe)[:3],
                           axis=0)
    assert error.max() < 3.0, error  # mm, at points across the brain
    where = location.locate(mask, volume, registration)
    assert where["registration_quality"] > checks.POOR_REGISTRATION
    assert where["side"] == "right" and where["right_pct"] > 95
    top = where["territories"][0]
    assert top["abbreviation"] == "MCAFR" and top["lesion_pct"] > 60
    assert 0 < top["territory_pct"] < 10
    assert where["largest_centroid_mni"][0] > 10  # right hemisphere, in MNI mm

    path = tmp_path / "m.nii.gz"
    location.write_mni_mask(where["mni_mask"], path)
    img = nib.load(path)
    assert img.shape == location.mni_space().shape
    assert np.allclose(img.affine, location.mni_space().affine)
    written = np.asarray(img.dataobj) > 0
    assert (written & ball).sum() / ball.sum() > 0.7


def test_each_lesion_has_its_volume_side_and_territories():
    """Two lesions, a big right MCA one and a small left ACA one: largest first, each on
    its own side and in its own territory, the mL adding up to the scan's."""
    from meshseg.metrics import voxel_ml

    volume, mask = synthetic_head(territory_ball("MCAFR", 9.0) | territory_ball("ACAL", 5.0))
    found = locate(volume, mask)["lesions"]
    assert [row["side"] for row in found] == ["right", "left"]
    assert found[0]["ml"] > found[1]["ml"] > 0
    assert found[0]["territories"][0]["abbreviation"] == "MCAFR"
    assert found[1]["territories"][0]["abbreviation"] == "ACAL"
    assert found[1]["centroid_mni"][0] < -2 < 2 < found[0]["centroid_mni"][0]
    assert sum(row["ml"] for row in found) == pytest.approx(mask.sum() * voxel_ml(volume.affine),
                                                            abs=0.005)
    assert set(found[0]) == {"ml", "side", "centroid_mni", "territories"}
    assert locate(volume, np.zeros_like(mask))["lesions"] == []


def test_rounded_lesion_volumes_still_add_up():
    values = np.array([1.001, 2.002, 3.004])  # each rounds down; the total rounds to 6.01
    rounded = location.split_rounded(values, 2)
    assert sum(rounded) == pytest.approx(6.01) and rounded == [1.0, 2.0, 3.01]


def test_the_affine_is_the_truth_about_left_and_right():
    """Voxels flipped with an affine that says so: same side. The affine alone flipped
    (the voxels as before): the head is mirrored in the world, and so is the lesion."""
    volume, mask = synthetic_head(territory_ball("ACAL"))
    assert locate(volume, mask)["side"] == "left"
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = volume.data.shape[0] - 1
    same = Volume(volume.data[::-1].copy(), volume.affine @ flip, volume.header)
    assert locate(same, mask[::-1].copy())["side"] == "left"
    mirrored = Volume(volume.data, np.diag([-1.0, 1, 1, 1]) @ volume.affine, volume.header)
    assert locate(mirrored, mask)["side"] == "right"


def test_hemisphere_shares_and_bilateral():
    space = location.mni_space()
    mask = np.zeros(space.shape, bool)
    x = space.affine[0, 0] * np.arange(space.shape[0]) + space.affine[0, 3]
    mask[(x < -10) & (x > -30), 90:100, 60:70] = True
    assert location.hemispheres(mask, space.affine)["side"] == "left"
    mask[(x > 10) & (x < 15), 90:100, 60:70] = True  # x = 11..14 mm: 4 of 23 columns
    shares = location.hemispheres(mask, space.affine)
    assert shares["side"] == "bilateral" and shares["right_pct"] == pytest.approx(400 / 23, 0.01)
    assert location.hemispheres(np.zeros(space.shape, bool), space.affine)["side"] == "none"


def test_stroke_scan_already_in_mni_registers_near_identity():
    path = REAL_SCANS / "stroke_T2w_mni.nii.gz"
    if not path.exists():
        pytest.skip(f"shared real scans not found at {path}")
    found = location.register(load_volume(path)).scan_from_mni
    # FSL's MNI152 and nilearn's ICBM 2009 template differ by a few percent in size
    assert np.allclose(found[:3, :3], np.eye(3), atol=0.05), found
    assert np.abs(found[:3, 3]).max() < 4.0, found


def test_whole_head_scan_registers_well():
    """healthy_T2w is a whole head (skull, eyes, neck; 2 mm slices): its rough brain is fitted
    to the brain-only template and the fit is not flagged, unlike a fit moved 15 mm."""
    path = REAL_SCANS / "healthy_T2w.nii.gz"
    if not path.exists():
        pytest.skip(f"shared real scans not found at {path}")
    volume = load_volume(path)
    registration = location.register(volume)
    assert registration.quality >= checks.POOR_REGISTRATION, registration
    moved = registration.scan_from_mni.copy()
    moved[0, 3] += 15
    assert location.fit_quality(volume, moved)[0] < checks.POOR_REGISTRATION


@pytest.mark.slow
def test_stroke_scan_lesion_is_left_with_its_territories(tmp_path):
    """The bundled default model on stroke_T2w_mni, end to end: a left lesion in the left
    posterior MCA / PCA territories (the scan's large temporo-parieto-occipital infarct)."""
    import json

    from tests.test_cli import run

    path = REAL_SCANS / "stroke_T2w_mni.nii.gz"
    if not path.exists():
        pytest.skip(f"shared real scans not found at {path}")
    result = run("predict", path, "-o", tmp_path, "--mni", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r.json").read_text())[0]
    where = record["location"]
    assert where["side"] == "left" and where["left_pct"] > 95
    assert sum(row["ml"] for row in where["lesions"]) == pytest.approx(record["lesion_ml"],
                                                                       abs=0.005)
    assert where["lesions"][0]["centroid_mni"] == where["largest_centroid_mni"]
    assert (tmp_path / "r_lesions.csv").read_text().count("\n") == len(where["lesions"]) + 1
    assert {t["abbreviation"] for t in where["territories"][:3]} <= {
        "MCATL", "MCAOL", "MCAPL", "PCAOL", "PCATL"}
    assert (tmp_path / "stroke_T2w_mni_lesion_mni.nii.gz").exists()


@pytest.mark.slow
def test_wheel_ships_the_atlas(wheel_files):
    """The atlas (data, labels, licence) is inside the built wheel, where location finds it."""
    for name in ("ArterialAtlas136.nii.gz", "ArterialAtlas136.txt", "LICENSE", "README.md"):
        assert f"meshseg/qc/atlas/{name}" in wheel_files


def test_location_holds_plain_json_types():
    """The record is a JSON sidecar: no numpy scalars may hide in it."""
    space = location.mni_space()
    mask = np.zeros(space.shape, bool)
    mask[60:70, 90:100, 60:70] = True
    found = {**location.hemispheres(mask, space.affine), "t": location.territories(mask, space),
             "l": location.lesions(mask, space.affine, np.eye(4))}

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(plain(v) for v in value.values())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return type(value) in (str, int, float, bool, type(None))

    assert plain(found)


def test_mni_resampling_in_a_box_matches_the_whole_grid():
    """to_mni resamples only the box a mask's voxels reach: exactly what resampling the
    whole MNI grid gives."""
    volume, lesion = synthetic_head(territory_ball("MCATL"))
    scan_from_mni = pose_matrix() @ np.diag([1.05, 0.97, 1.02, 1.0])
    space = location.mni_space()

    def whole(data: np.ndarray) -> np.ndarray:
        return location._resample(data, volume.affine, space.affine, scan_from_mni,
                                  space.shape)

    np.testing.assert_allclose(location.to_mni(lesion, volume.affine, scan_from_mni),
                               whole(lesion), atol=1e-6)
    assert not location.to_mni(lesion * 0, volume.affine, scan_from_mni).any()
    edge = lesion.copy()  # read from the array's own box: also where that box meets its edge
    edge[0, 20:30, 20:30] = 2
    def both(order: int) -> tuple[np.ndarray, np.ndarray]:
        return (location.to_mni(edge, volume.affine, scan_from_mni, order=order),
                location._resample(edge, volume.affine, space.affine, scan_from_mni,
                                   space.shape, order))

    np.testing.assert_allclose(*both(1), atol=1e-6)
    boxed, whole_grid = both(0)  # nearest: the box's coordinates may round a tie the other way
    assert (boxed != whole_grid).sum() < 1e-5 * boxed.size


def test_depth_in_the_brain_is_within_two_mm_of_the_exact_distance():
    """checks.deeper_than (distance at 2 mm, read at the voxels asked about) against scipy's
    exact distance transform on the template brain: any voxel they disagree on lies within
    1.7 mm of the depth asked for."""
    brain = location.mni_space().brain
    exact = ndimage.distance_transform_edt(brain)
    where = brain & (np.indices(brain.shape).sum(0) % 3 == 0)
    found = checks.deeper_than(brain, where, 15.0)
    assert not (found & ~where).any()
    disagree = found != (where & (exact > 15.0))
    assert disagree.sum() < 0.05 * (where & (exact > 15.0)).sum()
    assert np.abs(exact[disagree] - 15.0).max() <= 1.7


def test_joint_histogram_counts_as_numpy_does():
    rng = np.random.default_rng(3)
    a, b = rng.random(5000).astype(np.float32), rng.random(5000).astype(np.float32) ** 3
    np.testing.assert_array_equal(location._joint_histogram(a, b, 32),
                                  np.histogram2d(a, b, bins=32)[0])


def test_template_maps_are_sliced_exactly_onto_the_atlas_grid():
    space = location.mni_space()
    img = location.mni152_map("t1")
    resampled = ndimage.affine_transform(np.asarray(img.dataobj, np.float32) / 255,
                                         np.linalg.inv(img.affine) @ space.affine,
                                         output_shape=space.shape, order=1)
    np.testing.assert_array_equal(space.t1, resampled)
    shifted = nib.Nifti1Image(np.asarray(img.dataobj), img.affine @ np.diag([1, 1, 1.5, 1]))
    with pytest.raises(MeshsegError, match="not on the atlas' 1 mm grid"):
        location._on_grid(shifted, space.affine, space.shape)
