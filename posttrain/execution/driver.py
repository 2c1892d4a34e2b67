"""The driver: walks the stage graph and has every stage whose inputs are committed built by a job.

Each job runs `posttrain run RECIPE --stage NAME --expect-key KEY` (with the stage's own launch inside,
when it trains on several processes): "build this entry from the registry". The driver only decides
what can start, watches, resubmits jobs that were killed from outside, and stops the dependants of a
stage that failed while the rest of the graph goes on. Selections resolve as soon as their evals are in.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from posttrain.execution.jobs import Handle, JobSpec, Transport, killed, python_command
from posttrain.execution.local import tail
from posttrain.registry.file_fingerprint import FingerprintCache
from posttrain.planning.stage_keys import compute_keys
from posttrain.recipe.load import LoadedRecipe
from posttrain.recipe.model import Launch
from posttrain.registry import Registry, short
from posttrain.runner import STAGE_LOG, Chooser, RunResult, headline
from posttrain.core.context import in_recipe

FINISHED = ("done", "cached", "chose")
ACTIVE = ("queued", "running", "elsewhere")


@dataclass
class Track:
    """One stage as the driver follows it."""

    name: str
    kind: str
    state: str = "waiting"  # waiting | queued | running | elsewhere | done | cached | chose | failed | blocked
    key: str | None = None
    job: Handle | None = None
    attempt: int = 0
    submitted: float = 0.0
    started: float = 0.0
    job_ids: list[str] = field(default_factory=list)
    detail: str = ""


@dataclass
class JobOptions:
    """What every job's command carries besides its stage: the recipe as this driver loaded it."""

    launcher: str | None = None  # torchrun | accelerate for stages that run on several processes
    verbose: bool = False


def stage_processes(loaded: LoadedRecipe, name: str, launch: Launch) -> int:
    """Processes of a stage's own launch: the recipe's for stages that spread over processes
    (training), one for the rest, unless the kind's own `launch.kinds` entry says otherwise."""
    item = loaded.stages[name]
    own = launch.kinds.get(item.kind)
    if own is not None and "num_processes" in own.model_fields_set:
        return own.num_processes
    return launch.for_kind(item.kind).num_processes if item.stage.spreads_over_launch() else 1


