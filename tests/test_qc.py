"""QC flags, the QC picture, and --strict-contrast end to end."""

import json
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch

from meshseg.io import Volume, load_volume
from meshseg.models import catalog
from meshseg.pipeline import predict
from meshseg.pipeline.record import Result, read_sidecar
from meshseg.qc import checks, picture
from meshseg.training import synth
from tests.conftest import SHARED, blob
from tests.test_cli import head, run
from tests.test_location import synthetic_head

REAL_SCANS = SHARED / "real-scans"


def names(flags) -> set[str]:
    return {f.name for f in flags}


def test_lesion_flags_each_case():
    shape = (40, 40, 40)
    ball = blob(shape, (20, 20, 20), 5)
    sure = np.where(ball, 0.97, 0.01).astype(np.float32)
    assert names(checks.lesion_flags(sure, ball, 0.5, 1)) == set()
    assert names(checks.lesion_flags(sure * 0, ball * 0, 0.0, 0)) == {"no_lesion"}
    assert "large_lesion" in names(checks.lesion_flags(sure, ball, checks.LARGE_LESION_ML + 1, 1))
    assert "fragments" in names(checks.lesion_flags(sure, ball, 0.5, checks.MANY_FRAGMENTS + 1))
    edge = blob(shape, (20, 20, 1), 4)
    flags = checks.lesion_flags(np.where(edge, 0.97, 0.0), edge, 0.1, 1)
    assert names(flags) == {"edge"} and flags[0].value == int(edge[:, :, 0].sum())
    unsure = np.where(ball, 0.6, 0.01).astype(np.float32)
    flags = checks.lesion_flags(unsure, ball, 0.5, 1)
    assert names(flags) == {"low_confidence"} and flags[0].value == 1.0
    assert flags[0].threshold == checks.LOW_CONFIDENCE_SHARE


def contrast_flags(volume: Volume) -> set[str]:
    """Flags of a scan with an empty mask (registration and contrast only)."""
    empty = np.zeros(volume.data.shape, np.uint8)
    return names(checks.assess(volume, empty.astype(np.float32), empty, 0.0, 0).flags)


@pytest.mark.parametrize("name, t2", [("healthy_T1w", False), ("lesion_FLAIR", False),
                                      ("healthy_T2w", True), ("stroke_T2w_mni", True),
                                      ("M2208_T2w", True)])
def test_real_scans_not_t2_flag(name, t2):
    path = REAL_SCANS / f"{name}.nii.gz"
    if not path.exists():
        pytest.skip(f"shared real scans not found at {path}")
    assert ("not_t2" in contrast_flags(load_volume(path))) is not t2


def t1_contrast(rng, share):
    """synth's T2 tissue means reordered as T1 makes them: white > grey > CSF."""
    c = dict(synth_t2_contrast(rng, share))
    c.update(wm=0.85, gm=0.55, deep=0.6, csf=0.12, cavity=0.1, rim=0.4, wmh=0.6, eye=0.12)
    return c


synth_t2_contrast = synth._draw_contrast


@pytest.mark.parametrize("t2", [True, False])
def test_synthetic_heads_not_t2_flag(monkeypatch, t2):
    if not t2:
        monkeypatch.setattr(synth, "_draw_contrast", t1_contrast)
    made = synth.draw_head(3, synth.EXAMPLE)
    volume = Volume(np.asarray(made.image.dataobj, np.float32), made.image.affine,
                    made.image.header)
    assert ("not_t2" in contrast_flags(volume)) is not t2


