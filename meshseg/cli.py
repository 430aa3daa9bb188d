"""The ``meshseg`` command: parse options, call the library, render results, set the exit code.

Exit status: 0 every input succeeded (or was already done), 1 an input, the model
or an output failed, 2 a usage error (bad option, nothing to do, device not available),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM, as SLURM and Kubernetes send before a kill).
Heavy imports (torch) happen inside commands so that ``--help`` is instant.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from meshseg import __version__
from meshseg.errors import DeviceError, InputError, MeshsegError, OutputError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130  # 128 + SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
# What a rerun after Ctrl-C does, per command; finished outputs are always kept.
RESUME_HINTS = {"train": "continue with `meshseg train --resume RUN_DIR` (last saved epoch)",
                "predict": "rerun the same command to resume (finished outputs are kept)",
                "cv": "rerun the same command to resume (finished units are kept)",
                "tune": "rerun the same command to add trials (finished trials are kept)"}


def fail(message: str, code: int = EXIT_FAILED) -> None:
    """Print one error line (no traceback) and exit."""
    click.echo(f"meshseg: error: {message}", err=True)
    sys.exit(code)


class Terminated(BaseException):
    """SIGTERM, raised where the program is (as Ctrl-C raises KeyboardInterrupt), so the
    same unwinding keeps finished outputs and removes half-written ones; a BaseException so
    that no `except Exception` mistakes it for an input's failure."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


class _Group(click.Group):
    """The command group, turning Ctrl-C and SIGTERM into one line saying how to resume and
    exit status 130 or 143 (click's own handling prints "Aborted!" and exits 1; Python's
    default for SIGTERM is to die at once, with no line)."""

    def invoke(self, ctx: click.Context):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
        try:
            return super().invoke(ctx)
        except (KeyboardInterrupt, Terminated) as stop:
            hint = RESUME_HINTS.get(ctx.invoked_subcommand or "", "nothing was left half-written")
            what = "terminated" if isinstance(stop, Terminated) else "interrupted"
            click.echo(f"\nmeshseg: {what}; {hint}", err=True)
            sys.exit(EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshseg")
def main() -> None:
    """Chronic stroke lesion segmentation on T2-weighted MRI with MeshNet."""


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output file (one input, .nii/.nii.gz) or folder. "
                   "Default: <name>_lesion.nii.gz beside each input.")
@click.option("-m", "--model", "model_spec", metavar="MODEL",
              help="Model name (see `meshseg models list`), a .safetensors checkpoint, "
                   "or a brainchop model.json. Default: the bundled model.")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N. auto picks CUDA when present.")
@click.option("--prob", is_flag=True, help="Also write the lesion probability map (float32).")
@click.option("--overwrite", is_flag=True, help="Redo inputs whose outputs already exist.")
@click.option("--report", type=click.Path(path_type=Path, dir_okay=False),
              help="Write a per-input report (.json, .csv, or .html: a cohort page with QC "
                   "pictures, sortable columns).")
@click.option("--qc/--no-qc", default=True, show_default=True,
              help="QC after inference: register to MNI152 for QC flags (contrast, lesion "
                   "size, edge, fragments, confidence, registration) and lesion location "
                   "(side, arterial territories), and write <name>_lesion_qc.png.")
@click.option("--mni", is_flag=True,
              help="Also write the mask on the MNI grid (<name>_lesion_mni.nii.gz; needs --qc).")
@click.option("--strict-contrast", is_flag=True,
              help="Fail an input (exit 1, no mask) that does not look T2-weighted, instead "
                   "of warning.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.5, show_default=True,
              help="Lesion probability above which a voxel is lesion (0.5 is the argmax of "
                   "the two classes, as the models were trained and measured).")
@click.option("--largest/--all-lesions", "largest", default=None,
              help="Keep only the largest connected lesion, or all. Default: the model's "
                   "own choice (brainchop models keep the largest).")
@click.option("--backend", type=click.Choice(["torch", "openvino", "onnx"]), default=None,
              help="torch (layer by layer, least memory), openvino (OpenVINO on the CPU, "
                   "whole volume at once; the openvino extra) or onnx (onnxruntime). "
                   "Default: onnx for an .onnx model, else torch.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              show_default=True,
              help="Arithmetic of the torch backend: bf16 halves activation memory and may be "
                   "faster or slower than fp32 depending on the CPU (docs/benchmarks.md gives "
                   "speeds and agreement with fp32); fp16 needs CUDA.")
