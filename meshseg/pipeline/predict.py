"""The main job: load -> validate -> conform -> infer -> un-conform -> write.

`segment` is the pure pipeline on a `Volume`; `segment_file` adds reading, writing,
resuming and the per-input record (pipeline.record) that cohort reports are made of;
`run_cohort` segments each input in turn, with a progress bar and one line per input.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import click
import numpy as np
import torch
from rich.console import Console
from torch import nn

from meshseg import __version__
from meshseg.archs import INSTALL_HINT
from meshseg.errors import (
    DeviceError,
    ForeignOutputError,
    InputError,
    MeshsegError,
    OutputError,
    WeightsError,
)
from meshseg.io import (
    WARNINGS_SEP,
    Volume,
    first_line,
    is_nifti_path,
    load_volume,
    made_by_meshseg,
    make_folder,
    record_path,
    save_like,
)
from meshseg.metrics import label_lesions, largest_lesion, voxel_ml
from meshseg.models.catalog import LoadedModel
from meshseg.models.weights import sha256_file
from meshseg.pipeline.conform import conform, to_unit_range, unconform
from meshseg.pipeline.infer import (
    PRECISIONS,
    Box,
    OnLayer,
    Runner,
    check_classes,
    check_precision,
    lesion_probability,
    torch_runner,
)
from meshseg.pipeline.record import (
    Result,
    as_skipped,
    read_sidecar,
    sidecar_path,
    write_bids_sidecar,
    write_report,
    write_sidecar,
)
from meshseg.pipeline.validate import check_volume
from meshseg.progress import bars
from meshseg.qc import picture
from meshseg.qc.checks import Checks, review, summary_line, write_review

Progress = Callable[[str, float], None]
"""Called with a stage name (load, conform, layers, unconform, qc, write) and its fraction
done."""

# Share of one scan's time per stage, so a scan's bar moves evenly (measured on a CPU: the
# layers take most of it; QC, on by default, about a quarter: docs/qc.md).
STAGES = {"load": (0.0, 0.05), "conform": (0.05, 0.12), "layers": (0.12, 0.70),
          "unconform": (0.70, 0.74), "qc": (0.74, 0.97), "write": (0.97, 1.0)}


class StageClock:
    """A `Progress` that passes reports on and times each stage: the record's per-stage
    seconds (where a scan's time goes).

    A stage starts where the previous report left off, not at its own first report: a
    runner may report only when it is done (OpenVINO, onnxruntime), and the work between
    two stages then counts in the next one, so the stages add up to the whole scan.
    """

    def __init__(self, progress: Progress | None = None) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.perf_counter()
        self._started.setdefault(stage, self._last)
        self._last = now
        if fraction >= 1.0:
            self.seconds[stage] = round(now - self._started[stage], 3)
        if self.progress is not None:
            self.progress(stage, fraction)


@dataclass(frozen=True)
class Outputs:
    """Where one input's results go; the sidecar record goes beside the mask."""

    mask: Path
    prob: Path | None = None
    picture: Path | None = None  # QC picture (PNG)
    mni: Path | None = None  # the mask on the MNI grid
    reference: str = ""  # BIDS derivatives: the source scan, as SpatialReference states it

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.mask)

    @property
    def prob_sidecar(self) -> Path | None:
        """The probability map's BIDS sidecar (only BIDS derivatives need one)."""
        return sidecar_path(self.prob) if self.prob is not None and self.reference else None

    def files(self) -> list[tuple[Path, str]]:
        """Every file this input's run writes, with its role (for messages), record last."""
        found = [(self.mask, "mask"), (self.prob, "probability map"),
                 (self.picture, "QC picture"), (self.mni, "MNI mask"),
                 (self.prob_sidecar, "record"), (self.sidecar, "record")]
        return [(path, role) for path, role in found if path is not None]

    def images(self) -> list[Path]:
        """The NIfTI outputs: the mask, and the probability map when asked for."""
        return [self.mask] + ([self.prob] if self.prob is not None else [])

    def complete(self, mask_verified: bool = False) -> bool:
        """True when every NIfTI output exists and loads to its last voxel (a 0-byte or
        truncated file is not complete) and the QC picture and MNI mask asked for exist (an
        option added to a finished cohort redoes its inputs, not "skipped" with nothing).
        `mask_verified`: the mask's sha256 matched its record, so it is not read again."""
        if not all(path.is_file() for path in (self.picture, self.mni) if path is not None):
            return False
        images = self.images()[1:] if mask_verified else self.images()
        try:
            return all(load_volume(path) is not None for path in images)
        except InputError:
            return False


