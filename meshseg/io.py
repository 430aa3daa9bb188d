"""Reading scans and writing masks, with the affine always kept beside the voxels.

Writes are atomic: the image (or table) goes to a temporary file in the target folder and is
renamed over the target only once complete, so a killed run never leaves a
half-written mask behind.
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
import os
import re
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.spatialimages import HeaderDataError

from meshseg import __version__
from meshseg.errors import InputError, OutputError
from meshseg.pipeline import validate

NIFTI_SUFFIXES = (".nii", ".nii.gz")
GRID_ATOL_MM = 1e-3  # affines closer than this count as the same grid
HEADER_READ = 544  # a NIfTI-2 header and its extender; a NIfTI-1 one needs 352
READ_CHUNK = 1 << 24
WARNINGS_SEP = " | "  # between an input's warnings in one report cell
MAX_OFFSET = 1 << 32  # bytes kept before the voxels at most; a larger vox_offset is truncated
# Written into every NIfTI (header descrip) and PNG (Software text chunk) meshseg makes, so a
# rerun can tell its own files from a user's under the same name (`made_by_meshseg`).
SIGNATURE = f"meshseg {__version__}"
# atomic_path's temporary files: ".<target name>.<8 random characters>.part<suffix>"
LEFTOVER = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.part"
                      r"(\.nii\.gz|\.nii|\.json|\.csv|\.png|)$")
LEFTOVER_AGE_S = 300  # older than any write in flight (a write touches its file as it goes)


@dataclass
class Volume:
    """A 3-D scan: voxel values (scaling applied), voxel-to-RAS+ mm affine, header."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)  # header repairs, for the report

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<array>"


def record_path(path: Path | str | None) -> str:
    """How a record names a file: absolute, so that one folder's records agree however the
    paths were typed and from wherever (a symlink is kept, not resolved); "" for none."""
    return os.path.abspath(path) if path else ""


def is_nifti_path(path: Path) -> bool:
    """True when the file name ends in .nii or .nii.gz."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def stem(path: Path) -> str:
    """File name without .nii or .nii.gz."""
    name = path.name
    for suffix in NIFTI_SUFFIXES[::-1]:  # ".nii.gz" before ".nii"
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def bids_entities(path: Path) -> dict[str, str]:
    """BIDS key-value entities of a file name: sub-01_ses-2_acq-x_T2w -> {sub, ses, acq}."""
    return dict(part.split("-", 1) for part in stem(path).split("_") if "-" in part)


def load_volume(path: str | Path) -> Volume:
    """Read a NIfTI file through the reading gate (`pipeline.validate`) into a float32 `Volume`.

    The whole file is read (gunzipped with its CRC and length checked) before any voxel is
    used; the header is checked before the data are allocated. nibabel's own messages are
    caught: the meaningful ones become `Volume.warnings`, nothing is printed.

    Raises:
        InputError: the file is missing, not NIfTI, corrupted, inconsistent, or not one usable
            3-D volume; one line naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        if path.is_symlink() and "annex" in Path(os.readlink(path)).parts:
            raise InputError(f"{path}: annexed, but its content is not here; fetch it with "
                             f"`datalad get {path}`")
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a NIfTI file")
    check_regular(path)
    if not is_nifti_path(path):
        raise InputError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    with warnings.catch_warnings(record=True) as caught, _nibabel_log() as logged:
        warnings.simplefilter("always")
        img, notes = _read_nifti(path)
    notes += [f"{path}: {message}" for message in logged]
    notes += [f"{path}: {w.message}" for w in caught if issubclass(w.category, UserWarning)]
    return Volume(data=np.asarray(img.dataobj), affine=img.affine.astype(np.float64),
                  header=img.header, path=path, warnings=list(dict.fromkeys(notes)))


def check_regular(path: Path) -> None:
    """Refuse a FIFO, a device or a socket (or a symlink to one) before anything reads it:
    reading /dev/zero or a FIFO never ends.

    Raises:
        InputError: `path` exists and is not a regular file.
    """
    if path.exists() and not path.is_dir() and not path.is_file():
        raise InputError(f"{path}: not a regular file (a FIFO, device or socket); meshseg "
                         "reads NIfTI files")


