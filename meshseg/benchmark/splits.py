"""Nested cross-validation splits: outer folds (train / hold-out test), inner folds (train / val).

As in Fedorov et al. (2025): 3 outer folds, and 3 inner folds inside each outer training
set, stratified by lesion volume (the dataset's quartiles in mL: bins cut at the 0, 25, 50, 75
and 100th percentiles) and by acquisition (`Pair.acq`), grouped by subject so that a
subject's sessions never straddle two sets.

A subject's stratum is its volume bin (of its mean lesion volume over its sessions, in mL, so
that scans with different voxel sizes compare fairly) and its most common acquisition. The
folds' counts of every volume bin, every acquisition and of all subjects differ by at most
one where the strata allow it (`balanced_counts`). The only randomness is which subjects of
a stratum go to which fold, drawn from the seed: the same seed and data give the same
splits.

Splits are saved as JSON (format tag `FORMAT`) with the strata, so they can be read back,
checked against the data and reused (`meshseg cv --splits FILE`); an output folder's copy
of such a file names it (`copied_from`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from meshseg.errors import InputError
from meshseg.io import atomic_path, load_volume
from meshseg.metrics import voxel_ml
from meshseg.training.data import Pair

FORMAT = "meshseg-splits/2"  # /1 held voxel counts on each mask's own grid
SPLITS_FILE = "splits.json"  # the splits of a cv or tune output folder
PERCENTILES = (0, 25, 50, 75, 100)


@dataclass(frozen=True)
class Stratum:
    """What a subject is stratified by: mean lesion volume (mL), its quartile bin, acquisition."""

    ml: float
    bin: int
    acq: str | None


@dataclass(frozen=True)
class OuterFold:
    """One outer fold: its hold-out test subjects and each inner fold's validation subjects.

    The outer training set is every other subject; inner fold j trains on the outer
    training set without ``val[j]``.
    """

    test: tuple[str, ...]
    val: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Splits:
    """Nested splits of a dataset's subjects, reproducible from `seed`."""

    seed: int
    cuts: tuple[float, ...]  # lesion volumes (mL) at PERCENTILES over subjects
    strata: dict[str, Stratum]
    folds: tuple[OuterFold, ...]
    # the splits file an output folder took these from (--splits), else None: made there from
    # `seed`; a record of where they came from, not part of what the splits are
    copied_from: str | None = field(default=None, compare=False)

    @property
    def subjects(self) -> list[str]:
        return sorted(self.strata)

    def train(self, outer: int, inner: int | None = None) -> list[str]:
        """Training subjects of an outer fold, or of one of its inner folds."""
        fold = self.folds[outer]
        held = set(fold.test) | (set(fold.val[inner]) if inner is not None else set())
        return [s for s in self.subjects if s not in held]


# ---------------------------------------------------------------------------- making


def lesion_ml(pairs: Iterable[Pair]) -> dict[Path, float]:
    """Lesion volume in mL (voxels > 0 times the voxel volume) of each pair's mask; reads
    every mask."""
    masks = {p.mask: load_volume(p.mask) for p in pairs}
    return {path: np.count_nonzero(m.data) * voxel_ml(m.affine) for path, m in masks.items()}


def subject_strata(pairs: Sequence[Pair], volumes_ml: Mapping[Path, float]) -> tuple[
        tuple[float, ...], dict[str, Stratum]]:
    """(volume cut points in mL at PERCENTILES, each subject's stratum)."""
    by_subject: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_subject.setdefault(pair.subject, []).append(pair)
    means = {s: float(np.mean([volumes_ml[p.mask] for p in ps]))
             for s, ps in by_subject.items()}
    cuts = tuple(float(c) for c in np.percentile(list(means.values()), PERCENTILES))
    strata = {}
    for subject, ps in sorted(by_subject.items()):
        counts = Counter(p.acq for p in ps)
        acq = min(counts, key=lambda a: (-counts[a], a or ""))  # most common; ties by name
        bin_ = int(np.searchsorted(cuts[1:-1], means[subject], side="right"))
        strata[subject] = Stratum(means[subject], bin_, acq)
    return cuts, strata