@dataclass(frozen=True)
class Settings:
    """Everything besides the model that changes a mask; each sidecar records it."""

    postprocess: str | None = None  # None: the model's own choice
    threshold: float = 0.5
    backend: str = "torch"
    precision: str = "fp32"


def default_backend(model: LoadedModel, device: torch.device) -> str:
    """onnx for an ONNX-only model, else torch, OpenVINO installed or not: on the five real
    scans torch's layer-by-layer run (16 MiB slabs) was as fast as OpenVINO's whole-volume
    call or faster, in half its memory (OpenVINO 1.0-1.8 GB; docs/benchmarks.md).
    `--backend openvino` stays for those who have the memory."""
    if model.onnx and not model.layers:
        return "onnx"
    return "torch"


def runner(model: LoadedModel, device: torch.device, backend: str = "torch",
           slab: int | None = None, precision: str = "fp32") -> Runner:
    """The network on the chosen backend (`backend_runner`), its logits checked on every
    volume for the two classes meshseg reads, whatever the backend.

    Raises:
        WeightsError, DeviceError: see `backend_runner`; running it, WeightsError for a
            model that gives other than two classes.
    """
    run = backend_runner(model, device, backend, slab, precision)

    def checked(x: torch.Tensor, on_layer: OnLayer | None, keep: Box) -> torch.Tensor:
        logits = run(x, on_layer, keep)
        check_classes(model.name, logits.shape[0])
        return logits

    return checked


def backend_runner(model: LoadedModel, device: torch.device, backend: str = "torch",
                   slab: int | None = None, precision: str = "fp32") -> Runner:
    """The network on the chosen backend: layer-by-layer torch, OpenVINO or onnxruntime; a
    non-MeshNet architecture runs whole on torch, in tiles (`window_runner`; `slab` does not
    apply).

    Raises:
        WeightsError: an ONNX-only model asked to run on the torch backend, a non-MeshNet
            model on the onnx or openvino backend, or OpenVINO not installed.
        DeviceError: a precision or device the backend cannot run.
    """
    if model.network is not None:
        if backend != "torch":
            raise WeightsError(f"{model.name}: the {backend} backend runs MeshNet models only "
                               f"({model.architecture})")
        return window_runner(model.network, model.window, device, precision)
    if backend in ("openvino", "onnx"):
        if backend == "onnx" and precision != "fp32":
            raise DeviceError(f"--precision {precision}: the onnx backend runs in fp32 only")
        # onnx takes ~1 s to import: only here
        from meshseg.models.export import onnx_runner, openvino_runner, to_onnx

        graph = model.onnx or to_onnx(model.layers).SerializeToString()
        if backend == "openvino":
            return openvino_runner(graph, device, precision, model.name)
        return onnx_runner(graph, device, model.name)
    if not model.layers:
        raise WeightsError(f"{model.name}: an ONNX model runs only with --backend onnx")
    return torch_runner(model.layers, device, slab=slab, precision=precision)


def window_runner(network: nn.Module, window: int, device: torch.device,
                  precision: str = "fp32") -> Runner:
    """A whole network as a `Runner`: MONAI's sliding-window inference over the crop in
    window^3 tiles (the size it trained on; 25% overlap, Gaussian-weighted blending), so
    networks tied to their training size (UNETR, U-Mamba-Enc) and crops of any shape work.

    Raises:
        DeviceError: see `infer.check_precision`.
        WeightsError: MONAI is not installed.
    """
    check_precision(precision, device)
    try:
        from monai.inferers import sliding_window_inference
    except ImportError as err:
        raise WeightsError(f"tiled inference needs MONAI: {INSTALL_HINT}") from err
    network = network.to(device).eval()

    def run(x: torch.Tensor, on_layer: OnLayer | None, keep: Box) -> torch.Tensor:
        report = on_layer or (lambda done, total: None)
        report(0, 1)
        with torch.no_grad(), torch.autocast(device.type, dtype=PRECISIONS[precision],
                                             enabled=precision != "fp32"):
            logits = sliding_window_inference(x[None].to(device), (window,) * 3, 1, network,
                                              overlap=0.25, mode="gaussian")
        report(1, 1)
        return logits[0][(slice(None), *keep)].float().cpu()

    return run


def segment(volume: Volume, model: LoadedModel, run: Runner,
            progress: Progress | None = None) -> np.ndarray:
    """Lesion probability (float32) on the volume's own grid, with the input crop `model` was
    trained with (taken from the model so that no caller can run it on the wrong crop)."""
    report = progress or (lambda stage, fraction: None)
    check_volume(volume)
    report("conform", 0.0)
    conformed, record = conform(volume)
    report("conform", 1.0)
    prob = lesion_probability(to_unit_range(conformed), run, crop=model.crop,
                              on_layer=lambda i, n: report("layers", i / n))
    report("layers", 1.0)  # with the softmax
    report("unconform", 0.0)
    native = unconform(prob, record)
    report("unconform", 1.0)
    return native


def to_mask(prob: np.ndarray, postprocess: str = "none", threshold: float = 0.5) -> np.ndarray:
    """Lesion where the probability exceeds `threshold` (0.5 is argmax of two classes);
    'largest' then keeps one lesion."""
    mask = prob > threshold
    if postprocess == "largest":
        mask = largest_lesion(mask)
    return mask.astype(np.uint8)


def lesion_stats(mask: np.ndarray, affine: np.ndarray) -> tuple[float, int, int]:
    """(volume in mL, voxel count, number of 26-connected lesions) of a 0/1 mask."""
    voxels = int(mask.sum())
    return voxels * voxel_ml(affine), voxels, label_lesions(mask)[1]


def segment_file(path: Path, outputs: Outputs, model: LoadedModel, run: Runner, device: str, *,
                 overwrite: bool = False, settings: Settings = Settings(),
                 progress: Progress | None = None, checks: Checks | None = None) -> Result:
    """Segment one file and write its outputs, then its sidecar record; user-facing problems
    become a failed Result, never an exception.

    An earlier output is kept (status "skipped", its own record returned) only when its
    sidecar says the same input, model and settings made it and it loads completely.
    """
    start = time.perf_counter()
    result = new_record(path, outputs, model, device, settings)
    report = StageClock(progress)
    volume: Volume | None = None
    try:
        previous = read_sidecar(outputs.sidecar)
        check_foreign(outputs, previous)  # --overwrite too: it replaces meshseg's files only
        kept = None if overwrite else kept_record(outputs, previous, result)
        if kept is not None:
            return kept
        report("load", 0.0)
        volume = load_volume(path)
        result.warnings = WARNINGS_SEP.join(volume.warnings)
        report("load", 1.0)
        prob = segment(volume, model, run, progress=report)
        mask = to_mask(prob, result.postprocess, result.threshold)
        result.lesion_ml, result.voxels, result.components = lesion_stats(mask, volume.affine)
        if checks:
            report("qc", 0.0)
            quality_check(volume, prob, mask, outputs, result, checks)
            report("qc", 1.0)
        report("write", 0.0)
        make_folder(outputs.mask.parent)
        if outputs.prob is not None:
            save_like(prob, volume, outputs.prob, np.float32)
        if outputs.prob_sidecar is not None:
            write_bids_sidecar(outputs.prob_sidecar, outputs.reference)
        save_like(mask, volume, outputs.mask, np.uint8)
        result.output_sha256 = sha256_file(outputs.mask)
        report("write", 1.0)
    except ForeignOutputError as err:
        result.status, result.error = "failed", str(err)
        return result  # no record: the file there is not meshseg's to vouch for
    except InputError as err:
        result.status, result.error = "failed", str(err)
        if volume is None:  # unreadable (not NIfTI, missing, damaged): nothing beside it
            return result
    except MeshsegError as err:
        result.status, result.error = "failed", str(err)
    except MemoryError:
        result.status, result.error = "failed", f"{path}: out of memory (try a smaller --slab)"
    except Exception as err:  # noqa: BLE001 - a bug must not stop the rest of the cohort
        result.status, result.error = "failed", (f"{path}: unexpected {type(err).__name__} "
                                                 f"({first_line(err)}); please report it")
    result.seconds = round(time.perf_counter() - start, 3)
    result.stage_seconds = report.seconds
    result.date = datetime.now(UTC).isoformat(timespec="seconds")
    _write_record(result, outputs)
    return result


