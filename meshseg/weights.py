"""MeshNet checkpoints: one safetensors file holding the weights and their config.

safetensors stores raw tensors plus a string-to-string header, so loading a
checkpoint can never execute code (unlike a pickled ``torch.save`` file).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from meshseg.errors import WeightsError
from meshseg.io import atomic_path
from meshseg.model import MeshNet, MeshNetConfig

FORMAT = "meshseg-meshnet/1"


def save_checkpoint(path: str | Path, model: MeshNet, meta: dict | None = None) -> None:
    """Write `model`'s weights, config and `meta` (JSON-safe) atomically to `path`."""
    path = Path(path)
    header = {
        "format": FORMAT,
        "config": json.dumps(model.config.to_dict()),
        "meta": json.dumps(meta or {}),
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=header)


def load_checkpoint(path: str | Path) -> tuple[MeshNet, dict]:
    """Read a checkpoint written by `save_checkpoint`; the model comes back in eval mode.

    Raises:
        WeightsError: missing file, not a meshseg checkpoint, or weights that do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    if header.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a meshseg MeshNet checkpoint (format "
                           f"{header.get('format')!r}, expected {FORMAT!r})")
    try:
        config = MeshNetConfig.from_dict(json.loads(header["config"]))
        meta = json.loads(header.get("meta", "{}"))
    except (KeyError, ValueError, TypeError) as err:
        raise WeightsError(f"{path}: malformed checkpoint config ({err})") from err
    model = MeshNet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise WeightsError(f"{path}: weights do not match the config ({first})") from err
    return model.eval(), meta


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()

