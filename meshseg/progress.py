"""Running a cohort with feedback: Rich progress bars on a terminal, plain lines otherwise."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meshseg.catalog import LoadedModel
from meshseg.cohort import write_report
from meshseg.infer import Runner
from meshseg.io import WARNINGS_SEP
from meshseg.predict import Outputs, Result, segment_file


def run_cohort(paths: list[Path], plans: list[Outputs], model: LoadedModel, run: Runner,
               device: str, *, overwrite: bool, postprocess: str | None,
               threshold: float = 0.5, report: Path | None, quiet: bool) -> list[Result]:
    """Segment every input in turn; the report is rewritten after each so a kill keeps it."""
    console = Console(stderr=True)
    live = console.is_terminal and not quiet
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    results: list[Result] = []
    with Progress(*columns, console=console, disable=not live, transient=True) as bars:
        cohort = bars.add_task("scans", total=len(paths))
        stage = bars.add_task("", total=100)

        for path, outputs in zip(paths, plans):
            def on_stage(name: str, fraction: float, _path: Path = path) -> None:
                bars.update(stage, description=f"{_path.name}: {name}",
                            completed=round(100 * fraction))

            result = segment_file(path, outputs, model, run, device, overwrite=overwrite,
                                  postprocess=postprocess, threshold=threshold,
                                  progress=on_stage)
            results.append(result)
            if report is not None:
                write_report(results, report)
            _emit(result, bars.console if live else None, quiet)
            bars.advance(cohort)
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
        line = f"skipped {result.input}: {result.output} exists (--overwrite to redo)"
    else:
        line = (f"ok {result.input} -> {result.output}: {result.lesion_ml:.2f} mL, "
                f"{result.components} lesion(s), {result.seconds:.1f} s")
    if console is not None:
        console.print(line, markup=False, highlight=False)
    else:
        click.echo(line)


def _summary(results: list[Result]) -> None:
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    click.echo(f"{counts['ok']} segmented, {counts['skipped']} skipped, "
               f"{counts['failed']} failed", err=True)
