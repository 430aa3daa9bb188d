"""Feedback on long steps: Rich progress bars on a terminal, plain lines otherwise.

`track` gives any loop (synth, train's batches, cv's phases) a bar with counts and an
estimated time left, or periodic log lines; `run_cohort` is predict's loop, with a bar per
scan whose stages (load, conform, layers, unconform, write) advance one timer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from meshseg.io import WARNINGS_SEP
from meshseg.models.catalog import LoadedModel
from meshseg.pipeline.infer import Runner
from meshseg.pipeline.predict import Outputs, Settings, segment_file
from meshseg.pipeline.record import Result, write_report
from meshseg.qc.checks import Checks, summary_line

T = TypeVar("T")
logger = logging.getLogger(__name__)
PLAIN_EVERY_S = 30.0  # off a terminal, one line at most this often (log files stay short)
# Share of one scan's time per stage, so a scan's bar moves evenly (measured on a CPU: the
# layers take most of it).
STAGES = {"load": (0.0, 0.05), "conform": (0.05, 0.15), "layers": (0.15, 0.9),
          "unconform": (0.9, 0.95), "write": (0.95, 1.0)}


def _bars(console: Console, live: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    # the pace over the last hour: Rich's default (30 s) shows no estimate for steps slower
    # than that, such as a scan on a CPU
    return Progress(*columns, console=console, disable=not live, transient=True,
                    speed_estimate_period=3600)


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Yield `items` while showing progress, when meshseg's log shows INFO (the commands set
    that up; -q and library use stay silent): a bar with counts and time left on a terminal;
    elsewhere (a job's log file) a log line 'description: i/total, elapsed, eta' at most
    every PLAIN_EVERY_S seconds, so short loops add nothing."""
    if not logger.isEnabledFor(logging.INFO):
        yield from items
        return
    console = Console(stderr=True)
    if console.is_terminal:
        with _bars(console, True) as bars:
            task = bars.add_task(description, total=total)
            for item in items:
                yield item
                bars.advance(task)
        return
    start = last = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= PLAIN_EVERY_S:
            last = now
            logger.info("%s", plain_line(description, done, total, now - start))


def plain_line(description: str, done: int, total: int, elapsed: float) -> str:
    """'synth: 3/10, 0:00:12 elapsed, eta 0:00:28' (the eta from the mean pace so far)."""
    eta = elapsed / done * (total - done) if done else 0.0
    return f"{description}: {done}/{total}, {_clock(elapsed)} elapsed, eta {_clock(eta)}"


def _clock(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def run_cohort(paths: list[Path], plans: list[Outputs], model: LoadedModel, run: Runner,
               device: str, *, overwrite: bool, settings: Settings,
               report: Path | None, quiet: bool, checks: Checks | None = None
               ) -> list[Result]:
    """Segment every input in turn (with QC `checks`); the report is rewritten from the
    records after each input, so a kill keeps it."""
    console = Console(stderr=True)
    live = console.is_terminal and not quiet
    results: list[Result] = []
    with _bars(console, live) as bars:
        cohort = bars.add_task("scans", total=len(paths))
        stage = bars.add_task("", total=100)

        for path, outputs in zip(paths, plans):
            bars.reset(stage, description=f"{path.name}: load", total=100)

            def on_stage(name: str, fraction: float, _path: Path = path) -> None:
                low, high = STAGES.get(name, (0.0, 1.0))
                bars.update(stage, description=f"{_path.name}: {name}",
                            completed=round(100 * (low + (high - low) * fraction)))

            result = segment_file(path, outputs, model, run, device, overwrite=overwrite,
                                  settings=settings, progress=on_stage, checks=checks)
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