def test_picture_is_written_fast_for_any_orientation(tmp_path):
    shape = (60, 70, 30)
    image = np.where(blob(shape, (30, 35, 15), 25), 300.0, 0.0).astype(np.float32)
    lesion = blob(shape, (18, 35, 15), 5)
    affine = np.diag([-1.0, 1.0, 2.5, 1.0])
    picture.draw(image, affine, lesion * 0, "empty", tmp_path / "b.png")  # loads the font
    start = time.process_time()  # CPU time: a shared machine's load does not count
    unsure = np.where(blob(shape, (40, 35, 15), 4), 0.3, 0.01).astype(np.float32)
    picture.draw(image, affine, lesion, "scan.nii.gz | model | 1.0 mL\nQC: none",
                 tmp_path / "a.png", prob=np.maximum(unsure, lesion * 0.9))
    assert time.process_time() - start < 3.0  # under 1 s on an idle machine
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_picture_shows_the_lesion_in_red_and_the_unsure_band_dashed_in_yellow(tmp_path):
    """Drawn without matplotlib (slow to import), in a process of its own: the lesion's
    colour lies on the lesion, the band's yellow on a ring beside it, broken into dashes."""
    script = f"""
import sys
import numpy as np
from PIL import Image
from meshseg.qc import picture
shape = (60, 70, 30)
x, y, z = np.indices(shape)
image = np.where((x - 30) ** 2 + (y - 35) ** 2 < 25 ** 2, 300.0, 0.0).astype(np.float32)
lesion = (x - 20) ** 2 + (y - 35) ** 2 + (z - 15) ** 2 < 6 ** 2
prob = np.where((x - 40) ** 2 + (y - 35) ** 2 + (z - 15) ** 2 < 6 ** 2, 0.3, 0.9 * lesion)
picture.draw(image, np.eye(4), lesion, "t", {str(tmp_path / 'p.png')!r}, prob=prob)
assert "matplotlib" not in sys.modules
pixels = np.asarray(Image.open({str(tmp_path / 'p.png')!r}), int)
red = (np.abs(pixels - picture._rgb(picture.LESION)).sum(axis=2) == 0)
yellow = (np.abs(pixels - picture._rgb(picture.UNSURE)).sum(axis=2) == 0)
print(red.sum(), yellow.sum())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    red, yellow = map(int, done.stdout.split())
    assert red > 200 and yellow > 200  # outlines in the axial row and the lower panels


def test_picture_outlines_and_dashes_where_the_masks_are():
    """The panel's pixels: the lesion's outline red, its inside tinted, the band's contour
    dashed yellow beside it and nothing of either elsewhere."""
    image = np.full((40, 40), 100.0)
    lesion = np.zeros((40, 40), bool)
    lesion[5:15, 5:15] = True
    prob = np.zeros((40, 40))
    prob[5:35, 25:35] = 0.3  # first axis x, second y
    rgb = picture._panel(image, lesion, prob, (0.2, 0.5), (1.0, 1.0), (0.0, 200.0), (80, 80))
    assert rgb.shape == (80, 80, 3)  # 2 pixels a voxel
    # the lesion: columns 10-29, rows 50-69 (the second axis is shown bottom to top)
    assert (rgb[50:70, 10] == picture._rgb(picture.LESION)).all()  # its left edge
    inside = rgb[60, 20]
    assert inside[0] > inside[1] == inside[2] and inside[1] < 127  # tinted red
    yellow = (rgb == picture._rgb(picture.UNSURE)).all(axis=2)  # band: rows 10-29
    assert not yellow[:, :10].any() and not yellow[30:].any() and not yellow[14:26, 14:66].any()
    assert 10 < yellow[10, 10:70].sum() < 50  # its top edge: dashed
    assert (rgb[0, 0] == 127).all()  # the scan's grey where neither is


def test_empty_mask_slices_go_through_the_middle_of_the_brain():
    """A head on a tall field of view (neck below, noise around): an empty mask's slices lie
    in the middle of the brain, not of the array."""
    shape, zooms = (60, 60, 120), np.full(3, 3.0)  # a 132 mm brain at 3 mm
    brain = blob(shape, (30, 30, 85), 22)
    image = np.where(brain, 300.0, 0.0).astype(np.float32)
    image[25:35, 25:35, :60] = 250.0  # a neck
    image += np.random.default_rng(0).uniform(0, 20, shape).astype(np.float32)  # noise
    head = picture._head(image, picture._window(image)[1])
    assert not head[:, :, 110:].any()  # the noise above the head is not head
    middle = picture._brain_middle(head, zooms)
    assert abs(middle[2] - 85) <= 3 and picture._centre(np.zeros(shape, bool), middle) == middle
    slices = picture._axial_slices(np.zeros(shape, bool), middle, zooms)
    assert 63 < min(slices) < max(slices) < 107


def test_picture_title_says_the_flags_in_words():
    from meshseg.pipeline.record import Result

    result = Result(input="/d/scan.nii.gz", output="o", status="ok", model="m", device="cpu",
                    lesion_ml=2.0, flags=[{"name": "not_t2", "value": 0.3, "threshold": 0.75,
                                           "message": "does not look T2-weighted"}])
    title = checks.picture_title(result)
    assert title.splitlines()[0].startswith("scan.nii.gz")
    assert "does not look T2-weighted" in title and "not_t2" not in title


def test_picture_puts_the_patients_left_on_the_left():
    """In the axial panels the first voxel axis runs left to right towards the patient's
    right, whatever the file's orientation."""
    shape = (20, 20, 20)
    lesion = blob(shape, (5, 10, 10), 3)  # low x index
    for flip in (1.0, -1.0):
        data = lesion[::-1] if flip < 0 else lesion
        image, found, _ = picture._to_ras(data.astype(np.float32),
                                            np.diag([flip, 1.0, 1.0, 1.0]), data)
        x = np.flatnonzero(found.any(axis=(1, 2)))
        # with affine x = +i the lesion is at patient's left (x < mid): low index after RAS
        assert x.mean() < shape[0] / 2


