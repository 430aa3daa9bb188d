"""Nested stratified splits: determinism, partitions, grouping, balance, the JSON file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from meshseg.benchmark import splits as sp
from meshseg.errors import InputError
from meshseg.training.data import Pair

ACQS = ("spc3", "spc3p2")


def cohort(n: int = 40, seed: int = 0, sessions: int = 1) -> tuple[list[Pair], dict[Path, int]]:
    """n subjects with random lesion voxel counts and two acquisitions (no files)."""
    rng = np.random.default_rng(seed)
    pairs, voxels = [], {}
    for i in range(n):
        for ses in range(sessions):
            pair = Pair(Path(f"sub-{i}_ses-{ses}_T2w.nii.gz"), Path(f"sub-{i}_ses-{ses}_mask.nii"),
                        f"sub-{i}", ACQS[i % 2])
            pairs.append(pair)
            voxels[pair.mask] = int(rng.integers(200, 360_000))
    return pairs, voxels


def spread(groups, splits, attribute: str) -> int:
    """Largest difference between folds in the count of any value of `attribute`."""
    counts = [Counter(getattr(splits.strata[s], attribute) for s in g) for g in groups]
    return max(max(c[v] for c in counts) - min(c[v] for c in counts)
               for v in set().union(*counts))


def test_same_seed_same_splits_other_seed_other_splits():
    pairs, voxels = cohort()
    a = sp.make_splits(pairs, seed=3, volumes_ml=voxels)
    assert sp.make_splits(pairs, seed=3, volumes_ml=voxels) == a
    assert sp.make_splits(list(reversed(pairs)), seed=3, volumes_ml=voxels) == a
    assert sp.make_splits(pairs, seed=4, volumes_ml=voxels).folds != a.folds


@pytest.mark.parametrize("seed", range(4))
def test_every_subject_tested_once_and_inner_folds_partition_outer_train(seed):
    pairs, voxels = cohort(37, seed)
    splits = sp.make_splits(pairs, seed=seed, volumes_ml=voxels)
    tested = [s for fold in splits.folds for s in fold.test]
    assert sorted(tested) == splits.subjects == sorted({p.subject for p in pairs})
    for k, fold in enumerate(splits.folds):
        train = splits.train(k)
        assert not set(train) & set(fold.test)
        validated = [s for val in fold.val for s in val]
        assert sorted(validated) == train
        for j in range(3):
            assert not set(splits.train(k, j)) & (set(fold.val[j]) | set(fold.test))


@pytest.mark.parametrize("seed", range(4))
def test_folds_balance_volume_bins_acquisitions_and_sizes(seed):
    pairs, voxels = cohort(41, seed)
    splits = sp.make_splits(pairs, seed=seed, volumes_ml=voxels)
    assert {st.bin for st in splits.strata.values()} == {0, 1, 2, 3}
    for groups in [[f.test for f in splits.folds], *(f.val for f in splits.folds)]:
        assert spread(groups, splits, "bin") <= 1
        assert spread(groups, splits, "acq") <= 1
        assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_volume_bins_are_the_quartiles_of_subject_means():
    pairs, voxels = cohort(8, sessions=2)
    splits = sp.make_splits(pairs, volumes_ml=voxels)
    means = [np.mean([voxels[p.mask] for p in pairs if p.subject == s]) for s in splits.subjects]
    assert splits.cuts == pytest.approx(np.percentile(means, [0, 25, 50, 75, 100]))
    assert sorted(Counter(st.bin for st in splits.strata.values()).values()) == [2, 2, 2, 2]


def test_sessions_of_a_subject_stay_together():
    pairs, voxels = cohort(12, sessions=2)
    splits = sp.make_splits(pairs, volumes_ml=voxels)
    for k in range(3):
        test = sp.test_pairs(splits, pairs, k)
        for j in range(3):
            train, val = sp.fold_pairs(splits, pairs, k, j)
            assert len(train) + len(val) + len(test) == len(pairs)
            subjects = [{p.subject for p in part} for part in (train, val, test)]
            assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2]
                        or subjects[1] & subjects[2])


def test_volumes_are_read_from_the_masks_in_ml(tmp_path, write_nifti):
    """Volumes, not voxel counts: 2 mm voxels hold 8 times the volume of 1 mm voxels."""
    pairs = []
    for i, size in enumerate([1, 2, 3, 4, 5, 6]):
        mask = np.zeros((8, 8, 8), np.uint8)
        mask.flat[:size] = 1
        affine = np.diag([2.0, 2.0, 2.0, 1.0]) if i == 0 else np.eye(4)
        pairs.append(Pair(Path("unused.nii"), write_nifti(mask, affine, name=f"m{i}.nii.gz"),
                          f"s{i}"))
    assert sp.lesion_ml(pairs) == pytest.approx(
        {p.mask: ml for p, ml in zip(pairs, [0.008, 0.002, 0.003, 0.004, 0.005, 0.006])})
    splits = sp.make_splits(pairs)
    assert splits.strata["s0"] == sp.Stratum(pytest.approx(0.008), 3, None)
    assert splits.strata["s1"].bin == 0  # the fewest mL, not the fewest voxels (s0)


def test_too_few_subjects():
    pairs, voxels = cohort(4)
    with pytest.raises(InputError, match="need at least 5 subjects; 4 found"):
        sp.make_splits(pairs, volumes_ml=voxels)
    five, voxels = cohort(5)
    assert len(sp.make_splits(five, volumes_ml=voxels).folds) == 3


def test_file_round_trip(tmp_path):
    pairs, voxels = cohort(20)
    splits = sp.make_splits(pairs, seed=9, volumes_ml=voxels)
    sp.save_splits(splits, tmp_path / "splits.json")
    assert json.loads((tmp_path / "splits.json").read_text())["format"] == sp.FORMAT
    assert sp.load_splits(tmp_path / "splits.json", pairs) == splits


def test_a_folder_refuses_another_seed_unless_its_splits_were_copied(tmp_path):
    """Without --splits, a --seed other than the folder's would be silently ignored; splits
    copied from a --splits file carry that file's seed, so any seed continues them."""
    pairs, voxels = cohort(20)
    saved = tmp_path / "out" / sp.SPLITS_FILE
    saved.parent.mkdir()
    sp.save_splits(sp.make_splits(pairs, seed=3, volumes_ml=voxels), saved)
    assert sp.folder_splits(pairs, saved, None, seed=3).seed == 3
    with pytest.raises(InputError, match=f"{saved}: made with seed 3, not 0; pass --seed 3 "
                                         "or another --out"):
        sp.folder_splits(pairs, saved, None, seed=0)

    given = tmp_path / "other.json"
    sp.save_splits(sp.make_splits(pairs, seed=5, volumes_ml=voxels), given)
    copied = tmp_path / "copied" / sp.SPLITS_FILE
    copied.parent.mkdir()
    sp.save_splits(sp.folder_splits(pairs, copied, given, seed=0), copied)
    continued = sp.folder_splits(pairs, copied, None, seed=0)
    assert continued == sp.load_splits(given, pairs) and continued.copied_from == str(given)


def edited(tmp_path: Path, change) -> Path:
    pairs, voxels = cohort(20)
    sp.save_splits(sp.make_splits(pairs, volumes_ml=voxels), tmp_path / "s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    change(doc)
    (tmp_path / "s.json").write_text(json.dumps(doc))
    return tmp_path / "s.json"


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="other"), "not a meshseg splits file"),
    (lambda d: d["subjects"].update({"sub-99": d["subjects"]["sub-0"]}),
     "unknown subjects \\(not in the data\\): sub-99"),
    (lambda d: d["subjects"].pop("sub-1"), "subjects of the data missing from the splits: sub-1"),
    (lambda d: d["outer"][1]["test"].append(d["outer"][0]["test"][0]), "outer test sets overlap"),
    (lambda d: d["outer"][0]["inner_val"][0].append(d["outer"][0]["test"][0]),
     "outer fold 0 inner validation sets do not cover"),
    (lambda d: d.pop("outer"), "unreadable splits file"),
])
def test_damaged_or_foreign_files_are_one_line_errors(tmp_path, change, message):
    path = edited(tmp_path, change)
    with pytest.raises(InputError, match=f"s.json: {message}"):
        sp.load_splits(path, cohort(20)[0])