def job_command(loaded: LoadedRecipe, reg: Registry, name: str, key: str, launch: Launch,
                options: JobOptions) -> list[str]:
    """The command a job runs to build stage `name` as key `key`."""
    argv = [*python_command(), "run", str(loaded.path.resolve()), *loaded.overrides]
    if loaded.profile:
        argv += ["--profile", loaded.profile]
    argv += ["--registry", str(reg.root), "--stage", name, "--expect-key", key]
    if options.verbose:
        argv.append("--verbose")
    own = launch.for_kind(loaded.stages[name].kind)
    processes = stage_processes(loaded, name, launch)
    nodes = own.slurm.nodes if own.executor == "slurm" else 1
    if processes > 1 or nodes > 1:
        argv += ["--launcher", options.launcher or "accelerate", "--nproc", str(max(1, processes // nodes))]
        if own.accelerate_config and (options.launcher or "accelerate") == "accelerate":
            argv += ["--accelerate-config", str(in_recipe(own.accelerate_config, loaded.dir))]
    return argv


class Driver:
    def __init__(self, loaded: LoadedRecipe, reg: Registry, transport: Transport, launch: Launch,
                 options: JobOptions, echo: Callable[[str], Any] = print, poll_seconds: float = 0.5):
        self.loaded, self.reg, self.transport, self.launch = loaded, reg, transport, launch
        self.options, self.echo, self.poll_seconds = options, echo, poll_seconds
        self.cache = FingerprintCache(reg.root / "cache" / "fingerprints.json")
        self.chooser = Chooser(loaded, reg)
        self.keys = compute_keys(loaded, self.cache, self.chooser)
        self.result = RunResult(loaded, reg, selections=self.chooser.chosen)
        self.tracks = {name: Track(name, loaded.stages[name].kind) for name in loaded.order}
        self.width = max(len(name) for name in loaded.order)

    # -- console ------------------------------------------------------------------------------
    def say(self, track: Track, state: str, detail: str = "") -> None:
        """One line per state change, terminal or not: `[i/n] stage kind state detail`."""
        index = self.loaded.order.index(track.name) + 1
        total = len(self.loaded.order)
        line = f"[{index:>{len(str(total))}}/{total}] {track.name:<{self.width}}  {track.kind:<14} {state:<9}"
        self.echo(f"{line} {detail}".rstrip())

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> RunResult:
        try:
            while True:
                self._start_what_can()
                self._watch()
                if not any(t.state in ACTIVE for t in self.tracks.values()):
                    self._start_what_can()  # what the last round finished may have freed (an eval: a selection)
                    if not any(t.state in ACTIVE for t in self.tracks.values()):
                        break
                time.sleep(self.poll_seconds)
        except BaseException:  # Ctrl-C, or an error of the driver's own (e.g. a selection it cannot make)
            self._stop_jobs()
            raise
        for track in self.tracks.values():
            if track.state == "waiting":  # behind a selection that can no longer be made
                track.state, track.detail = "blocked", "its inputs were not built"
        self.result.failed = {t.name: t.detail for t in self.tracks.values() if t.state == "failed"}
        self.result.blocked = {t.name: t.detail for t in self.tracks.values() if t.state == "blocked"}
        self.result.jobs = {t.name: t.job_ids for t in self.tracks.values() if t.job_ids}
        return self.result

    def _start_what_can(self) -> None:
        if any(name not in self.keys for name, t in self.tracks.items() if t.state == "waiting"):
            self.keys.update(compute_keys(self.loaded, self.cache, self.chooser))  # selections whose evals are in
        building = {t.key for t in self.tracks.values() if t.state in ACTIVE}
        for name in self.loaded.order:
            track = self.tracks[name]
            if track.state != "waiting" or name not in self.keys:
                continue
            inputs = sorted(set(self.loaded.stages[name].inputs.values()))
            lost = [i for i in inputs if self.tracks[i].state in ("failed", "blocked")]
            if lost:
                track.state, track.detail = "blocked", f"needs {lost[0]}, which {self.tracks[lost[0]].state}"
                self.say(track, "blocked", track.detail)
                continue
            if not all(self.tracks[i].state in FINISHED for i in inputs):
                continue
            track.key = key = self.keys[name].key
            if track.kind == "select":
                chosen = self.chooser.chosen[name]["chosen"]
                self.result.entries[name] = self.result.entries[chosen]
                self.reg.set_ref(f"{self.loaded.ref_namespace}/{name}", key)
                track.state = "chose"
                self.say(track, "chose", self.chooser.describe(name))
                continue
            if key in building:  # another stage of this recipe builds the same entry: wait for it
                continue
            entry = self.reg.get(key)
            if entry is not None:
                self._finish(track, entry, "cached", short(key))
                continue
            if self.reg.is_building(key):
                track.state = "elsewhere"
                building.add(key)
                self.say(track, "elsewhere", f"{short(key)}: another process is building it; waiting")
                continue
            if not self.transport.free():
                return  # stages start in graph order: the next one waits for a slot too
            self._submit(track)
            building.add(key)

    def _submit(self, track: Track) -> None:
        track.attempt += 1
        key = track.key
        spec = JobSpec(track.name, track.kind, key, job_command(self.loaded, self.reg, track.name, key,
                                                                self.launch, self.options),
                       log=self.reg.root / "jobs" / key / f"attempt-{track.attempt}.log", attempt=track.attempt,
                       nodes=self.launch.for_kind(track.kind).slurm.nodes if self.transport.name == "slurm" else 1)
        track.job = self.transport.submit(spec)
        track.job_ids.append(track.job.job_id)
        track.submitted = time.time()
        again = f", attempt {track.attempt} of {self.launch.max_retries + 1}" if track.attempt > 1 else ""
        if track.job.started():
            track.state, track.started = "running", time.time()
            slot = f" slot {track.job.slot}" if hasattr(track.job, "slot") else ""
            self.say(track, "running", f"{short(key)}  job {track.job.job_id}{slot}{again}  "
                                       f"(log: {spec.log.relative_to(self.reg.root)})")
        else:
            track.state = "queued"
            self.say(track, "queued", f"{short(key)}  job {track.job.job_id}{again}")

    def _watch(self) -> None:
        for track in self.tracks.values():
            if track.state == "elsewhere":
                entry = self.reg.get(track.key)
                if entry is not None:
                    self._finish(track, entry, "cached", f"{short(track.key)} (built by another process)")
                elif not self.reg.is_building(track.key):  # that process is gone: build it here
                    track.state = "waiting"
                continue
            if track.state not in ("queued", "running"):
                continue
            if track.state == "queued" and track.job.started():
                track.state, track.started = "running", time.time()
                self.say(track, "running", f"{short(track.key)}  job {track.job.job_id}")
            end = track.job.poll()
            if end is None:
                continue
            entry = self.reg.get(track.key)
            if entry is not None:
                seconds = entry.manifest.get("timings", {}).get("seconds")
                took = f"  {seconds:.1f}s" if isinstance(seconds, (int, float)) else ""
                self._finish(track, entry, "done", f"{short(track.key)}{took}"
                             f"{headline(entry.kind, entry.manifest.get('metrics', {}))}")
                continue
            how = f"exit {end.code}" if end.code is not None else (end.state or "no exit code")
            work = self.reg.work_dir(track.key)
            if killed(end, work / "FAILED", track.submitted) and track.attempt <= self.launch.max_retries:
                self.say(track, "killed", f"job {track.job.job_id} ({how}); resubmitting, it resumes from its "
                                          "in-stage checkpoint")
                self._submit(track)
                continue
            log = self.reg.root / "jobs" / track.key / f"attempt-{track.attempt}.log"
            said = [line.strip() for line in tail(log, 40) if line.startswith("posttrain: ")]
            cause = said[-1].removeprefix("posttrain: ") if said else f"job {track.job.job_id} ended ({how})"
            if track.attempt > self.launch.max_retries and not said:
                cause += f" after {track.attempt} attempts"
            track.state = "failed"
            track.detail = f"{cause}\n    job log: {log}\n    stage log: {work / STAGE_LOG}"
            self.say(track, "FAILED", f"{cause}  (job log: {log})")

    def _finish(self, track: Track, entry, state: str, detail: str) -> None:
        track.state = state
        self.result.entries[track.name] = entry
        (self.result.ran if state == "done" else self.result.cached).append(track.name)
        self.reg.set_ref(f"{self.loaded.ref_namespace}/{track.name}", track.key)
        self.say(track, state, detail)

    def _stop_jobs(self) -> None:
        """Ctrl-C: local jobs are stopped (they keep their work); cluster jobs go on, and a new driver
        picks them up through the registry's locks."""
        running = [t for t in self.tracks.values() if t.state in ("queued", "running")]
        if not running:
            return
        if self.transport.keeps_running_without_driver():
            ids = ", ".join(t.job.job_id for t in running)
            self.echo(f"posttrain: {len(running)} job(s) keep running on the cluster ({ids}); running the same "
                      f"command again picks them up; scancel stops them")
            return
        for track in running:
            track.job.stop()
        deadline = time.time() + 60
        while time.time() < deadline and any(t.job.poll() is None for t in running):
            time.sleep(0.2)


def executor_options(launch: Launch) -> str:
    """The `--executor ...` options that repeat this run's executor, for 'resume with:' lines."""
    options = ["--executor", launch.executor]
    if launch.executor == "local":
        options += ["--slots", str(launch.slots)]
    return " ".join(shlex.quote(o) for o in options)


def placement(loaded: LoadedRecipe, launch: Launch) -> tuple[str, dict[str, str]]:
    """For `plan`: the executor in one line, and where each stage that would be a job runs."""
    if launch.executor == "local" and launch.slots == 1:
        return "executor: local, one stage at a time in this process (--slots N: N at once, each a job)", {}
    if launch.executor == "local":
        gpus = f", {launch.gpus_per_slot} GPU{'s' if launch.gpus_per_slot > 1 else ''} each" if launch.gpus_per_slot else ""
        header = f"executor: local, {launch.slots} slots{gpus}"
    else:
        header = f"executor: slurm through submitit ({launch.slurm.cluster})"
    where = {}
    for name in loaded.order:
        kind = loaded.stages[name].kind
        if kind == "select":
            continue
        own = launch.for_kind(kind)
        place = "a slot"
        if launch.executor == "slurm":
            slurm = own.slurm
            gpus = f"{slurm.nodes} node(s) x {slurm.gpus_per_node} GPU" if slurm.gpus_per_node else f"{slurm.nodes} node(s), no GPU"
            place = f"{slurm.partition or 'default partition'}, {gpus}, time {slurm.time}"
        processes = stage_processes(loaded, name, launch)
        where[name] = place + (f"; a launch of {processes} processes" if processes > 1 else "")
    return header, where


def transport_for(loaded: LoadedRecipe, reg: Registry, launch: Launch) -> Transport:
    """The executor `launch` names: local slots, or submitit (Slurm, or its local backend)."""
    if launch.executor == "slurm":
        from posttrain.execution.slurm import SubmititSlurm

        folder = in_recipe(launch.slurm.folder, loaded.dir) if launch.slurm.folder else reg.root / "jobs"
        return SubmititSlurm(folder, lambda kind: launch.for_kind(kind).slurm, launch.slurm.cluster)
    from posttrain.execution.local import LocalSlots

    return LocalSlots(launch.slots, launch.gpus_per_slot)


def run_as_jobs(loaded: LoadedRecipe, reg: Registry, launch: Launch, options: JobOptions | None = None,
                echo: Callable[[str], Any] = print) -> RunResult:
    """Every stage a job on the executor `launch` names; the recipe's gates checked when nothing failed.
    `result.failed` / `result.blocked` say what did not get built."""
    from posttrain.runner import check_run_gates

    transport = transport_for(loaded, reg, launch)
    echo(f"recipe {loaded.ref_namespace}  registry {reg.root}  executor {transport.describe('sft')}")
    result = Driver(loaded, reg, transport, launch, options or JobOptions(), echo=echo).run()
    if not result.failed:
        check_run_gates(result)
    return result
