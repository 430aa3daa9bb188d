"""Feedback on long steps: Rich progress bars on a terminal, plain lines otherwise.

`track` gives any loop (synth, train's batches, cv's phases) a bar with counts and an
estimated time left, or periodic log lines; `bars` is the same display for loops that drive
their own bars (predict's, in `pipeline.predict.run_cohort`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
logger = logging.getLogger(__name__)
PLAIN_EVERY_S = 30.0  # off a terminal, one line at most this often (log files stay short)


def bars(console: Console, live: bool) -> Progress:
    """Bars with counts, time elapsed and time left on `console`; hidden unless `live`."""
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
        with bars(console, True) as shown:
            task = shown.add_task(description, total=total)
            for item in items:
                yield item
                shown.advance(task)
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