def test_strict_contrast_fails_a_t1_like_input(write_nifti, tmp_path, threshold_model):
    """A head whose CSF is dark (T1-like) warns by default and fails with --strict-contrast,
    without writing a mask."""
    volume, _ = synthetic_head()
    t1_like = np.where(volume.data > 0, 1200.0 - volume.data, 0.0).astype(np.float32)
    src = write_nifti(t1_like, volume.affine, name="t1.nii.gz")
    mask = tmp_path / "t1_lesion.nii.gz"
    strict = run("predict", src, "-m", threshold_model, "--strict-contrast")
    assert strict.exit_code == 1
    assert "t1.nii.gz: CSF/white matter" in strict.stderr and "--strict-contrast" in strict.stderr
    assert not mask.exists()
    warned = run("predict", src, "-m", threshold_model, "--report", tmp_path / "r.json")
    assert warned.exit_code == 0 and mask.exists()
    assert "does not look T2-weighted" in warned.output
    record = json.loads((tmp_path / "r.json").read_text())[0]
    assert record["flags"][0]["name"] == "not_t2" and record["flags"][0]["value"] < 0.75
    assert (tmp_path / "t1_lesion_qc.png").exists() and record["picture"].endswith("qc.png")


def test_no_qc_writes_no_picture(write_nifti, tmp_path, threshold_model):
    src = write_nifti(head()[0], name="a.nii.gz")
    result = run("predict", src, "-m", threshold_model, "--no-qc", "--report", tmp_path / "r.csv")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a_lesion.nii.gz").exists() and not (tmp_path / "a_lesion_qc.png").exists()
    assert "QC:" not in result.output


def test_qc_is_a_stage_of_its_own_with_its_own_time(write_nifti, tmp_path, threshold_model):
    """The progress display shows QC between unconform and write, and the record keeps QC's
    time apart (0 with --no-qc)."""
    volume, _ = synthetic_head()
    src = write_nifti(volume.data, volume.affine, name="a.nii.gz")
    model = catalog.load(threshold_model)
    run_model = predict.runner(model, torch.device("cpu"))
    seen: list[str] = []

    def progress(stage: str, fraction: float) -> None:
        if not seen or seen[-1] != stage:
            seen.append(stage)

    result = predict.segment_file(src, predict.Outputs(tmp_path / "a_lesion.nii.gz"), model,
                                  run_model, "cpu", progress=progress, checks=checks.Checks())
    assert result.status == "ok", result.error
    assert seen[-3:] == ["unconform", "qc", "write"] and set(seen) <= set(predict.STAGES)
    stages = result.stage_seconds
    assert set(stages) == {"load", "conform", "layers", "unconform", "qc", "write"}
    rounding = 0.0005 * (len(stages) + 1)  # every time, the total too, is rounded to 1 ms
    assert 0 < stages["qc"] and sum(stages.values()) <= result.seconds + rounding
    assert read_sidecar(tmp_path / "a_lesion.json").stage_seconds == stages
    plain = predict.segment_file(src, predict.Outputs(tmp_path / "b_lesion.nii.gz"), model,
                                 run_model, "cpu")
    assert "qc" not in plain.stage_seconds


def test_records_written_before_stage_seconds_still_read(tmp_path):
    record = Result(input="a", output="b", status="ok", model="m", device="cpu")
    data = asdict(record)
    del data["stage_seconds"]
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    assert read_sidecar(path) == record


def test_a_bright_one_sided_region_outside_the_mask_is_a_missed_lesion_hint():
    """On the MNI grid: a symmetric T2-like head has no hint; a 14 mL fluid-bright ball in
    one hemisphere gets it (left, outside the empty mask); a mask touching it silences it."""
    from meshseg.qc import location
    from tests.test_location import t2_like_mni, territory_ball

    space = location.mni_space()
    image = t2_like_mni()
    empty = np.zeros(space.shape, bool)
    assert checks.missed_lesion(image, empty) is None
    ball = territory_ball("MCAFL", 15.0)
    image[ball] = 1.0
    hint = checks.missed_lesion(image, empty)
    assert hint is not None and hint.name == "asymmetry" and hint.value > checks.ASYMMETRY_ML
    assert "left" in hint.message
    assert checks.missed_lesion(image, ball & (np.cumsum(ball) < 50).reshape(ball.shape)) is None


def test_a_ventricle_widened_on_one_side_is_no_missed_lesion_hint():
    """Ex-vacuo widening (the left lateral ventricle grown by 4 mm into the white matter, as a
    chronic stroke pulls it) is one-sided and fluid-bright too, but not a missed lesion."""
    from scipy import ndimage

    from meshseg.qc import location
    from tests.test_location import t2_like_mni

    space = location.mni_space()
    image = t2_like_mni()
    ventricles = checks._tissue_masks()[0]
    x = (space.affine @ np.vstack([np.indices(space.shape).reshape(3, -1),
                                   np.ones(ventricles.size)]))[0].reshape(space.shape)
    left = ndimage.binary_dilation(ventricles & (x < 0), iterations=4)
    image[left] = 1.0
    assert (left & ~ventricles).sum() / 1000 > checks.ASYMMETRY_ML  # large enough to count
    assert checks.missed_lesion(image, np.zeros(space.shape, bool)) is None

