"""The local executor: each stage a subprocess, `slots` at once, each slot with its own GPUs."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from posttrain.execution.jobs import JobEnd, JobSpec, cpu_threads


class LocalJob:
    def __init__(self, process: subprocess.Popen, slot: int, log_handle):
        self.process, self.slot, self._log = process, slot, log_handle
        self.job_id = str(process.pid)

    def started(self) -> bool:
        return True

    def poll(self) -> JobEnd | None:
        code = self.process.poll()
        if code is None:
            return None
        self._log.close()
        return JobEnd(code, "FINISHED" if code == 0 else "FAILED")

    def stop(self) -> None:
        """SIGTERM to the job's process group (a launcher's workers included): the stage stops cleanly."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


class LocalSlots:
    """Subprocesses on this machine. Each runs in a session of its own, so stopping one reaches every
    process its launch started; with `gpus_per_slot`, slot i sees GPUs i*g .. i*g+g-1."""

    name = "local"

    def __init__(self, slots: int, gpus_per_slot: int = 0):
        self.slots, self.gpus_per_slot = slots, gpus_per_slot
        self.running: dict[int, LocalJob] = {}

    def _free_slot(self) -> int | None:
        for slot, job in list(self.running.items()):
            if job.process.poll() is not None:
                del self.running[slot]
        return next((s for s in range(self.slots) if s not in self.running), None)

    def free(self) -> bool:
        return self._free_slot() is not None

    def slot_env(self, slot: int, gpus: int | None = None) -> dict[str, str]:
        gpus = self.gpus_per_slot if gpus is None else gpus
        env = {}
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = cpu_threads(self.slots)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * gpus + i) for i in range(gpus))
        return env

    def submit(self, spec: JobSpec) -> LocalJob:
        slot = self._free_slot()
        if slot is None:
            raise RuntimeError("no free slot")  # the driver asks `free()` first
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        log = open(spec.log, "a")
        log.write(f"$ {' '.join(spec.argv)}\n")
        log.flush()
        env = {**os.environ, **self.slot_env(slot), **spec.env}
        process = subprocess.Popen(spec.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
        job = LocalJob(process, slot, log)
        self.running[slot] = job
        return job

    def describe(self, kind: str) -> str:
        gpus = f", {self.gpus_per_slot} GPU{'s' if self.gpus_per_slot > 1 else ''} each" if self.gpus_per_slot else ""
        return f"local ({self.slots} slots{gpus})"

    def keeps_running_without_driver(self) -> bool:
        return False


def tail(path: Path, lines: int = 5) -> list[str]:
    """The last lines of a job's log, for a failure message."""
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []
