"""Ctrl-C (SIGINT) and SIGTERM keep what a long command finished: one path for every command.

    with interruptible("rows", save=lambda report: write(report)) as keep:
        report = evaluate(..., keep=keep)      # the application calls keep(snapshot) once, before its work

`snapshot()` returns (report, done, total, missing): the report of what has finished so far, how many of the run's
units (rows, images, levels) that is, and what is missing. On SIGINT or SIGTERM the work stops (SIGTERM raises the
same KeyboardInterrupt as Ctrl-C, so the application's own cleanup, e.g. stopping worker processes, runs once for
both), `save(partial_report(...))` writes the report marked `"partial": true` and returns where it went, one line

    scc: interrupted; N of M rows saved to PATH

goes to stderr, and the KeyboardInterrupt goes on to `scc.cli.main`, which exits 130. A second signal while the
report is written is ignored, so the write is never cut in half.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator

from .args import write_json

Snapshot = Callable[[], tuple[dict, int, int, list[str]]]


class Keep:
    """Where an application registers how to read what it has finished (`keep(snapshot)`)."""

    def __init__(self):
        self.snapshot: Snapshot | None = None

    def __call__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot


def partial_report(unit: str, report: dict, done: int, total: int, missing: list[str]) -> dict:
    """`report` marked as cut short: "partial": true, how much finished, and what is missing."""
    return {**report, "partial": True, "finished": {"done": done, "total": total, "unit": unit}, "missing": missing}


def interrupted_line(done: int, total: int | str, unit: str, places: list[str], unsaved: str) -> str:
    """The one line an interrupted command prints; `unsaved` says why, when nothing was written."""
    head = f"scc: interrupted; {done} of {total} {unit}"
    return f"{head} saved to {', '.join(places)}" if places else f"{head} finished, none saved ({unsaved})"


def write_json_to(report: dict, path: str | None) -> list[str]:
    """--json PATH|- (scc.cli.args.write_json); where the report went: [PATH], ["stdout"] or []."""
    write_json(report, path)
    return [] if path is None else ["stdout" if path == "-" else path]


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals(handler) -> Iterator[None]:
    """SIGINT and SIGTERM -> `handler` inside the block (only the main thread can set handlers; elsewhere the
    block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def interruptible(unit: str, save: Callable[[dict], list[str]], total: int | None = None,
                  unsaved: str = "no --json or --out given") -> Iterator[Keep]:
    """Run a long command's work inside; see the module docstring. `total`: the units of a whole run, for an
    interrupt that comes before the application registered its snapshot; `unsaved`: why nothing is written when
    `save` writes nothing."""
    keep = Keep()
    with _signals(_raise_interrupt):
        try:
            yield keep
        except KeyboardInterrupt:
            with _signals(signal.SIG_IGN):
                if keep.snapshot is None:
                    line = interrupted_line(0, "?" if total is None else total, unit, [],
                                            "stopped before the work began")
                else:
                    report, done, whole, missing = keep.snapshot()
                    places = save(partial_report(unit, report, done, whole, missing))
                    line = interrupted_line(done, whole, unit, places, unsaved)
                sys.stdout.flush()
                print(line, file=sys.stderr, flush=True)
            raise
