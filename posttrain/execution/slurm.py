"""The slurm executor: each stage one Slurm job, submitted through submitit (`posttrain[slurm]`).

submitit writes the sbatch script, submits it, and runs `run_stage_job` on each node of the job; that
function only starts the stage's `posttrain run ... --stage` command (telling a multi-node launch its
node rank and the first node's address) and returns its exit code. submitit keeps its own payload
files (the function and its arguments, written and read by submitit itself) in the job folder.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from posttrain.core.errors import UserError
from posttrain.execution.jobs import JobEnd, JobSpec
from posttrain.recipe.model import SlurmSettings, slurm_minutes

MAIN_PORT = 29500


def run_stage_job(argv: list[str], env: dict[str, str], nodes: int, log_file: str, exit_file: str) -> int:
    """Run inside the Slurm job (on every node): the stage's command, told where it stands in a
    multi-node launch, its output appended to `log_file` (the job log the driver names). The first
    node writes the exit code to `exit_file` (JSON), which is what the driver reads: it never loads
    submitit's pickled results."""
    command, first = list(argv), True
    if nodes > 1:
        import submitit

        job = submitit.JobEnvironment()
        first = job.node == 0
        command += ["--nnodes", str(job.num_nodes), "--node-rank", str(job.node),
                    "--main-address", job.hostnames[0], "--main-port", str(MAIN_PORT)]
    with open(log_file, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        code = subprocess.run(command, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    if first:
        Path(exit_file).write_text(json.dumps({"code": code}))
    return code


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("launch.executor slurm needs submitit: pip install 'posttrain[slurm]'") from None
    return submitit


class SubmititJob:
    def __init__(self, job: Any, exit_file: Path):
        self.job, self.exit_file = job, exit_file
        self.job_id = str(job.job_id)

    def started(self) -> bool:
        return self.job.state not in ("PENDING", "REQUEUED", "UNKNOWN", "CONFIGURING")

    def poll(self) -> JobEnd | None:
        if not self.job.done():
            return None
        state = str(self.job.state).split()[0] if self.job.state else ""
        try:
            return JobEnd(int(json.loads(self.exit_file.read_text())["code"]), state)
        except (OSError, ValueError, KeyError, TypeError):  # killed or lost before it could write one
            return JobEnd(None, state)

    def stop(self) -> None:
        self.job.cancel(check=False)


def sbatch_parameters(settings: SlurmSettings, name: str) -> dict[str, Any]:
    """submitit's `slurm_*` parameters for one job of these settings."""
    parameters: dict[str, Any] = {
        "job_name": name,
        "nodes": settings.nodes,
        "ntasks_per_node": 1,  # one launcher per node; it starts one process per GPU
        "time": slurm_minutes(settings.time),
        "gpus_per_node": settings.gpus_per_node or None,
        "setup": list(settings.setup),
    }
    for field in ("partition", "account", "qos", "cpus_per_task"):
        if getattr(settings, field) is not None:
            parameters[field] = getattr(settings, field)
    if settings.mem_gb is not None:
        parameters["mem"] = f"{settings.mem_gb}GB"
    extra = dict(settings.sbatch)
    for known in ("constraint", "exclusive", "exclude", "nodelist", "comment", "mail_type", "mail_user", "gres"):
        if known in extra:
            parameters[known] = extra.pop(known)
    if extra:
        parameters["additional_parameters"] = extra
    return {key: value for key, value in parameters.items() if value is not None}


class SubmititSlurm:
    """Jobs through submitit: `cluster: slurm` submits with sbatch, `cluster: local` runs the same job
    as a local subprocess (submitit's local executor), which is how the path is tested without Slurm."""

    name = "slurm"

    def __init__(self, folder: Path, settings_for, cluster: str = "slurm"):
        self.folder, self.settings_for, self.cluster = folder, settings_for, cluster
        _submitit()
        if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
            raise UserError("launch.executor slurm: sbatch/srun are not on PATH here (run the driver on a Slurm "
                            "login node; launch.slurm.cluster: local tries the same jobs on this machine)")

    def free(self) -> bool:
        return True  # the cluster queues what it cannot start

    def executor(self, spec: JobSpec):
        submitit = _submitit()
        settings: SlurmSettings = self.settings_for(spec.kind)
        folder = self.folder / spec.key  # submitit names its files by job id
        executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster)  # never guessed: no silent fallback
        if executor.cluster == "slurm":
            parameters = sbatch_parameters(settings, f"posttrain:{spec.stage}")
            # What the job runs, readable in its script and first in its log.
            parameters["setup"] = parameters.get("setup", []) + [
                f"echo {shlex.quote('posttrain job: ' + shlex.join(spec.argv))}"]
            executor.update_parameters(**{f"slurm_{k}": v for k, v in parameters.items()})
        else:
            executor.update_parameters(timeout_min=slurm_minutes(settings.time), name=f"posttrain:{spec.stage}")
        return executor

    def submit(self, spec: JobSpec) -> SubmititJob:
        executor = self.executor(spec)
        exit_file = spec.log.with_suffix(".exit.json")
        exit_file.parent.mkdir(parents=True, exist_ok=True)
        exit_file.unlink(missing_ok=True)
        try:
            job = executor.submit(run_stage_job, spec.argv, spec.env, spec.nodes, str(spec.log), str(exit_file))
        except Exception as exc:  # noqa: BLE001 - sbatch refused (bad partition, account...): say so
            raise UserError(f"stage {spec.stage!r}: the job could not be submitted: {exc}") from exc
        return SubmititJob(job, exit_file)

    def describe(self, kind: str) -> str:
        settings: SlurmSettings = self.settings_for(kind)
        if self.cluster != "slurm":
            return f"submitit {self.cluster}"
        gpus = f"{settings.nodes}x{settings.gpus_per_node} GPU" if settings.gpus_per_node else f"{settings.nodes} node CPU"
        where = settings.partition or "default partition"
        return f"slurm {where}, {gpus}, {settings.time}"

    def keeps_running_without_driver(self) -> bool:
        return self.cluster == "slurm"