def _read_nifti(path: Path) -> tuple[nib.Nifti1Image, list[str]]:
    """(image holding float32 voxels, repair warnings) of a .nii or .nii.gz file."""
    name = str(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(HEADER_READ)
            header = validate.parse_header(name, head)
            _, nbytes = validate.data_bytes(name, header)
            offset = float(header["vox_offset"])
            wanted = int(min(offset, MAX_OFFSET)) if math.isfinite(offset) and offset > 0 else 0
            body, length = _read_all(handle, bytearray(head), max(wanted, HEADER_READ) + nbytes)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise InputError(f"{path}: corrupted or truncated file ({first_line(err)})") from err
    notes = validate.repair_header(name, header, body, length)
    offset = int(header["vox_offset"])
    try:  # the extensions, as nibabel reads them after the (repaired) header
        header = type(header).from_fileobj(
            BytesIO(bytes(header.binaryblock) + bytes(body[header.sizeof_hdr:offset])),
            check=False)
        raw = np.asanyarray(ArrayProxy(BytesIO(body), header))
        affine = header.get_best_affine()
    except (HeaderDataError, ValueError, TypeError) as err:
        raise InputError(f"{path}: not a readable NIfTI image ({first_line(err)})") from err
    validate.check_grid(name, affine)
    raw = raw.reshape(raw.shape[:3])
    validate.check_intensities(name, raw)
    return type_for(header)(raw.astype(np.float32), affine, header=header), notes


def _read_all(handle: IO[bytes], body: bytearray, keep: int) -> tuple[bytearray, int]:
    """Read `handle` to its end (so gzip verifies the CRC and length there), keeping the first
    `keep` bytes in `body`; returns (body, length of the whole file)."""
    length = len(body)
    while chunk := handle.read(READ_CHUNK):
        length += len(chunk)
        if len(body) < keep:
            body += chunk[:keep - len(body)]
    return body, length


@contextmanager
def _nibabel_log() -> Iterator[list[str]]:
    """Collect what nibabel logs (it prints to stderr through its own handler otherwise)."""
    logger = nib.imageglobals.logger
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    saved = logger.handlers[:]
    logger.handlers = [handler]
    try:
        yield messages
    finally:
        logger.handlers = saved


def save_like(data: np.ndarray, like: Volume, path: str | Path, dtype: type) -> None:
    """Write `data` on `like`'s grid (affine, qform/sform and their codes kept), atomically."""
    header = like.header.copy()
    header.set_data_dtype(dtype)
    img = type_for(header)(np.asarray(data, dtype=dtype), None, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_xyzt_units(*like.header.get_xyzt_units())
    write_atomic(img, path)


def save_array(data: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """Write a new NIfTI image (both qform and sform set to `affine`, code 'scanner')."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    write_atomic(img, path)


def type_for(header: nib.Nifti1Header) -> type:
    """The image class matching a header (NIfTI-1 or NIfTI-2)."""
    return nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image


def make_folder(folder: Path) -> None:
    """mkdir -p, failing as an OutputError that names the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{folder}: cannot create folder ({err.strerror or err})") from err


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".part") -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    An OSError in the block (a full disk) is a write error of `path`, so callers need not
    wrap their writes; a block that also reads or downloads must name those errors itself.

    Raises:
        OutputError: the folder is missing or not writable, writing fails, or the rename fails.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise OutputError(f"{path}: cannot write here ({err.strerror or err})") from err
    try:
        yield Path(tmp)
        _commit(Path(tmp), path)
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror or err})") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_leftovers(targets: set[Path], age_s: float = LEFTOVER_AGE_S) -> list[Path]:
    """Delete the temporary files that a killed `atomic_path` write of one of `targets`
    left (`LEFTOVER` names older than `age_s`, so another process's write in flight is
    left alone); returns what was removed."""
    removed = []
    now = time.time()
    for folder in sorted({t.parent for t in targets if t.parent.is_dir()}):
        for path in folder.iterdir():
            found = LEFTOVER.match(path.name)
            if not found or folder / found["target"] not in targets:
                continue
            try:
                if now - path.stat().st_mtime > age_s and path.is_file():
                    path.unlink()
                    removed.append(path)
            except OSError:  # gone already (another process cleaned it up)
                continue
    return removed


