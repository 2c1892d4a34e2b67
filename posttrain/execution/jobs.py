"""What a job is, whatever carries it: the command that builds one stage, and how its end is read."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# `posttrain run` ends a stage it was told to stop (SIGINT/SIGTERM) with 130 and keeps its work; a
# shell reports a process killed by signal N as 128 + N, Popen as -N.
INTERRUPTED_CODES = {130, 128 + 9, 128 + 15}
USER_ERROR_CODE = 2


@dataclass
class JobSpec:
    """One stage to build: the command a job runs, where its console output goes, its resources."""

    stage: str
    kind: str
    key: str
    argv: list[str]  # the `posttrain run ... --stage NAME --expect-key KEY [--launcher ...]` command
    log: Path  # the job's console output (the stage's own log stays in work/<key>/stage.log)
    attempt: int = 1
    env: dict[str, str] = field(default_factory=dict)
    nodes: int = 1  # > 1: one launcher per node, told its node rank and the first node's address


@dataclass
class JobEnd:
    """How a job ended: its exit code (None when the scheduler lost or stopped it with no code)
    and the scheduler's word for it."""

    code: int | None
    state: str = ""


class Handle(Protocol):
    """A submitted job, as the driver watches it."""

    job_id: str

    def started(self) -> bool:
        """Whether it left the queue (a local job starts at once)."""

    def poll(self) -> JobEnd | None:
        """None while it runs; how it ended once it has."""

    def stop(self) -> None:
        """Ask it to stop (it keeps its work, like Ctrl-C)."""


class Transport(Protocol):
    """Carries jobs to where they run; knows nothing of recipes or the registry."""

    name: str

    def free(self) -> bool:
        """Whether a job submitted now would start (or queue) rather than wait for a slot here."""

    def submit(self, spec: JobSpec) -> Handle:
        ...

    def describe(self, kind: str) -> str:
        """Where a stage of this kind would run, for `plan`."""

    def keeps_running_without_driver(self) -> bool:
        """Whether its jobs outlive the driver (a cluster's do; local subprocesses are stopped with it)."""


def killed(end: JobEnd, failed_marker: Path | None, since: float) -> bool:
    """Whether a job that did not commit its entry was stopped from outside (preempted, time limit,
    node lost, killed) rather than failing on its own: only those are resubmitted.

    A stage that fails writes FAILED into its work folder naming why; a killed one may have had no
    chance to. An exit of 2 is a user error (bad recipe or data): trying again changes nothing."""
    if end.state in ("PREEMPTED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "INTERRUPTED"):
        return True
    if end.code is None:
        return end.state not in ("FAILED", "OUT_OF_MEMORY", "CANCELLED")
    if end.code == USER_ERROR_CODE:
        return False
    if end.code in INTERRUPTED_CODES or end.code < 0:
        return True
    if failed_marker is not None and failed_marker.exists() and failed_marker.stat().st_mtime >= since:
        return failed_marker.read_text().startswith("interrupted")
    return True  # died before the stage could say anything (e.g. a launcher killed under it)


def python_command() -> list[str]:
    """How a job starts posttrain: this interpreter, so the job uses the driver's environment."""
    return [sys.executable, "-m", "posttrain.cli"]


def cpu_threads(slots: int) -> str:
    """Threads per job when `slots` jobs share this machine's cores (oversubscribed BLAS threads are
    slower than fewer)."""
    return str(max(1, (os.cpu_count() or 1) // slots))


def job_folders(reg, include_unbuilt: bool = False) -> list[Path]:
    """What `gc` may remove of `<registry>/jobs/`: the job scripts and logs of built entries (and, on
    request, of unbuilt ones), never those of an entry a live process is building.

    Kept beside the registry store rather than in it: stage keys cover the registry code that merges
    run, and cleaning job logs changes no stage's output."""
    jobs = reg.root / "jobs"
    if not jobs.is_dir():
        return []
    return [path for path in sorted(jobs.iterdir())
            if len(path.name) == 64 and not reg.is_building(path.name)
            and (include_unbuilt or reg.entry_dir(path.name).exists())]


def remove_job_folder(reg, path: Path) -> bool:
    """Remove one folder `job_folders` listed, under its key's lock (False: a build started meanwhile)."""
    import shutil

    from posttrain.registry.locking import lock_if_free

    with lock_if_free(reg.root / "locks" / f"{path.name}.lock") as free:
        if free:
            shutil.rmtree(path, ignore_errors=True)
        return free