@click.option("--slab", type=click.IntRange(min=1), default=None,
              help="Slab thickness in voxels for layer-by-layer inference (bounds memory).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for inference and QC (e.g. $SLURM_CPUS_PER_TASK on a shared "
                   "node). Default: PyTorch's choice, one per core.")
@click.option("--shard", metavar="K/N", callback=lambda ctx, param, value: _shard(value),
              help="Segment only part K of N of the sorted inputs (every N-th from the K-th), "
                   "e.g. $SLURM_ARRAY_TASK_ID/N: N tasks cover the cohort exactly once.")
@click.option("--participant-label", "participants", multiple=True, metavar="LABEL",
              help="BIDS: segment only this participant (01 or sub-01); repeat for more.")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
def predict(inputs: tuple[str, ...], output: Path | None, model_spec: str | None, device: str,
            prob: bool, overwrite: bool, report: Path | None, threshold: float,
            largest: bool | None, backend: str | None, precision: str, slab: int | None,
            threads: int | None, shard: tuple[int, int] | None, quiet: bool, qc: bool, mni: bool,
            strict_contrast: bool, participants: tuple[str, ...]) -> None:
    """Segment lesions in each INPUT (NIfTI files, folders or globs).

    Each mask gets a JSON record beside it (model, settings, versions, results); a rerun
    keeps the masks its records show were made the same way and redoes the rest.
    """
    from meshseg.models import catalog
    from meshseg.pipeline import cohort
    from meshseg.pipeline.infer import resolve_device, set_threads
    from meshseg.pipeline.predict import Settings, default_backend, run_cohort, runner
    from meshseg.pipeline.record import REPORT_SUFFIXES
    from meshseg.qc.checks import Checks

    if report is not None and report.suffix.lower() not in REPORT_SUFFIXES:
        raise click.BadParameter("must end in .json, .csv or .html", param_hint="--report")
    if (mni or strict_contrast) and not qc:
        raise click.BadParameter("needs --qc", param_hint="--mni/--strict-contrast")
    inputs_found = cohort.expand_inputs(list(inputs))
    if not quiet:
        for line in (line for item in inputs for line in cohort.bids_skipped(Path(item))):
            click.echo(f"meshseg: note: {line}", err=True)
    if not inputs_found:
        fail("no NIfTI files found in " + ", ".join(inputs), EXIT_USAGE)
    if participants:
        try:
            inputs_found = cohort.select_participants(inputs_found, participants)
        except InputError as err:
            fail(str(err), EXIT_USAGE)
    bids = cohort.uses_bids(inputs_found, output)
    set_threads(threads)
    try:
        torch_device = resolve_device(device)
        plans = cohort.plan_outputs(inputs_found, output, prob, picture=qc, mni=mni)
        cohort.check_plan(inputs_found, plans, report, output, bids)
    except (DeviceError, OutputError) as err:
        fail(str(err), EXIT_USAGE)
    if shard is not None:
        mine = set(cohort.shard(inputs_found, *shard))
        plans = [p for entry, p in zip(inputs_found, plans) if entry in mine]
        inputs_found = [entry for entry in inputs_found if entry in mine]
    cohort.remove_leftovers(plans, report)
    try:
        model = catalog.load(model_spec)
        backend = backend or default_backend(model, torch_device)
        run = runner(model, torch_device, backend, slab, precision)
    except DeviceError as err:
        fail(str(err), EXIT_USAGE)
    except MeshsegError as err:
        fail(str(err))
    settings = Settings(postprocess=None if largest is None else
                        ("largest" if largest else "none"), threshold=threshold,
                        backend=backend, precision=precision)
    try:
        results = run_cohort([entry.path for entry in inputs_found], plans, model, run,
                             str(torch_device), overwrite=overwrite, settings=settings,
                             report=report, quiet=quiet,
                             checks=Checks(strict_contrast) if qc else None)
        if bids and any(r.status != "failed" for r in results):  # a dataset with masks in it
            cohort.write_description(output, model.name, model.sha256)
    except MeshsegError as err:
        fail(str(err))
    sys.exit(EXIT_FAILED if any(r.status == "failed" for r in results) else EXIT_OK)