def quality_check(volume: Volume, prob: np.ndarray, mask: np.ndarray, outputs: Outputs,
                  result: Result, checks: Checks) -> None:
    """QC of one result: its flags and location into the record, then the QC picture and MNI
    mask written (before the mask, always an input's last file).

    Raises:
        InputError: `checks.strict_contrast` and the scan does not look T2-weighted.
    """
    with ThreadPoolExecutor(1) as pool:  # the picture's scene is found while the scan registers
        shown = (pool.submit(picture.scene, volume.data, volume.affine, mask, prob)
                 if outputs.picture is not None else None)
        assessment = review(volume, prob, mask, result, checks)
        make_folder(outputs.mask.parent)
        write_review(assessment, volume, prob, mask, outputs, result,
                     shown.result() if shown is not None else None)


def new_record(path: Path, outputs: Outputs, model: LoadedModel, device: str,
               settings: Settings) -> Result:
    """The record of a run about to start: what will make the outputs and with what."""
    return Result(input=record_path(path), output=record_path(outputs.mask), status="ok",
                  model=model.name, device=device, prob=record_path(outputs.prob),
                  input_sha256=_sha256_or_empty(path),
                  model_sha256=model.sha256, threshold=settings.threshold,
                  postprocess=settings.postprocess or model.postprocess,
                  backend=settings.backend, precision=settings.precision,
                  threads=torch.get_num_threads(), meshseg_version=__version__,
                  torch_version=torch.__version__)


def _sha256_or_empty(path: Path) -> str:
    """The file's sha256, or "" when it cannot be read or is no regular file (a FIFO or
    /dev/zero would never end; loading it then reports why)."""
    if not path.is_file():
        return ""
    try:
        return sha256_file(path)
    except OSError:
        return ""


def kept_record(outputs: Outputs, previous: Result | None, wanted: Result) -> Result | None:
    """The earlier record (`previous`, from the sidecar) to keep instead of segmenting again,
    or None to segment."""
    if previous is None:
        return None
    same = (previous.status == "ok" and previous.same_settings(wanted)
            and previous.input_sha256 == wanted.input_sha256
            and record_path(previous.prob) == wanted.prob
            and _unchanged(outputs.mask, previous.output_sha256)
            and outputs.complete(mask_verified=bool(previous.output_sha256)))
    return as_skipped(previous) if same else None


def _unchanged(mask: Path, recorded: str) -> bool:
    """True when the mask is still the one its record describes (records from before
    output_sha256 existed say nothing, and are trusted as before)."""
    return not recorded or _sha256_or_empty(mask) == recorded