def _commit(tmp: Path, path: Path) -> None:
    """Flush the finished temporary file to disk and rename it over `path`."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    # mkstemp (and some writers) leave 0600, which would hide results from colleagues
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def write_atomic(img: nib.Nifti1Image, path: str | Path) -> None:
    """Save a NIfTI image so that `path` is either absent, the old file, or complete."""
    suffix = ".part.nii.gz" if str(path).lower().endswith(".gz") else ".part.nii"
    img.header["descrip"] = SIGNATURE.encode()  # not the input's own text
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)


def made_by_meshseg(path: Path) -> bool:
    """True for a NIfTI or PNG file carrying meshseg's `SIGNATURE` (its header descrip, its
    Software text chunk); False for anything else, unreadable files included."""
    if not path.is_file():  # never open a FIFO or a device
        return False
    try:
        if is_nifti_path(path):
            descrip = nib.load(path).header["descrip"].item()
            return descrip.decode("latin-1").startswith("meshseg ")
        from PIL import Image  # only pictures need it

        with Image.open(path) as picture:
            return str(picture.info.get("Software", "")).startswith("meshseg ")
    except Exception:  # noqa: BLE001 - any unreadable file is simply not meshseg's
        return False


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets run as a formula


def csv_cell(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (a file named `=1+1.nii.gz`)
    gets a leading apostrophe, which shows it as text; other values stay as they are."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_START) else value


def write_csv(path: str | Path, columns: Sequence[str],
              rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows (keyed by column; a key outside `columns` is a bug and raises) as a UTF-8
    CSV with a header line, atomically, text cells escaped by `csv_cell`; returns `path`.

    Raises:
        OutputError: the file cannot be written.
    """
    with atomic_path(path, suffix=".part.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows({key: csv_cell(value) for key, value in row.items()}
                             for row in rows)
    return Path(path)


def save_png(picture, path: Path) -> None:
    """Write a PIL image as PNG atomically, with meshseg's `SIGNATURE` as its Software text
    chunk (what `made_by_meshseg` reads back). Pillow is imported here: only pictures need it."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", SIGNATURE)
    with atomic_path(path, suffix=".part.png") as tmp:
        picture.save(tmp, format="PNG", pnginfo=info)


def _umask() -> int:
    """The process umask (reading it requires setting it; restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_home() -> Path:
    """meshseg's cache folder (models, conformed training volumes, QC's maps): $MESHSEG_HOME,
    else $XDG_CACHE_HOME/meshseg, else ~/.cache/meshseg."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("MESHSEG_HOME") or Path(cache) / "meshseg")


def kept_arrays(name: str, key: str, make: Callable[[], Sequence[np.ndarray]]
                ) -> list[np.ndarray]:
    """The arrays `make()` returns, kept in the cache folder as arrays/<name>-<key>.npz, so
    that later processes read them instead of making them again (QC's maps of the MNI grid:
    half a second to make, milliseconds to read). `key` must change whenever the arrays
    would (the code and data they are made from). A file that does not read is made again;
    one that cannot be written is not kept, and older keys of `name` are removed: the cache
    never stops the work it serves."""
    folder = cache_home() / "arrays"
    path = folder / f"{name}-{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            return [stored[f"arr_{i}"] for i in range(len(stored.files))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    arrays = list(make())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".part.npz") as tmp:
            np.savez(tmp, *arrays)
        for older in folder.glob(f"{name}-*.npz"):
            if older != path:
                older.unlink(missing_ok=True)
    except (OSError, OutputError):
        pass
    return arrays


def first_line(err: BaseException) -> str:
    """First line of an exception message, for one-line errors."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