def _shard(value: str | None) -> tuple[int, int] | None:
    """K/N with 1 <= K <= N, for --shard."""
    if value is None:
        return None
    k, _, n = value.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise click.BadParameter(f"{value}: expected K/N with 1 <= K <= N, e.g. 2/8",
                                 param_hint="--shard")
    return int(k), int(n)


@main.command("report")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report as .json, .csv or .html (else a table is printed).")
def report_command(folder: Path, output: Path | None) -> None:
    """Rebuild a cohort report from the records (sidecar JSON) below FOLDER, e.g. after a
    run split over many processes with predict --shard."""
    from rich.console import Console
    from rich.table import Table

    from meshseg.pipeline.record import REPORT_SUFFIXES, gather, write_report

    if output is not None and output.suffix.lower() not in REPORT_SUFFIXES:
        raise click.BadParameter("must end in .json, .csv or .html", param_hint="-o")
    results = gather(folder)
    if not results:
        fail(f"{folder}: no meshseg records (the JSON files beside masks) found", EXIT_USAGE)
    if output is not None:
        try:
            write_report(results, output)
        except MeshsegError as err:
            fail(str(err))
        click.echo(f"{output}: {len(results)} inputs")
        return
    table = Table()
    for column in ("input", "status", "lesion mL", "lesions", "side", "flags", "model", "error"):
        table.add_column(column, overflow="fold")  # whole paths: the input names the subject
    for r in results:
        table.add_row(r.input, r.status, "" if r.lesion_ml is None else f"{r.lesion_ml:.2f}",
                      "" if r.components is None else str(r.components),
                      r.location.get("side", ""), ", ".join(f["name"] for f in r.flags),
                      r.model, r.error)
    Console().print(table)


@main.group()
def models() -> None:
    """List and download models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models_list(as_json: bool) -> None:
    """Show every known model, where it comes from and whether it is available offline."""
    import json
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from meshseg.models import catalog

    rows = []
    for entry in catalog.entries():
        row = asdict(entry)
        row["local"] = entry.is_local()
        row["folder"] = str(entry.folder)
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    # the name is what -m needs: never cut; the rest wraps to fit 80 columns
    table = Table(caption="* the default model; --json gives every file's address and sha256")
    table.add_column("name", no_wrap=True, min_width=max(len(r["name"]) + 2 for r in rows))
    for column in ("network", "params", "source", "sha256", "local"):
        table.add_column(column)
    for row in rows:
        sha = row["files"][row["entry_file"]]
        table.add_row(row["name"] + (" *" if row["default"] else ""), row["architecture"],
                      f"{row['parameters']:,}",
                      "bundled" if row["source"] == "bundled" else "download", sha[:8],
                      "yes" if row["local"] else "no")
    Console().print(table)


@models.command("pull")
@click.argument("name")
@click.option("--from", "mirror", metavar="URL",
              help="Download from this base address instead (a mirror, or file:///folder/).")
def models_pull(name: str, mirror: str | None) -> None:
    """Download model NAME into the cache ($MESHSEG_HOME) and verify its sha256."""
    from meshseg.models import catalog

    try:
        folder = catalog.pull(name, mirror)
    except MeshsegError as err:
        fail(str(err))
    click.echo(f"{name}: verified in {folder}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def arch(as_json: bool) -> None:
    """List the benchmark networks with their parameter counts (in=1, out=2, 256^3).

    Train one with `meshseg train --architecture NAME` (MeshNet-N: --architecture meshnet
    --channels N); see docs/architectures.md.
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from meshseg import archs

    try:
        rows = archs.info()
    except MeshsegError as err:
        fail(str(err))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "parameters", "paper", "source")
    for row in rows:
        paper = archs.PAPER_PARAMETERS[row["name"]]
        counted = "not installed" if row["parameters"] is None else f"{row['parameters']:,}"
        table.add_row(row["name"], counted,
                      "same" if paper == row["parameters"] else f"{paper:,}", row["source"])
    Console().print(table)
    if any(row["unavailable"] for row in rows):
        click.echo(f"meshseg: note: some networks need MONAI: {archs.INSTALL_HINT}", err=True)


