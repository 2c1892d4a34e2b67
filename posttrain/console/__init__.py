"""What a person sees while a recipe runs: one line per stage, library chatter in the stage's log.

While a stage runs, file descriptors 1 and 2 go to its `stage.log` (tqdm bars, trainer dicts and
warnings of transformers, trl, datasets and lm-eval land there), and the stage reports progress
through `StageContext.progress`; on a terminal that is one live line (step, loss, speed, ETA), in a
log file (CI) nothing until the stage's closing line. `posttrain run --verbose` leaves the streams
alone.

Experiment trackers are the other window onto a run: `trackers.py` names and labels the runs that
transformers' integrations start (`training.report_to`). Like the progress lines, nothing here
changes what a stage writes, so this package is plumbing that stage keys leave out
(`code_fingerprint.NEUTRAL`: neither hashed nor followed).
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from posttrain.console.trackers import TRACKING_FILE, tracker_callbacks  # noqa: F401 - the package's API
from typing import Any, Callable, Iterator


def headline_metric(metrics: dict[str, Any], names: tuple[str, ...]) -> str:
    """`name value` of the first of `names` (a kind's headline metrics, `Stage.headline_metrics`) that the
    stage's metrics hold as a number, or "" when none is there."""
    for key in names:
        if isinstance(metrics.get(key), (int, float)):
            return f"{key} {metrics[key]:.4g}"
    return ""


class Console:
    """The user's terminal (or log), kept open while the process streams are redirected."""

    def __init__(self, stream):
        self.stream = stream
        self.live = bool(getattr(stream, "isatty", lambda: False)())
        self._shown = False

    def line(self, text: str) -> None:
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def status(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self._shown = False


def progress_reporter(console: Console, prefix: str) -> Callable[[dict[str, Any]], None]:
    """ctx.progress for one stage: step/total, loss, tokens/s and ETA on one live line (at most 4/s)."""
    started, last = time.time(), [0.0]

    def report(info: dict[str, Any]) -> None:
        now = time.time()
        if now - last[0] < 0.25 and info.get("step") != info.get("total"):
            return
        last[0] = now
        step, total = info.get("step"), info.get("total")
        parts = [prefix]
        if step is not None and total:
            elapsed = now - started
            eta = elapsed / step * (total - step) if step else 0.0
            parts.append(f"step {step}/{total}  ETA {eta:.0f}s")
        for key in ("loss", "rows", "tokens"):
            if isinstance(info.get(key), (int, float)):
                parts.append(f"{key} {info[key]:.4g}")
        console.status("  ".join(parts))

    return report


@contextmanager
def streams_to(log_path: Path, quiet: bool) -> Iterator[Console]:
    """Send fds 1 and 2 to `log_path` while the block runs (when `quiet`); yield the real console."""
    if not quiet:
        yield Console(sys.stdout)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = Console(os.fdopen(os.dup(saved_out), "w", buffering=1))
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        log.close()
        console.clear()
        console.stream.close()
