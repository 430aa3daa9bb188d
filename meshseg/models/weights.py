"""Checkpoints: one safetensors file holding the weights and what rebuilds the network.

safetensors stores raw tensors plus a string-to-string header, so loading a
checkpoint can never execute code (unlike a pickled ``torch.save`` file).
MeshNet checkpoints (FORMAT) carry the MeshNet config; checkpoints of the other
architectures of `meshseg.archs` (NETWORK_FORMAT) carry the architecture's name
and its build options.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from meshseg import archs
from meshseg.errors import MeshsegError, WeightsError
from meshseg.io import atomic_path, first_line
from meshseg.models.meshnet import MeshNet, MeshNetConfig

FORMAT = "meshseg-meshnet/1"
MAX_CHANNELS = 512  # build-option bound of the other architectures, checked before building
NETWORK_FORMAT = "meshseg-network/1"


@dataclass(frozen=True)
class Checkpoint:
    """A network of any architecture, rebuilt and loaded, in eval mode; `options` are its
    build options (for MeshNet, its whole config)."""

    model: nn.Module
    architecture: str
    options: dict[str, Any]
    meta: dict[str, Any]
    window: int | None = None  # side of the cubes it trained on; None for MeshNet (any size)


def save_checkpoint(path: str | Path, model: MeshNet, meta: dict | None = None) -> None:
    """Write `model`'s weights, config and `meta` (JSON-safe) atomically to `path`."""
    _write(path, model, {"format": FORMAT, "architecture": archs.MESHNET,
                         "config": json.dumps(model.config.to_dict())}, meta)


def save_network(path: str | Path, model: nn.Module, architecture: str,
                 options: dict[str, Any], window: int, meta: dict | None = None) -> None:
    """Write a network built by `archs.build(architecture, **options)` atomically to `path`;
    `window` is the side of the cubes it trained on (inference tiles the volume with them)."""
    _write(path, model, {"format": NETWORK_FORMAT, "architecture": architecture,
                         "options": json.dumps(options), "window": str(window)}, meta)


def _write(path: str | Path, model: nn.Module, header: dict[str, str], meta: dict | None) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(state, str(tmp), metadata={**header, "meta": json.dumps(meta or {})})


def _meshnet(path: Path, header: dict[str, str],
             shapes: dict[str, tuple[int, ...]]) -> tuple[MeshNet, dict]:
    """A MeshNet checkpoint (FORMAT): the network rebuilt from its config, and its meta."""
    try:
        config = MeshNetConfig.from_dict(json.loads(header["config"]))
        meta = json.loads(header.get("meta", "{}"))
    except (KeyError, ValueError, TypeError) as err:
        raise WeightsError(f"{path}: malformed checkpoint config ({err})") from err
    try:
        with torch.device("meta"):  # shapes only: an absurd config allocates nothing
            model = MeshNet(config)
    except RuntimeError as err:  # sizes beyond what a tensor can hold
        raise WeightsError(f"{path}: checkpoint config describes an impossible network "
                           f"({first_line(err)})") from err
    return _filled(path, model, shapes), meta


def load_network(path: str | Path) -> Checkpoint:
    """Read a checkpoint of any architecture (MeshNet's format included).

    Raises:
        WeightsError: missing file, not a meshseg checkpoint, an architecture this meshseg
            cannot build (or whose packages are missing), or weights that do not fit.
    """
    path = Path(path)
    header, shapes = _read_header(path)
    if header.get("format") == FORMAT:
        model, meta = _meshnet(path, header, shapes)
        return Checkpoint(model, archs.MESHNET, model.config.to_dict(), meta)
    if header.get("format") != NETWORK_FORMAT:
        raise WeightsError(f"{path}: not a meshseg checkpoint (format {header.get('format')!r})")
    try:
        name, options = header["architecture"], json.loads(header["options"])
        window, meta = int(header["window"]), json.loads(header.get("meta", "{}"))
        channels = options.get("channels", 1)
        if not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
            raise WeightsError(f"{path}: checkpoint option channels {channels!r} is not "
                               f"1..{MAX_CHANNELS}")
        model = archs.build(name, **options)
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise WeightsError(f"{path}: malformed checkpoint header ({err})") from err
    except WeightsError:
        raise
    except MeshsegError as err:
        raise WeightsError(f"{path}: {err}") from err
    return Checkpoint(_filled(path, model, shapes), name, options, meta, window)


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, tensor shapes) of a safetensors file, from its header alone: no tensor is
    read (nor any code run) before `_filled` has checked the shapes against the network.

    Raises:
        WeightsError: missing or not a readable safetensors file.
    """
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    return header, shapes


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose header `_filled` has checked."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    for key, tensor in state.items():
        check_finite(path, key, tensor)
    return state


def check_finite(path: str | Path, name: str, values: torch.Tensor | np.ndarray) -> None:
    """Refuse a weight holding NaN or Inf: such a network gives empty or random masks.

    Raises:
        WeightsError: "PATH: weight NAME holds NaN or infinite values".
    """
    if isinstance(values, np.ndarray):
        finite = not np.issubdtype(values.dtype, np.floating) or np.isfinite(values).all()
    else:
        finite = not values.is_floating_point() or torch.isfinite(values).all()
    if not finite:
        raise WeightsError(f"{path}: weight {name} holds NaN or infinite values")


def _filled(path: Path, model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """`model` holding exactly the file's tensors, in eval mode; their names and shapes are
    checked against the model from the header first, so an extra or oversized tensor is
    refused before any memory is spent on it.

    Raises:
        WeightsError: "PATH: weights do not match the config (...)".
    """
    wanted = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if shapes != wanted:
        extra = sorted(shapes.keys() - wanted.keys())
        missing = sorted(wanted.keys() - shapes.keys())
        wrong = sorted(k for k in shapes.keys() & wanted.keys() if shapes[k] != wanted[k])
        what = (f"unexpected tensor {extra[0]}" if extra else f"missing tensor {missing[0]}"
                if missing else f"{wrong[0]} is {list(shapes[wrong[0]])}, the network needs "
                f"{list(wanted[wrong[0]])}")
        raise WeightsError(f"{path}: weights do not match the config ({what})")
    try:
        model.load_state_dict(_read_tensors(path), strict=True, assign=True)  # real tensors
    except RuntimeError as err:  # replace meta ones
        raise WeightsError(f"{path}: weights do not match the config "
                           f"({first_line(err)})") from err
    return model.eval()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()