def _config_options(config_cls: type, skip: tuple[str, ...]):
    """Click options generated from a config dataclass, so flags and settings never drift.

    Every option defaults to None (unset): the dataclass keeps the one true default.
    """
    import dataclasses
    import types
    import typing

    from meshseg.training.config import flag as config_flag

    hints = typing.get_type_hints(config_cls)

    def decorate(command):
        for spec in reversed(dataclasses.fields(config_cls)):
            if spec.name in skip:
                continue
            kind = hints[spec.name]
            optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
            base = next(a for a in typing.get_args(kind) if a is not type(None)) if optional \
                else kind
            flag = config_flag(spec.name)
            shown = spec.metadata["help"] + (f" [default: {spec.default}]"
                                             if spec.default is not None else "")
            if base is bool:
                option = click.option(f"{flag}/--no-{flag[2:]}", spec.name, default=None,
                                      help=shown)
            elif typing.get_origin(base) is tuple:
                option = click.option(flag, spec.name, nargs=len(typing.get_args(base)),
                                      type=typing.get_args(base)[0], default=None, help=shown)
            else:
                option = click.option(flag, spec.name, type=base, default=None, help=shown)
            command = option(command)
        return command

    return decorate


def _train_config_options(command):
    from meshseg.training.config import TrainConfig

    return _config_options(TrainConfig, skip=("data", "out"))(command)


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Start from the settings in this config.toml (a run's, or tune's "
                   "best.toml); flags given here override them.")
@click.option("--data", type=click.Path(path_type=Path),
              help="Training pairs: a .csv manifest (image,mask[,subject,acq]) or a BIDS folder.")
@click.option("--out", type=click.Path(path_type=Path), help="Run folder to create.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Continue the run in this folder from its last finished epoch "
                   "(--device, --num-workers, --cache and --threads may change).")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
@_train_config_options
def train(config_file: Path | None, data: Path | None, out: Path | None,
          resume_dir: Path | None, quiet: bool, **settings) -> None:
    """Train MeshNet, or a baseline (--architecture, see `meshseg arch`), with the paper's
    recipe (every setting is a flag; see docs/training.md)."""
    from meshseg.training.train import BEST_FILE, CONFIG_FILE, fit, resume

    _log_to_console(quiet)
    given = {k: v for k, v in settings.items() if v is not None}
    try:
        if resume_dir is not None:
            from meshseg.training.config import MACHINE_FIELDS, flag

            machine = {k: v for k, v in given.items() if k in MACHINE_FIELDS}
            if data or out or config_file or len(machine) < len(given):
                allowed = ", ".join(flag(k) for k in MACHINE_FIELDS)
                raise click.UsageError(f"--resume takes only {allowed} (the other settings "
                                       f"are in {resume_dir / CONFIG_FILE})")
            run_dir = resume(resume_dir, machine=machine)
        else:
            run_dir = fit(_train_config(config_file, data, out, given))
    except DeviceError as err:
        fail(str(err), EXIT_USAGE)
    except MeshsegError as err:
        fail(str(err))
    click.echo(f"{run_dir}: best model in {run_dir / BEST_FILE}")


def _train_config(config_file: Path | None, data: Path | None, out: Path | None,
                  given: dict):
    """The TrainConfig of `meshseg train`: the file's settings, then the flags over them.

    Raises:
        click.UsageError: no data or out from either; InputError: a bad file.
    """
    from meshseg.training.config import TrainConfig, read_settings

    values = read_settings(config_file) if config_file is not None else {}
    values.update(given, **{k: v for k, v in (("data", data), ("out", out)) if v is not None})
    if "data" not in values or "out" not in values:
        raise click.UsageError("give --data and --out (or --resume RUN_DIR)")
    return TrainConfig.from_dict(values)


def _log_to_console(quiet: bool) -> None:
    """Show the library's log lines (warnings only with -q) through Rich on stderr."""
    import logging

    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_path=False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(message)s", handlers=[handler], force=True)


def _tune_default(name: str):
    """A `meshseg.training.tune.TuneSettings` default, so the flags show the library's one value."""
    import dataclasses

    from meshseg.training.tune import TuneSettings

    return next(f.default for f in dataclasses.fields(TuneSettings) if f.name == name)


def _tune_fixed_options(command):
    from meshseg.training.config import TrainConfig
    from meshseg.training.tune import NOT_FIXED

    return _config_options(TrainConfig, skip=NOT_FIXED)(command)


@main.command()
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="The whole dataset (.csv manifest or BIDS folder); trials train on the inner "
                   "folds of its first outer fold.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for study.db, splits.json, trials.csv, best.toml and the trials' "
                   "run folders.")
@click.option("--study", "study_name", default=_tune_default("study"), show_default=True,
              help="Study name: processes with the same name and storage share one study.")
@click.option("--storage", metavar="URL",
              help="SQLAlchemy database URL, e.g. postgresql://user:pass@host/db, to tune from "
                   "many machines. Default: sqlite:///OUT/study.db.")
@click.option("--trials", type=click.IntRange(min=1), default=_tune_default("trials"),
              show_default=True, help="Trials this process runs (added to the study's).")
@click.option("--seed", type=click.IntRange(min=0), default=_tune_default("seed"),
              show_default=True, help="Seed of the splits and of every trial's training.")
@click.option("--splits", type=click.Path(dir_okay=False, path_type=Path),
              help="Use this splits file (meshseg cv writes one) instead of making the splits "
                   "from --seed.")
@click.option("--min-epochs", type=click.IntRange(min=1), default=_tune_default("min_epochs"),
              show_default=True,
              help="First successive-halving rung: epochs of inner fold 1 before any pruning.")
@click.option("--max-epochs", type=click.IntRange(min=1), default=_tune_default("max_epochs"),
              show_default=True, help="Epochs each inner fold trains unless pruned.")
@click.option("--reduction-factor", type=click.IntRange(min=2),
              default=_tune_default("reduction_factor"), show_default=True,
              help="Successive halving keeps the best 1/N at rungs min-epochs x N^k.")
@click.option("--sampler", type=click.Choice(["tpe", "random"]),
              default=_tune_default("sampler"), show_default=True,
              help="tpe (Optuna's default, Bayesian) or random (as the paper's ASHA).")
@click.option("--sampler-seed", type=int,
              help="Seed the sampler: repeatable one-process studies (processes sharing a "
                   "seed propose the same settings).")
@click.option("-q", "--quiet", is_flag=True, help="Print errors and the result only.")
@_tune_fixed_options
def tune(data: Path, out: Path, study_name: str, storage: str | None, trials: int, seed: int,
         splits: Path | None, min_epochs: int, max_epochs: int, reduction_factor: int,
         sampler: str, sampler_seed: int | None, quiet: bool, **fixed) -> None:
    """Search MeshNet's hyper-parameters as the paper did (see docs/tuning.md).

    Channels, learning rate, weight decay, background weight and warm-up are searched; the
    other training settings are flags fixed for every trial. Rerun to add trials.
    """
    from meshseg.training.tune import TuneSettings
    from meshseg.training.tune import tune as run_study

    _log_to_console(quiet)
    settings = TuneSettings(data=data, out=out, study=study_name, storage=storage,
                            trials=trials, seed=seed, splits=splits, min_epochs=min_epochs,
                            max_epochs=max_epochs, reduction_factor=reduction_factor,
                            sampler=sampler, sampler_seed=sampler_seed,
                            fixed={k: v for k, v in fixed.items() if v is not None})
    try:
        result = run_study(settings)
    except DeviceError as err:
        fail(str(err), EXIT_USAGE)
    except MeshsegError as err:
        fail(str(err))
    counts = ", ".join(f"{n} {state}" for state, n in sorted(result.states.items()))
    click.echo(f"study {result.study}: {counts}")
    if result.best_settings is None:
        click.echo("no trial has finished all its inner folds yet")
    else:
        click.echo(f"best trial {result.best_number}: mean inner-fold validation Dice "
                   f"{result.best_value:.4f}; train with its settings:\n"
                   f"  meshseg train --config {result.best_file} --data DATA --out RUN")
    click.echo(f"every trial in {result.trials_file}")


@main.group()
def export() -> None:
    """Export a model to another format."""


