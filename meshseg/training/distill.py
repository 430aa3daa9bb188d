"""Distillation: a teacher model's lesion probabilities as soft training targets.

A model trained on real scans (brainchop's ARC-trained MeshNet) knows what synthetic truth
cannot teach, such as that CSF-bright ventricles are not lesion. `meshseg train --teacher`
runs it once per training subject, on the whole conformed volume in the teacher's own model
space (its crop and 0..1 scaling, exactly as `meshseg predict` runs it), and caches the
probabilities beside the conformed volumes; each training crop then takes the same window.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from meshseg.errors import InputError, WeightsError
from meshseg.io import atomic_path
from meshseg.models.catalog import LoadedModel, load
from meshseg.pipeline.conform import to_unit_range
from meshseg.pipeline.infer import lesion_probability
from meshseg.training.data import TEACHER_LEVELS, ConformedCache, Pair

logger = logging.getLogger(__name__)



def load_teacher(spec: str) -> LoadedModel:
    """The teacher by catalogue name or path, as `meshseg predict -m` takes it.

    Raises:
        InputError: no such model, or its files cannot be read.
    """
    try:
        return load(spec)
    except WeightsError as err:
        raise InputError(f"training setting teacher: {err}") from err


def teacher_digest(model: LoadedModel) -> str:
    """sha256 of what decides the teacher's output: its weights and its crop (not its name
    or file format), so the cache is shared by every copy of one model."""
    digest = hashlib.sha256(model.crop.encode())
    if model.onnx is not None:
        digest.update(model.onnx)
    tensors = ([t for layer in model.layers for t in (layer.weight, layer.bias)]
               if model.layers else list(model.network.state_dict().values())
               if model.network is not None else [])
    for layer in model.layers:
        digest.update(f"{layer.dilation},{layer.activation};".encode())
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def teacher_entries(pairs: Sequence[Pair], cache: ConformedCache, model: LoadedModel,
                    device: torch.device) -> list[Path]:
    """The cached teacher probabilities of each pair (uint8 steps of 1/TEACHER_LEVELS, on the
    conformed grid), computing the missing ones.

    Raises:
        OutputError: the cache cannot be written.
    """
    from meshseg.pipeline.predict import runner  # predict imports much; only a teacher needs it

    run, tag = None, teacher_digest(model)[:16]
    paths = []
    for pair in pairs:
        entry = cache.entry(pair)
        path = entry.with_name(f"{entry.stem}.teacher-{tag}.npy")
        if not path.exists():
            run = run or runner(model, device)
            logger.info("teacher %s on %s", model.name, pair.image)
            volume = to_unit_range(np.load(entry, mmap_mode="r")[0])
            prob = lesion_probability(volume, run, crop=model.crop)
            with atomic_path(path, suffix=".part.npy") as tmp:
                np.save(tmp, np.round(prob * TEACHER_LEVELS).astype(np.uint8))
        paths.append(path)
    return paths