def deal(subjects: Sequence[str], strata: Mapping[str, Stratum], k: int,
         rng: np.random.Generator) -> list[list[str]]:
    """Deal subjects into k folds of balanced strata, volume bins, acquisitions and sizes.

    First how many of each stratum each fold gets (`balanced_counts`), then which ones:
    the subjects of a stratum in an order drawn from `rng`.
    """
    keys = sorted({(strata[s].bin, strata[s].acq or "") for s in subjects})
    members: dict[tuple[int, str], list[str]] = {key: [] for key in keys}
    for subject in rng.permutation(sorted(subjects)):
        members[strata[subject].bin, strata[subject].acq or ""].append(str(subject))
    counts = balanced_counts(keys, [len(members[key]) for key in keys], k)
    folds: list[list[str]] = [[] for _ in range(k)]
    for j, key in enumerate(keys):
        bounds = np.concatenate([[0], np.cumsum(counts[:, j])])
        for f in range(k):
            folds[f] += members[key][bounds[f]:bounds[f + 1]]
    return [sorted(fold) for fold in folds]


def balanced_counts(keys: Sequence[tuple[int, str]], sizes: Sequence[int],
                    k: int) -> np.ndarray:
    """Subjects per fold and stratum (k x strata) whose per-fold totals per volume bin, per
    acquisition and overall differ by at most one where possible, and per stratum too
    where that does not cost the others.

    Each stratum's remainder after an equal share goes to the smallest folds; then single
    moves and swaps between folds are taken while they lower the imbalance. Exact balance
    of several margins at once is not always reachable, hence "where possible".
    """
    bins, acqs = sorted({b for b, _ in keys}), sorted({a for _, a in keys})
    features = np.hstack([np.eye(len(keys)),  # stratum, bin, acquisition, total
                          [[b == x for x in bins] for b, _ in keys],
                          [[a == x for x in acqs] for _, a in keys],
                          np.ones((len(keys), 1))])
    weights = np.concatenate([np.full(len(keys), 0.1), np.ones(features.shape[1] - len(keys))])
    sizes = np.asarray(sizes)
    counts = np.tile(sizes // k, (k, 1))
    for j in np.argsort(-(sizes % k), kind="stable"):
        counts[np.argsort(counts.sum(1), kind="stable")[:sizes[j] % k], j] += 1
    score = _imbalance(counts, features, weights)
    improved = True
    while score > 0 and improved:
        improved = False
        for f, g in itertools.permutations(range(k), 2):
            for a, b in itertools.product(range(len(keys)), [None, *range(len(keys))]):
                trial = counts.copy()
                trial[[f, g], a] += (-1, 1)
                if b is not None:
                    trial[[g, f], b] += (-1, 1)
                if trial.min() >= 0 and _imbalance(trial, features, weights) < score:
                    counts, score, improved = trial, _imbalance(trial, features, weights), True
    return counts


def _imbalance(counts: np.ndarray, features: np.ndarray, weights: np.ndarray) -> float:
    """Weighted sum over features of how far their per-fold counts spread beyond one."""
    per_fold = counts @ features
    return float(np.maximum(per_fold.max(0) - per_fold.min(0) - 1, 0) @ weights)


def make_splits(pairs: Sequence[Pair], outer: int = 3, inner: int = 3, seed: int = 0,
                volumes_ml: Mapping[Path, float] | None = None) -> Splits:
    """Nested stratified splits of the pairs' subjects.

    Args:
        volumes_ml: lesion volume (mL) per mask path; read from the masks when not given.

    Raises:
        InputError: too few subjects for every fold to train, validate and test on some.
    """
    volumes_ml = lesion_ml(pairs) if volumes_ml is None else volumes_ml
    cuts, strata = subject_strata(pairs, volumes_ml)
    n = len(strata)
    if outer < 2 or inner < 2:
        raise InputError(f"nested splits need 2 or more outer and inner folds (got {outer} "
                         f"and {inner})")
    least = next(m for m in range(inner, inner + outer * inner + 2)
                 if m - math.ceil(m / outer) >= inner)  # each outer training set holds `inner`
    if n < least:
        raise InputError(f"nested splits with {outer} outer and {inner} inner folds need at "
                         f"least {least} subjects; {n} found")
    rng = np.random.default_rng(seed)
    folds = []
    for test in deal(list(strata), strata, outer, rng):
        rest = sorted(set(strata) - set(test))
        inner_val = deal(rest, strata, inner, rng)
        folds.append(OuterFold(tuple(test), tuple(tuple(v) for v in inner_val)))
    return Splits(seed, cuts, strata, tuple(folds))


# ---------------------------------------------------------------------------- using


def _by_subject(pairs: Sequence[Pair], subjects: Iterable[str]) -> list[Pair]:
    wanted = set(subjects)
    return [p for p in pairs if p.subject in wanted]


def fold_pairs(splits: Splits, pairs: Sequence[Pair], outer: int,
               inner: int) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, validation pairs) of inner fold `inner` of outer fold `outer`."""
    return (_by_subject(pairs, splits.train(outer, inner)),
            _by_subject(pairs, splits.folds[outer].val[inner]))


def test_pairs(splits: Splits, pairs: Sequence[Pair], outer: int) -> list[Pair]:
    """The hold-out test pairs of outer fold `outer`."""
    return _by_subject(pairs, splits.folds[outer].test)


# ---------------------------------------------------------------------------- files


def save_splits(splits: Splits, path: Path) -> None:
    """Write the splits as JSON, atomically."""
    doc = {
        "format": FORMAT, "seed": splits.seed, "percentiles": list(PERCENTILES),
        "cuts_ml": list(splits.cuts),
        "subjects": {s: {"ml": st.ml, "bin": st.bin, "acq": st.acq}
                     for s, st in sorted(splits.strata.items())},
        "outer": [{"test": list(f.test), "inner_val": [list(v) for v in f.val]}
                  for f in splits.folds],
    }
    if splits.copied_from is not None:
        doc["copied_from"] = splits.copied_from
    with atomic_path(path, suffix=".part.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def folder_splits(pairs: Sequence[Pair], saved: Path, given: Path | None, outer: int = 3,
                  inner: int = 3, seed: int = 0) -> Splits:
    """The splits of an output folder whose splits file is `saved`: `given` (a splits file),
    else `saved` when continuing, else new ones from the seed. The caller saves them.

    A folder's results hold only for the splits they were made with, hence the checks: a
    given file must equal `saved`, and without one `seed` must be the seed `saved` was made
    with. Splits copied from a given file (`Splits.copied_from`) carry that file's seed,
    not one of this folder, so any seed continues them.

    Raises:
        InputError: a bad splits file, `given` differs from an existing `saved`, or `seed`
            is not the one `saved` was made with.
    """
    current = load_splits(saved, pairs) if saved.exists() else None
    if given is not None:
        chosen = replace(load_splits(given, pairs), copied_from=str(given))
        if current is not None and current != chosen:
            raise InputError(f"{given}: differs from {saved}, which the results in that "
                             "folder were made with")
        return chosen if current is None else current
    if current is None:
        return make_splits(pairs, outer, inner, seed)
    if current.copied_from is None and current.seed != seed:
        raise InputError(f"{saved}: made with seed {current.seed}, not {seed}; pass --seed "
                         f"{current.seed} or another --out")
    return current


def load_splits(path: Path, pairs: Sequence[Pair]) -> Splits:
    """Read a splits file and check it against the data.

    Raises:
        InputError: unreadable, not a meshseg splits file, or not a partition of exactly
            the data's subjects (unknown or missing subjects, a subject in two sets).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT:
            raise InputError(f"{path}: not a meshseg splits file (format {FORMAT} expected)")
        strata = {s: Stratum(float(v["ml"]), int(v["bin"]), v["acq"])
                  for s, v in doc["subjects"].items()}
        folds = tuple(OuterFold(tuple(f["test"]), tuple(tuple(v) for v in f["inner_val"]))
                      for f in doc["outer"])
        splits = Splits(int(doc["seed"]), tuple(float(c) for c in doc["cuts_ml"]), strata, folds,
                        doc.get("copied_from"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"{path}: unreadable splits file ({type(err).__name__}: {err})") from err
    problem = check_splits(splits, {p.subject for p in pairs})
    if problem:
        raise InputError(f"{path}: {problem}")
    return splits


def check_splits(splits: Splits, data_subjects: set[str]) -> str | None:
    """The first way the splits fail to partition the data's subjects, or None."""
    known = set(splits.strata)
    for name, extra in (("unknown subjects (not in the data)", known - data_subjects),
                        ("subjects of the data missing from the splits", data_subjects - known)):
        if extra:
            return f"{name}: {', '.join(sorted(extra)[:5])}{' ...' if len(extra) > 5 else ''}"
    problem = _partition([f.test for f in splits.folds], known, "outer test sets")
    for k, fold in enumerate(splits.folds):
        problem = problem or _partition(fold.val, set(splits.train(k)),
                                        f"outer fold {k} inner validation sets")
    return problem


def _partition(parts: Sequence[Sequence[str]], whole: set[str], name: str) -> str | None:
    """Why `parts` is not a partition of `whole` into non-empty sets, or None."""
    seen: Counter = Counter(s for part in parts for s in part)
    twice = sorted(s for s, n in seen.items() if n > 1)
    if twice:
        return f"{name} overlap: {', '.join(twice[:5])}"
    if set(seen) != whole:
        odd = sorted(set(seen) ^ whole)
        return f"{name} do not cover their subjects exactly: {', '.join(odd[:5])}"
    if len(parts) < 2 or not all(parts):
        return f"{name}: need two or more non-empty sets"
    return None
