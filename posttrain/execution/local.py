"""The local executor: each stage a subprocess, `slots` at once, each slot with its own GPUs."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

from posttrain.execution.jobs import JobEnd, JobSpec, cpu_threads, python_command


# Imported once by the fork server of a driver's local jobs on a machine without GPUs, so that each job
# starts with them loaded (importing them costs ~9 s of CPU per process on a small machine, more than
# many tiny stages take).
PRELOAD = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "safetensors")


def has_gpu_devices() -> bool:
    """Whether this machine has NVIDIA or AMD GPUs. Jobs there start as fresh processes: a library that
    touched the GPU driver while the fork server imported it would leave forked jobs unable to use
    CUDA, and next to a GPU stage's hours the import time does not matter."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd"))


def _job_main(argv: list[str], env: dict[str, str], log_path: str, threads: int) -> None:
    """A job forked from the warm fork server: a session of its own (so stopping it reaches what it
    starts), its environment, its output to the job log, then `posttrain` as if started afresh."""
    os.setsid()
    os.environ.update(env)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.argv = ["posttrain", *argv]
    import torch

    torch.set_num_threads(threads)  # OMP_NUM_THREADS was read when the server imported torch
    from posttrain.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse and friends
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)  # multiprocessing ends the child with this code after running its finalizers


class LocalJob:
    def __init__(self, process, slot: int, log_handle=None):
        self.process, self.slot, self._log = process, slot, log_handle
        self.job_id = str(process.pid)

    def started(self) -> bool:
        return True

    def returncode(self) -> int | None:
        if isinstance(self.process, subprocess.Popen):
            return self.process.poll()
        return self.process.exitcode  # a multiprocessing child: -N when a signal ended it

    def poll(self) -> JobEnd | None:
        code = self.returncode()
        if code is None:
            return None
        if self._log is not None:
            self._log.close()
        return JobEnd(code, "FINISHED" if code == 0 else "FAILED")

    def stop(self) -> None:
        """SIGTERM to the job's process group (a launcher's workers included): the stage stops cleanly."""
        if self.returncode() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


class LocalSlots:
    """Subprocesses on this machine. Each runs in a session of its own, so stopping one reaches every
    process its launch started; with `gpus_per_slot`, slot i sees GPUs i*g .. i*g+g-1."""

    name = "local"

    def __init__(self, slots: int, gpus_per_slot: int = 0, warm: bool = True):
        self.slots, self.gpus_per_slot = slots, gpus_per_slot
        self.running: dict[int, LocalJob] = {}
        self._context = None
        if warm and "fork" in multiprocessing.get_all_start_methods() and not has_gpu_devices():
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(list(PRELOAD))

    def _free_slot(self) -> int | None:
        for slot, job in list(self.running.items()):
            if job.returncode() is not None:
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
        with open(spec.log, "a") as log:
            log.write(f"$ {' '.join(spec.argv)}\n")
        env = {**self.slot_env(slot), **spec.env}
        prefix = python_command()
        if self._context is not None and spec.argv[:len(prefix)] == prefix:
            threads = int(env.get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or cpu_threads(self.slots))
            process = self._context.Process(target=_job_main, args=(spec.argv[len(prefix):], env, str(spec.log), threads),
                                            name=f"posttrain job {spec.stage}")
            process.start()
            job = LocalJob(process, slot)
        else:
            log = open(spec.log, "a")
            process = subprocess.Popen(spec.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, **env}, start_new_session=True)
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
