"""Named models: the bundled default, downloadable ones, and checkpoints given by path.

Every file of a downloadable model has a pinned address and sha256; `pull`
refuses anything whose checksum differs, so a cache can only hold verified files.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from meshseg import archs
from meshseg.errors import OutputError, WeightsError
from meshseg.io import atomic_path, cache_home, remove_leftovers
from meshseg.models.meshnet import FoldedLayer, count_parameters, fold
from meshseg.models.tfjs import load_tfjs
from meshseg.models.weights import load_network, sha256_file

_BRAINCHOP_COMMIT = "75c1105a431ee6a604032b58d3f5b1626fb0093c"
BRAINCHOP_URL = (f"https://raw.githubusercontent.com/neurolabusc/T2lesion/{_BRAINCHOP_COMMIT}"
                 "/public/models/model_11ch_ACR/")


@dataclass(frozen=True)
class CatalogEntry:
    """A model meshseg knows by name; `files` maps each file name to its sha256."""

    name: str
    description: str
    architecture: str
    channels: int
    parameters: int
    fmt: str  # "meshseg" (safetensors) or "tfjs" (brainchop's TensorFlow.js layers model)
    entry_file: str
    files: dict[str, str]
    source: str  # "bundled", or the base address the files are downloaded from
    license: str
    default: bool = False

    @property
    def folder(self) -> Path:
        return bundled_dir() if self.source == "bundled" else cache_home() / "models" / self.name

    def is_local(self) -> bool:
        """True when every file is present with the expected checksum."""
        return all((self.folder / name).is_file() and sha256_file(self.folder / name) == sha
                   for name, sha in self.files.items())


REMOTE = (
    CatalogEntry(
        name="brainchop-t2-lesion",
        description="brainchop/NiiVue T2 lesion MeshNet trained on ARC (TensorFlow.js)",
        architecture="MeshNet-11 (ELU)", channels=11, parameters=26556, fmt="tfjs",
        entry_file="model.json",
        files={
            "model.json": "b37385c627d206235c6691125908ec38a92c80577cfd71c14722ed15d61c61fc",
            "model.bin": "6fee8a8ad29454700025dba48ffecd2ccae09ea4e02fb3562a394cc43480c9b1",
        },
        source=BRAINCHOP_URL, license="MIT",
    ),
)


@dataclass(frozen=True)
class LoadedModel:
    """Inference-ready layers plus what reports and `models list` say about them."""

    name: str
    layers: list[FoldedLayer]  # empty for a model given as an .onnx file
    architecture: str
    parameters: int
    postprocess: str
    onnx: bytes | None = None  # the graph itself, for a model given as an .onnx file
    crop: str = "head"  # "nonzero": brainchop's crop to the voxels > 0 (see infer.head_box)
    network: nn.Module | None = None  # a non-MeshNet architecture, run whole in window^3 tiles
    window: int | None = None
    sha256: str = ""  # of the file it was loaded from (model.json for a TF.js model)


def bundled_dir() -> Path:
    """The weights/ folder: inside the installed package (meshseg/weights), or beside it in a
    source checkout."""
    package = Path(__file__).resolve().parents[1]  # meshseg/, this file is meshseg/models/
    for candidate in (package / "weights", package.parent / "weights"):
        if candidate.is_dir():
            return candidate
    return package / "weights"


def bundled() -> list[CatalogEntry]:
    """Entries described by the model cards (weights/*.json) shipped with meshseg."""
    entries = []
    for card in sorted(bundled_dir().glob("*.json")):
        info = json.loads(card.read_text())
        entries.append(CatalogEntry(
            name=info["name"], description=info["description"],
            architecture=info["architecture"], channels=info["channels"],
            parameters=info["parameters"], fmt="meshseg", entry_file=info["file"],
            files={info["file"]: info["sha256"]}, source="bundled", license=info["license"],
            default=info.get("default", False)))
    return entries


def entries() -> list[CatalogEntry]:
    """Every named model: bundled first, then downloadable ones."""
    return bundled() + list(REMOTE)


def find(name: str) -> CatalogEntry:
    """The catalogue entry called `name`.

    Raises:
        WeightsError: no model has that name.
    """
    for entry in entries():
        if entry.name == name:
            return entry
    known = ", ".join(e.name for e in entries()) or "none"
    raise WeightsError(f"{name}: no such model (known: {known}; or give a path to a "
                       ".safetensors checkpoint or a brainchop model.json)")


def default_entry() -> CatalogEntry:
    """The bundled model that `predict` uses when no -m is given."""
    for entry in bundled():
        if entry.default:
            return entry
    raise WeightsError(f"{bundled_dir()}: no bundled default model; pass -m NAME or a path")


def pull(name: str, mirror: str | None = None) -> Path:
    """Download a model's files into the cache, verifying each sha256; returns its folder.

    `mirror` replaces the base address (a local folder as file:// or a server of your own).
    """
    entry = find(name)
    if entry.source == "bundled":
        return entry.folder
    base = mirror or entry.source
    entry.folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers({entry.folder / file_name for file_name in entry.files})  # killed pulls
    for file_name, sha in entry.files.items():
        target = entry.folder / file_name
        if target.is_file() and sha256_file(target) == sha:
            continue
        download(base.rstrip("/") + "/" + file_name, target, sha)
    return entry.folder


DOWNLOAD_DEADLINE_S = 3600.0  # a whole file, however slowly the server sends it
OFFLINE_HINT = ("no network? `meshseg models pull NAME --from URL` fetches from a mirror, "
                "or from a folder as file:///folder/")


def download(url: str, target: Path, sha256: str, timeout: float = 60.0,
             deadline_s: float = DOWNLOAD_DEADLINE_S) -> None:
    """Fetch `url` to `target` through a temporary file; refuse a checksum mismatch.
    `timeout` bounds each wait for bytes, `deadline_s` the whole download (a server sending
    a byte every 10 s never trips the first).

    Raises:
        WeightsError: the download failed or its sha256 differs from `sha256`.
    """
    if not url.startswith(("https://", "http://", "file://")):
        raise WeightsError(f"{url}: only https, http and file addresses are supported")
    try:
        with atomic_path(target) as tmp:
            _fetch(url, tmp, timeout, time.monotonic() + deadline_s)
            got = sha256_file(tmp)
            if got != sha256:
                raise WeightsError(f"{url}: checksum mismatch (sha256 {got}, expected "
                                   f"{sha256}); file refused")
    except OutputError as err:
        raise WeightsError(f"{url}: download failed ({err})") from err


def _fetch(url: str, tmp: Path, timeout: float, deadline: float) -> None:
    """Copy `url` into `tmp` by `deadline` (time.monotonic). Network errors are OSErrors too:
    named here, they do not reach `atomic_path`, which would report them as a file that
    cannot be written.

    Raises:
        WeightsError: the download (or writing what arrives) failed or ran past `deadline`.
    """
    try:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while block := response.read1(1 << 20):  # what has arrived: the clock is checked
                out.write(block)
                if time.monotonic() > deadline:
                    raise WeightsError(f"{url}: download too slow (not finished by its "
                                       "deadline); try again later or use --from")
    except urllib.error.URLError as err:
        offline = isinstance(err.reason, (socket.gaierror, ConnectionError, TimeoutError))
        raise WeightsError(f"{url}: download failed ({err.reason})"
                           + (f"; {OFFLINE_HINT}" if offline else "")) from err
    except OSError as err:
        raise WeightsError(f"{url}: download failed ({err})") from err


def load(spec: str | None) -> LoadedModel:
    """Load a model by catalogue name, by path (.safetensors, model.json, .onnx) or the default."""
    if spec is None:
        return _load_entry(default_entry())
    path = Path(spec)
    if path.suffix in (".json", ".safetensors", ".onnx") and (path.exists() or os.sep in spec):
        return _load_path(path, name=str(path))
    return _load_entry(find(spec))


def _load_entry(entry: CatalogEntry) -> LoadedModel:
    if not entry.is_local():
        hint = (f"run `meshseg models pull {entry.name}`" if entry.source != "bundled"
                else "reinstall meshseg")
        raise WeightsError(f"{entry.name}: model files missing or changed in {entry.folder}; "
                           f"{hint}")
    return _load_path(entry.folder / entry.entry_file, entry.name)


def _load_path(path: Path, name: str) -> LoadedModel:
    """The model in `path`, with that file's sha256 for the records of what it makes."""
    return replace(_read_model(path, name), sha256=sha256_file(path))


def _read_model(path: Path, name: str) -> LoadedModel:
    """How a model crops and post-processes travels with the file: brainchop's TF.js models
    crop to the voxels > 0 and keep the largest lesion (brainchop's defaults), and a meshseg
    checkpoint says so in its meta (`tfjs.save_as_checkpoint`)."""
    if path.suffix == ".onnx":
        from meshseg.models.export import onnx_parameters, read_onnx  # onnx takes ~1 s to import

        graph = read_onnx(path)
        return LoadedModel(name=name, layers=[], postprocess="none", architecture="ONNX",
                           parameters=onnx_parameters(graph), onnx=graph)
    if path.suffix == ".json":
        tf = load_tfjs(path)
        return LoadedModel(name=name, layers=tf.layers, postprocess="largest", crop="nonzero",
                           architecture=f"MeshNet-{tf.channels} ({tf.activation.upper()}, TF.js)",
                           parameters=tf.n_parameters)
    checkpoint = load_network(path)
    model = checkpoint.model
    postprocess = _meta_choice(path, checkpoint.meta, "postprocess", ("none", "largest"))
    if checkpoint.architecture != archs.MESHNET:
        return LoadedModel(name=name, layers=[], postprocess=postprocess, network=model,
                           window=checkpoint.window, parameters=count_parameters(model),
                           architecture=archs.get(checkpoint.architecture).title)
    cfg = model.config
    return LoadedModel(name=name, layers=fold(model), postprocess=postprocess,
                       crop=_meta_choice(path, checkpoint.meta, "crop", ("head", "nonzero")),
                       architecture=f"MeshNet-{cfg.channels} ({cfg.activation.upper()})",
                       parameters=count_parameters(model))


def _meta_choice(path: Path, meta: dict, key: str, allowed: tuple[str, ...]) -> str:
    """A checkpoint's `key` setting, one of `allowed` (the first when absent).

    Raises:
        WeightsError: the checkpoint names a value meshseg does not know.
    """
    value = meta.get(key, allowed[0]) if isinstance(meta, dict) else allowed[0]
    if value not in allowed:
        raise WeightsError(f"{path}: checkpoint {key} {value!r} is not one of "
                           f"{', '.join(allowed)}")
    return value