@export.command("onnx")
@click.argument("model_spec", metavar="MODEL")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .onnx file to write.")
def export_onnx_command(model_spec: str, output: Path) -> None:
    """Write MODEL (name, .safetensors or model.json) as ONNX with dynamic D, H, W axes.

    The export is checked against the PyTorch network on a small random volume.
    """
    from meshseg.models import catalog
    from meshseg.models.export import export_onnx, verify_onnx

    try:
        model = catalog.load(model_spec)
        if model.network is not None:
            raise click.UsageError(f"{model_spec}: ONNX export is for MeshNet models only, "
                                   f"not {model.architecture}")
        if not model.layers:
            raise click.UsageError(f"{model_spec} is already an ONNX model")
        export_onnx(model.layers, output, name=model.name)
        error = verify_onnx(model.layers, output)
    except MeshsegError as err:
        fail(str(err))
    click.echo(f"{output}: {model.architecture}, {model.parameters:,} parameters; "
               f"max |onnxruntime - torch| = {error:.1e} on a random volume")


@export.command("safetensors")
@click.argument("model_json", metavar="MODEL_JSON", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .safetensors checkpoint to write.")
def export_safetensors_command(model_json: Path, output: Path) -> None:
    """Convert a brainchop TF.js MeshNet (model.json + .bin) to a meshseg checkpoint.

    The checkpoint predicts as the original does (brainchop's crop to the voxels > 0, largest
    lesion kept) and records the sha256 of the files it came from.
    """
    from meshseg.models.tfjs import save_as_checkpoint

    try:
        model = save_as_checkpoint(model_json, output)
    except MeshsegError as err:
        fail(str(err))
    click.echo(f"{output}: MeshNet-{model.channels} ({model.activation.upper()}) from "
               f"{model.source}")


@main.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("-n", "count", default=20, show_default=True, help="Number of scans.")
@click.option("--seed", default=0, show_default=True, help="Seed of the first scan.")
@click.option("--min-ml", default=None, type=float, help="Smallest lesion (mL).")
@click.option("--max-ml", default=None, type=float, help="Largest lesion (mL).")
@click.option("--no-lesion", is_flag=True, help="Healthy heads (empty masks).")
@click.option("--conformed-grid", is_flag=True,
              help="1 mm axial grids instead of random scanner grids.")
@click.option("--lesions", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of binary lesion masks in MNI space (e.g. a lesion atlas): draw "
                   "real lesion shapes, sizes and places from it instead of made-up ones.")
@click.option("--skull-stripped", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of the heads that are brain-extracted (zero outside the brain).")
@click.option("--label-maps", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of whole-head anatomical label maps (aseg numbering, e.g. "
                   "SynthSeg's 20): draw each head from one of them (SynthSeg-style) instead "
                   "of the MNI152 template; needs --lesions unless --no-lesion.")
@click.option("--contrast", type=click.Choice(["any", "t2", "flair", "t1"]), default="any",
              show_default=True,
              help="With --label-maps: the look of the heads (any: a random look per head).")
@click.option("-j", "--jobs", default=1, show_default=True, help="Worker processes.")
def synth(folder: Path, count: int, seed: int, min_ml: float | None, max_ml: float | None,
          no_lesion: bool, conformed_grid: bool, lesions: Path | None, skull_stripped: float,
          label_maps: Path | None, contrast: str, jobs: int) -> None:
    """Write synthetic heads with chronic stroke lesions, their masks and a manifest.csv.

    Without --label-maps the heads are T2-weighted, drawn from nilearn's MNI152 tissue maps;
    with it they come from real label maps in any contrast, the painted lesion being the
    truth. The manifest feeds `meshseg train --data FOLDER/manifest.csv`.
    """
    from meshseg.metrics import ARC_QUARTILES_ML

    _log_to_console(quiet=False)
    limits = (min_ml or ARC_QUARTILES_ML[0], max_ml or ARC_QUARTILES_ML[-1])
    if not 0 < limits[0] < limits[1]:
        raise click.BadParameter("need 0 < --min-ml < --max-ml")
    try:
        if label_maps is not None:
            manifest = _synth_from_label_maps(folder, label_maps, count, seed, limits,
                                              lesions, no_lesion, contrast, skull_stripped,
                                              jobs, conformed_grid)
        else:
            from meshseg.training.synth import SynthOptions, make_dataset

            options = SynthOptions(lesion=not no_lesion, lesion_ml=limits,
                                   native_grid=not conformed_grid, lesions=lesions,
                                   skull_stripped=skull_stripped)
            manifest = make_dataset(folder, count, seed, options, jobs=jobs)
    except MeshsegError as err:
        fail(str(err))
    click.echo(f"{manifest}: {count} synthetic scans")


def _synth_from_label_maps(folder: Path, maps: Path, count: int, seed: int,
                           limits: tuple[float, float], lesions: Path | None,
                           no_lesion: bool, contrast: str, skull_stripped: float, jobs: int,
                           conformed_grid: bool) -> Path:
    """`meshseg synth --label-maps`: checks the options that only the template generator
    has, then writes the label-map heads."""
    from meshseg.training.labelmaps import LabelMapOptions, make_label_dataset

    if conformed_grid:
        raise click.UsageError("--conformed-grid belongs to the template generator; "
                               "label-map heads are always on the maps' grid")
    if lesions is None and not no_lesion:
        raise click.UsageError("--label-maps needs --lesions FOLDER (MNI lesion masks, e.g. "
                               "a lesion atlas) or --no-lesion")
    return make_label_dataset(folder, maps, count, seed,
                              LabelMapOptions(lesions=None if no_lesion else lesions,
                                              contrast=contrast, lesion_ml=limits,
                                              skull_stripped=skull_stripped), jobs=jobs)


@main.command("eval")
@click.argument("pred", type=click.Path(path_type=Path))
@click.argument("truth", type=click.Path(path_type=Path))
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write one row per subject.")
@click.option("--resample", is_flag=True,
              help="Compare masks on different grids (prediction resampled to the truth).")
@click.option("--truth-glob", default="*", show_default=True,
              help="Only files matching this in a TRUTH folder (e.g. '*_lesion.nii.gz' when "
                   "scans sit beside their masks).")
@click.option("--figure", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG box plot of DICE, overall and per lesion-volume bin.")
def evaluate_command(pred: Path, truth: Path, csv_path: Path | None, resample: bool,
                     truth_glob: str, figure: Path | None) -> None:
    """Score predicted masks PRED against reference masks TRUTH (files or folders).

    Voxels above 0.5 are lesion (a mask with other values than 0 and 1 gets a warning). Pairs
    that cannot be read are listed and the others scored; the exit status is then 1.

    Per subject: DICE, AVD, MCC, HD95, both volumes and lesion-wise detection; then mean
    (std) and median [IQR], over all subjects and per true lesion volume quartile (Q1-Q4).
    """
    from rich.console import Console

    from meshseg.benchmark import evaluate

    def warn(message: str) -> None:
        click.echo(f"meshseg: warning: {message}", err=True)

    try:
        truths = evaluate.mask_files(truth, truth_glob)
        try:
            pairs, unmatched = evaluate.match(evaluate.mask_files(pred), truths,
                                              two_files=pred.is_file() and truth.is_file())
        except InputError as err:
            if truth_glob != "*" or not truth.is_dir():
                raise
            raise InputError(f"{err} (when scans sit beside their masks, as `meshseg synth` "
                             "writes them, pick the masks with --truth-glob "
                             "'*_lesion.nii.gz')") from err
        for path in unmatched:
            warn(f"{path}: no matching mask on the other side")
        if not pairs:
            fail("no pairs of masks to compare", EXIT_USAGE)
        scores, errors = evaluate.score_all(pairs, resample, warn)
        for error in errors:
            click.echo(f"meshseg: error: {error}", err=True)
        if not scores:
            fail(f"none of the {len(pairs)} pairs could be scored")
        if csv_path is not None:
            evaluate.write_scores(scores, csv_path)
        if figure is not None:
            from meshseg.benchmark.figures import box_plot

            groups = {"all": scores, **evaluate.by_volume_bin(scores)}
            box_plot({f"{name}\n(n={len(group)})": [s.dice for s in group]
                      for name, group in groups.items()}, figure, rank=False,
                     title="DICE by true lesion volume")
    except MeshsegError as err:
        fail(str(err))
    console = Console()
    console.print(evaluate.scores_table(scores))
    console.print(evaluate.summary_table(scores))
    if errors:
        fail(f"{len(errors)} of {len(pairs)} pairs could not be scored (listed above)")


CV_OWN_SETTINGS = ("data", "out", "val_data", "val_fraction", "architecture", "channels",
                   "restarts", "seed")


def _cv_train_options(command):
    from meshseg.training.config import TrainConfig

    return _config_options(TrainConfig, skip=CV_OWN_SETTINGS)(command)


@main.command("cv")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="The whole dataset: a .csv manifest (image,mask[,subject,acq]) or a BIDS "
                   "folder.")
@click.option("--out", "results", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Results folder; rerun with the same options to continue.")
@click.option("--architecture", "models", multiple=True, required=True, metavar="NAME",
              help="A network to compare (repeat): a name `meshseg arch` lists, e.g. "
                   "resunet, or meshnet-N for MeshNet with N channels.")
@click.option("--splits", "splits_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Use this splits file (e.g. another results folder's splits.json) instead "
                   "of making the splits from --seed.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the splits; restart r of every unit trains with seed + r.")
@click.option("--restarts", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trainings per inner fold; the best validation Dice is selected.")
@click.option("--outer", type=click.IntRange(min=2), default=3, show_default=True,
              help="Outer folds (train / hold-out test), as in the paper.")
@click.option("--inner", type=click.IntRange(min=2), default=3, show_default=True,
              help="Inner folds (train / validation) inside each outer training set.")
@click.option("--reference", help="Model the others are tested against. Default: meshnet-26 "
                                  "when compared, else the first --architecture.")
@click.option("--only", multiple=True, metavar="KEY=VALUE[,...]",
              help="Train only the units matching all these keys (model, outer, inner, "
                   "restart, index); repeat to add units. No report is made: rerun without "
                   "--only once every unit is trained.")
@click.option("--list", "list_units", is_flag=True,
              help="Write the splits, print every unit with its index and status, and exit.")
@click.option("-q", "--quiet", is_flag=True, help="Print errors and the result only.")
@_cv_train_options
def cv_command(data: Path, results: Path, models: tuple[str, ...], splits_file: Path | None,
               seed: int, restarts: int, outer: int, inner: int, reference: str | None,
               only: tuple[str, ...], list_units: bool, quiet: bool, **train_settings) -> None:
    """Nested cross-validation of each --architecture: the paper's Table 1 on DATA.

    Trains every unit (model, outer fold, inner fold, restart) with `meshseg train`, picks
    each outer fold's best inner run by validation Dice, segments the hold-out scans, scores
    them and writes RESULTS/summary.md, summary.csv and figures/ (see docs/reproduce.md).
    """
    from meshseg.benchmark import cv, cv_units

    _log_to_console(quiet)
    settings = cv_units.CvSettings(data=data, out=results, models=tuple(dict.fromkeys(models)),
                             splits=splits_file, seed=seed, restarts=restarts, outer=outer,
                             inner=inner, reference=reference,
                             train={k: v for k, v in train_settings.items() if v is not None})
    try:
        selectors = [cv_units.parse_selector(text) for text in only]
        if list_units:
            cv_units.prepare(settings)  # RESULTS/splits.json, which parallel tasks then share
            epochs = cv_units.epochs(settings)
            for unit in cv_units.units(settings):
                click.echo(f"{unit.index}\t{unit.label()}\t"
                           f"{cv_units.status(unit, results, epochs)}")
            return
        rows = cv.run(settings, selectors)
    except DeviceError as err:
        fail(str(err), EXIT_USAGE)
    except MeshsegError as err:
        fail(str(err))
    if rows is None:
        click.echo(f"{results}: selected units trained; rerun without --only for the report")
    else:
        click.echo((results / cv.SUMMARY_MD).read_text(encoding="utf-8"), nl=False)


@main.command()
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path),
                default="example_t2.nii.gz")
@click.option("--mask", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the true lesion mask here.")
@click.option("--seed", default=0, show_default=True, help="Random seed of the synthetic head.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT or the --mask file if it exists.")
def example(output: Path, mask: Path | None, seed: int, overwrite: bool) -> None:
    """Write a synthetic T2-weighted head with a chronic stroke lesion (for trying predict).

    Refuses (exit 2) to replace an existing file unless --overwrite: the name may be a scan.
    """
    from meshseg.training.synth import write_pair

    for path in (output, mask):
        if path is not None and not overwrite and (path.exists() or path.is_symlink()):
            fail(f"{path}: exists; meshseg example does not replace files (--overwrite does)",
                 EXIT_USAGE)
    try:
        volume_ml = write_pair(seed, output, mask)
    except MeshsegError as err:
        fail(str(err))
    click.echo(f"{output}: synthetic T2 head, seed {seed}, true lesion {volume_ml:.1f} mL")


if __name__ == "__main__":
    main()