def check_foreign(outputs: Outputs, previous: Result | None) -> None:
    """Refuse, --overwrite or not, to replace an output file that holds something and that
    neither carries meshseg's signature nor is listed in the record beside it: a user's own
    scan, mask, picture or MNI mask under meshseg's name (--overwrite means "redo meshseg's
    outputs", never "delete what meshseg did not write"). A NIfTI file that does not load
    (0 bytes, truncated) holds nothing worth keeping.

    Raises:
        ForeignOutputError: naming the first such file.
    """
    listed = set() if previous is None else {record_path(p) for p in (
        previous.output, previous.prob, previous.picture, previous.mni)}
    for path, role in outputs.files():
        if (role == "record"  # check_plan's is_foreign_json
                or not path.is_file() or record_path(path) in listed or made_by_meshseg(path)
                or not _holds_data(path)):
            continue
        raise ForeignOutputError(f"{path}: exists and is not meshseg's (no meshseg signature, "
                                 f"no record {outputs.sidecar.name}); meshseg will not replace "
                                 f"this {role}, even with --overwrite: move it or choose -o")


def _holds_data(path: Path) -> bool:
    """A NIfTI file that loads completely, or any other non-empty file."""
    if not is_nifti_path(path):
        return path.stat().st_size > 0
    try:
        return load_volume(path) is not None
    except InputError:
        return False


def _write_record(result: Result, outputs: Outputs) -> None:
    """Write the sidecar last; a failed input's record is written only where its output
    folder exists (a record that cannot be written makes the input fail)."""
    sidecar = outputs.sidecar
    if result.status == "failed" and not sidecar.parent.is_dir():
        return
    try:
        write_sidecar(result, sidecar, outputs.reference)
    except OutputError as err:
        if result.status != "failed":
            result.status, result.error = "failed", str(err)


def run_cohort(paths: list[Path], plans: list[Outputs], model: LoadedModel, run: Runner,
               device: str, *, overwrite: bool, settings: Settings,
               report: Path | None, quiet: bool, checks: Checks | None = None
               ) -> list[Result]:
    """Segment every input in turn (with QC `checks`); the report is rewritten from the
    records after each input, so a kill keeps it."""
    console = Console(stderr=True)
    live = console.is_terminal and not quiet
    results: list[Result] = []
    with bars(console, live) as shown:
        cohort = shown.add_task("scans", total=len(paths))
        stage = shown.add_task("", total=100)

        for path, outputs in zip(paths, plans):
            shown.reset(stage, description=f"{path.name}: load", total=100)

            def on_stage(name: str, fraction: float, _path: Path = path) -> None:
                low, high = STAGES.get(name, (0.0, 1.0))
                shown.update(stage, description=f"{_path.name}: {name}",
                             completed=round(100 * (low + (high - low) * fraction)))

            result = segment_file(path, outputs, model, run, device, overwrite=overwrite,
                                  settings=settings, progress=on_stage, checks=checks)
            results.append(result)
            if report is not None:
                write_report(results, report)
            _emit(result, shown.console if live else None, quiet)
            shown.advance(cohort)
    if not quiet:
        _summary(results)
    return results


def _emit(result: Result, console: Console | None, quiet: bool) -> None:
    """One line per input: errors always (stderr), the rest (and warnings) unless quiet."""
    if result.status == "failed":
        click.echo(f"meshseg: error: {result.error}", err=True)
        return
    if quiet:
        return
    for warning in filter(None, result.warnings.split(WARNINGS_SEP)):
        click.echo(f"meshseg: warning: {warning}", err=True)
    if result.status == "skipped":
        line = (f"skipped {result.input}: {result.output} was made by the same model and "
                "settings (--overwrite to redo)")
    else:
        line = (f"ok {result.input} -> {result.output}: {result.lesion_ml:.2f} mL, "
                f"{result.components} lesion(s), {result.seconds:.1f} s{summary_line(result)}")
    if console is not None:
        console.print(line, markup=False, highlight=False)
    else:
        click.echo(line)


def _summary(results: list[Result]) -> None:
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    click.echo(f"{counts['ok']} segmented, {counts['skipped']} skipped, "
               f"{counts['failed']} failed", err=True)
