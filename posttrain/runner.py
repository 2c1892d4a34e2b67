"""Run a recipe's stage graph over the registry: skip what exists, build the rest, resume what was cut."""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from posttrain.core import signals
from posttrain.core.errors import UserError
from posttrain.kinds import get_stage
from posttrain.console import headline_metric, progress_reporter, streams_to
from posttrain.registry.file_fingerprint import FingerprintCache
from posttrain.evaluation.gates import GateResult, Objective, check_gates
from posttrain.hf.model_folder import missing_parts
from posttrain.planning.stage_keys import StageKey, compute_keys, explain_change, operational_settings
from posttrain.hf.model_card import write_model_card
from posttrain.recipe.load import LoadedRecipe, load_recipe
from posttrain.registry import CorruptEntry, Entry, Registry, resolve_root, short
from posttrain.kinds import StageContext

log = logging.getLogger("posttrain")
LIBRARIES = ("posttrain", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "mergekit", "lm_eval")
STAGE_LOG = "stage.log"


class StageFailed(Exception):
    """A stage raised: the message names the stage, the cause, and how to resume."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class PlanItem:
    name: str
    kind: str
    key: str
    status: str  # cached | run | resume | rebuild
    reason: str
    memory: str = "-"


@dataclass
class RunResult:
    recipe: LoadedRecipe
    registry: Registry
    entries: dict[str, Entry] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    gates: list[GateResult] = field(default_factory=list)  # the recipe's quality gates, checked after the run
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)  # select step -> what it chose and why
    failed: dict[str, str] = field(default_factory=dict)  # stage -> why (runs whose stages are jobs go on)
    blocked: dict[str, str] = field(default_factory=dict)  # stage -> which failed input it needed
    jobs: dict[str, list[str]] = field(default_factory=dict)  # stage -> ids of the jobs that built it

    @property
    def gates_passed(self) -> bool:
        return all(gate.passed for gate in self.gates)

    def path(self, stage: str) -> Path:
        return self.entries[stage].path

    def metrics(self, stage: str) -> dict[str, Any]:
        return self.entries[stage].manifest.get("metrics", {})


class Chooser:
    """Resolves `select` steps from the registry: the eval they read must be an entry already."""

    def __init__(self, loaded: LoadedRecipe, registry: Registry):
        self.loaded, self.registry = loaded, registry
        self.chosen: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, keys: dict[str, StageKey]) -> str | None:
        from posttrain.recipe.sweeps import rank_candidates

        item = self.loaded.stages[name]
        config = item.config
        evaluated = {e: self.registry.get(keys[e].key) if e in keys else None for e in config.evals}
        if any(entry is None for entry in evaluated.values()):
            return None
        results = {e: entry.manifest.get("metrics", {}).get("results", {}) for e, entry in evaluated.items()}
        parts = item.stage.part_values(config, results)
        scores = item.stage.scores(config, results)
        ranked = rank_candidates(scores, config.mode)
        chosen = ranked[config.rank - 1]
        if scores[chosen] is None:
            missing = next(p for p in config.objective_parts if parts[chosen][p.path] is None)
            recorded = ", ".join(sorted(results[missing.eval].get(chosen, {}))) or "nothing"
            raise UserError(f"{name}: eval stage {missing.eval!r} recorded no {missing.metric!r} for {chosen!r} "
                            f"(it recorded: {recorded})")
        self.chosen[name] = {"step": name, "of": config.of, "chosen": chosen, "score": scores[chosen], "rank": config.rank,
                             "by": config.by, "mode": config.mode, "scores": scores,
                             "key": keys[chosen].key,
                             **({"combine": config.combine, "parts": parts} if config.combine != "metric" else {})}
        return chosen

    def describe(self, name: str) -> str:
        found = self.chosen[name]
        return (f"{found['chosen']}  ({found['by']} {found['score']:.4g}, place {found['rank']} of "
                f"{len(found['scores'])}, {found['mode']})")


def objectives(loaded: LoadedRecipe, selections: dict[str, dict[str, Any]]) -> dict[str, Objective]:
    """Each select step's dev objective, for gates that read `<step>/objective[/<model>]`."""
    return {name: Objective(item.config.objective_parts, item.config.combine,
                            selections.get(name, {}).get("chosen"))
            for name, item in loaded.stages.items() if item.kind == "select"}


def rank_info() -> tuple[int, int]:
    """This process's rank and the world size under torchrun / accelerate launch (0, 1 otherwise)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def open_registry(loaded: LoadedRecipe, registry: str | Path | None = None) -> Registry:
    return Registry(resolve_root(str(registry) if registry else None, loaded.recipe.registry, loaded.dir))


@dataclass(frozen=True)
class EntryState:
    """What the registry holds for a key, decided in one place for `plan`, `run` and a job's build: a
    sound entry to reuse, a corrupt one to set aside (`problem`), and whether an interrupted run left
    its work folder to resume from."""

    entry: Entry | None
    problem: str
    resumable: bool


def entry_state(reg: Registry, key: str) -> EntryState:
    entry, problem = None, ""
    try:
        entry = reg.load(key)
    except CorruptEntry as exc:
        problem = str(exc)
    except KeyError:
        pass
    return EntryState(entry, problem, entry is None and (reg.work_dir(key) / STAGE_LOG).exists())


def plan(loaded: LoadedRecipe, registry: Registry) -> list[PlanItem]:
    """What `run` would do for each stage, and why, without running or writing anything."""
    chooser = Chooser(loaded, registry)
    keys = compute_keys(loaded, FingerprintCache(registry.root / "cache" / "fingerprints.json"), chooser)
    names = {k.key: n for n, k in keys.items()}
    from posttrain.planning.memory import estimates_for

    memory = estimates_for(loaded)
    items = []
    for name in loaded.order:
        kind = loaded.stages[name].kind
        if name not in keys:
            waits = next(n for n in loaded.order if loaded.stages[n].kind == "select" and n not in keys
                         and _depends_on(loaded, name, n))
            select = loaded.stages[waits].config
            evals = " and ".join(select.evals)
            if kind == "select":
                select = loaded.stages[name].config
                evals = " and ".join(select.evals)
                reason = (f"place {select.rank} of {len(select.candidates)} {select.of} candidates by "
                          f"{select.by} ({select.mode}), once {evals} {'have' if len(select.evals) > 1 else 'has'} run")
            else:
                reason = f"after {waits}, chosen once {evals} {'have' if len(select.evals) > 1 else 'has'} run"
            items.append(PlanItem(name, kind, "-", "select" if kind == "select" else "after", reason))
            continue
        key = keys[name]
        if kind == "select":
            items.append(PlanItem(name, kind, key.key, "select", f"chose {chooser.describe(name)}"))
            continue
        earlier = next((i for i in items if i.key == key.key and i.status == "run"), None)
        if earlier:  # e.g. two stages' data through the same tokenizer: built once
            items.append(PlanItem(name, kind, key.key, "cached", f"the same entry as {earlier.name}, built first"))
            continue
        state = entry_state(registry, key.key)
        if state.entry is not None:
            items.append(PlanItem(name, kind, key.key, "cached", "entry exists"))
        elif state.problem:
            items.append(PlanItem(name, kind, key.key, "rebuild", f"corrupt entry will be set aside: {state.problem}"))
        elif state.resumable:
            items.append(PlanItem(name, kind, key.key, "resume", "an interrupted run left its work folder"))
        else:
            items.append(PlanItem(name, kind, key.key, "run", _why_new(loaded, registry, name, key, names)))
    for item in items:
        item.memory = memory.get(item.name, "-")
    return items


def _depends_on(loaded: LoadedRecipe, name: str, other: str) -> bool:
    """Whether stage `name` is `other` or takes it as an input, directly or further up."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current == other:
            return True
        if current not in seen:
            seen.add(current)
            todo.extend(loaded.stages[current].inputs.values())
    return False


def _why_new(loaded: LoadedRecipe, registry: Registry, name: str, key: StageKey, names: dict[str, str]) -> str:
    old_key = registry.get_ref(f"{loaded.ref_namespace}/{name}")
    if old_key is None:
        return "never built"
    old = registry.get(old_key)
    if old is None:
        return f"previous entry {short(old_key)} is gone"
    return explain_change(old.manifest.get("key_material", {}), key.material, names)


def run(
    recipe: str | Path | LoadedRecipe,
    profile: str | None = None,
    overrides: list[str] | tuple = (),
    registry: str | Path | Registry | None = None,
    echo=print,
    quiet: bool = False,
    executor: str | None = None,
    slots: int | None = None,
) -> RunResult:
    """Run every stage of a recipe that is not already in the registry. Python API of `posttrain run`.

    `executor` / `slots` override the recipe's `launch:`; with more than one slot, or `slurm`, every
    stage is a job (see `posttrain.execution`) and `result.failed` names stages that failed."""
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe, profile, list(overrides))
    reg = registry if isinstance(registry, Registry) else open_registry(loaded, registry)
    update = {k: v for k, v in (("executor", executor), ("slots", slots)) if v is not None}
    launch = type(loaded.recipe.launch).model_validate({**loaded.recipe.launch.model_dump(exclude_unset=True), **update})
    if launch.executor == "slurm" or launch.slots > 1:
        from posttrain.execution.driver import run_as_jobs

        return run_as_jobs(loaded, reg, launch, echo=echo)
    rank, world = rank_info()
    cache = FingerprintCache(reg.root / "cache" / "fingerprints.json")
    chooser = Chooser(loaded, reg)
    keys = compute_keys(loaded, cache, chooser)
    result = RunResult(loaded, reg, selections=chooser.chosen)
    context = _Run(loaded, reg, keys, result, rank, world, echo, quiet)
    total = len(loaded.order)
    width = max([14, *map(len, loaded.order)])  # sweep candidates' names are long: keep the columns
    for index, name in enumerate(loaded.order, 1):
        item = loaded.stages[name]
        if name not in keys:  # after a selection: its eval has run by now
            keys.update(compute_keys(loaded, cache, chooser))
        key = keys[name].key
        prefix = f"[{index:>{len(str(total))}}/{total}] {name:<{width}} {item.kind:<14}"
        if item.kind == "select":
            result.entries[name] = result.entries[chooser.chosen[name]["chosen"]]
            if rank == 0:
                echo(f"{prefix} chose    {chooser.describe(name)}")
                reg.set_ref(f"{loaded.ref_namespace}/{name}", key)
            continue
        _build_or_reuse(context, name, prefix)
    check_run_gates(result)
    return result


def check_run_gates(result: RunResult) -> None:
    """The recipe's quality gates over the entries of a finished run."""
    loaded = result.recipe
    if loaded.recipe.gates:
        result.gates = check_gates(loaded.recipe.gates, result.entries, objectives(loaded, result.selections))


def build_stage(
    recipe: str | Path | LoadedRecipe,
    stage: str,
    profile: str | None = None,
    overrides: list[str] | tuple = (),
    registry: str | Path | Registry | None = None,
    expect_key: str | None = None,
    echo=print,
    quiet: bool = False,
) -> RunResult:
    """Build one stage whose inputs are already in the registry (or find it built): the unit of work
    an executor's job runs. `expect_key` is the key the submitting driver computed; a different key
    here means the recipe, its files or posttrain changed since, and nothing is built."""
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe, profile, list(overrides))
    if stage not in loaded.stages:
        raise UserError(f"{loaded.path}: no stage {stage!r} (stages: {', '.join(loaded.order)})")
    reg = registry if isinstance(registry, Registry) else open_registry(loaded, registry)
    rank, world = rank_info()
    chooser = Chooser(loaded, reg)
    keys = compute_keys(loaded, FingerprintCache(reg.root / "cache" / "fingerprints.json"), chooser)
    result = RunResult(loaded, reg, selections=chooser.chosen)
    if stage not in keys:
        raise UserError(f"stage {stage!r} comes after a selection whose evals are not built yet; "
                        f"build them first ({loaded.command()})")
    if expect_key and keys[stage].key != expect_key:
        raise UserError(f"stage {stage!r} now has key {short(keys[stage].key)}, not the {short(expect_key)} it was "
                        f"submitted for: the recipe, a file it reads or posttrain changed since; nothing was built")
    for ref in set(loaded.stages[stage].inputs.values()):
        entry = reg.get(keys[ref].key)
        if entry is None:
            raise UserError(f"stage {stage!r}: its input {ref!r} ({short(keys[ref].key)}) is not in the registry "
                            f"{reg.root}; build it first ({loaded.command()})")
        result.entries[ref] = entry
    context = _Run(loaded, reg, keys, result, rank, world, echo, quiet)
    prefix = f"{stage:<14} {loaded.stages[stage].kind:<14}"
    if loaded.stages[stage].kind == "select":
        result.entries[stage] = result.entries[chooser.chosen[stage]["chosen"]]
        if rank == 0:
            echo(f"{prefix} chose    {chooser.describe(stage)}")
            reg.set_ref(f"{loaded.ref_namespace}/{stage}", keys[stage].key)
        return result
    _build_or_reuse(context, stage, prefix)
    return result


def _build_or_reuse(context: "_Run", name: str, prefix: str) -> Entry:
    """The stage's entry: the registry's if it is there and sound, else built now; its ref set."""
    reg, result, key = context.reg, context.result, context.keys[name].key
    entry = _reusable(reg, key, context.echo, prefix)
    if entry is None:
        entry = _build(context, name, prefix)
        result.ran.append(name)
    else:
        result.cached.append(name)
        if context.rank == 0:
            context.echo(f"{prefix} cached   {short(key)}")
    if context.rank == 0:
        reg.set_ref(f"{context.loaded.ref_namespace}/{name}", key)
    result.entries[name] = entry
    return entry


def _reusable(reg: Registry, key: str, echo, prefix: str) -> Entry | None:
    state = entry_state(reg, key)
    if state.problem:
        echo(f"{prefix} corrupt  {short(key)}: {state.problem}; setting it aside and rebuilding")
    return state.entry


@dataclass
class _Run:
    """What every stage of one run shares: the recipe, the registry, the keys, the results so far."""

    loaded: LoadedRecipe
    reg: Registry
    keys: dict[str, StageKey]
    result: RunResult
    rank: int
    world: int
    echo: Callable[[str], Any]
    quiet: bool


def _build(run: _Run, name: str, prefix: str) -> Entry:
    loaded, reg, echo, quiet = run.loaded, run.reg, run.echo, run.quiet
    key = run.keys[name].key
    if run.rank != 0:
        return _build_as_follower(run, name)
    with reg.lock(key, on_wait=lambda: echo(f"{prefix} waiting: another process is building {short(key)}")):
        state = entry_state(reg, key)  # another process may have finished it while we waited for the lock
        if state.entry is not None:
            echo(f"{prefix} cached   {short(key)} (built by another process)")
            return state.entry
        if state.problem:
            reg.discard(key)
        work = reg.work_dir(key)
        resuming = state.resumable
        work.mkdir(parents=True, exist_ok=True)
        (work / "FAILED").unlink(missing_ok=True)
        tmp = reg.fresh_tmp_dir(key)
        # The log's path is in every failure message; a running line stays short.
        echo(f"{prefix} {'resuming' if resuming else 'running '} {short(key)}"
             + ("" if quiet else f"  (log: {work / STAGE_LOG})"))
        started = time.time()
        metrics = _run_stage(run, name, tmp, work, prefix)
        for warning in metrics.get("warnings") or []:
            echo(f"{prefix} warning: {warning}")
        manifest = _manifest(run, name, metrics, started)
        if loaded.stages[name].stage.produces == "model":
            lacking = missing_parts(tmp) if tmp.is_dir() else ["the whole build folder"]
            if lacking:  # e.g. removed under us: never commit a model entry that cannot load
                _mark_failed(work, tmp, run.rank, "failed")
                raise StageFailed(f"stage {name!r} wrote an incomplete model folder (missing: {'; '.join(lacking)}); "
                                  f"nothing was committed\n  resume with: {loaded.command()}")
            write_model_card(tmp, manifest, reg)
        shutil.copy2(work / STAGE_LOG, tmp / "posttrain.log")
        entry = reg.commit(key, tmp, manifest)
        echo(f"{prefix} {'resumed' if resuming else 'done   '}  {short(key)}  {time.time() - started:.1f}s"
             f"{headline(loaded.stages[name].kind, metrics)}")
        return entry


def headline_names(kind: str) -> tuple[str, ...]:
    """The headline metrics of a kind (its `Stage.headline_metrics` hook); a kind no longer installed has
    the trainers' ones. The closing line, `run`'s summary table and the driver's lines all use this."""
    try:
        return get_stage(kind).headline_metrics()
    except UserError:
        return ("final_train_loss", "final_eval_loss")


def headline(kind: str, metrics: dict[str, Any]) -> str:
    """The stage's headline metric as its closing line ends with it."""
    found = headline_metric(metrics, headline_names(kind))
    return f"  {found}" if found else ""


def _run_stage(run: _Run, name: str, out_dir: Path, work: Path, prefix: str = "") -> dict[str, Any]:
    loaded, keys, result, rank, world, quiet = run.loaded, run.keys, run.result, run.rank, run.world, run.quiet
    item = loaded.stages[name]
    inputs = {path: _as_input(result.entries[ref]) for path, ref in item.inputs.items()}
    seed = item.config.seed if item.config.seed is not None else loaded.recipe.seed
    stage_log = logging.getLogger(f"posttrain.stage.{name}")
    ctx = StageContext(name, inputs, out_dir, work, loaded.dir, seed, rank, world, stage_log,
                       results_cache=run.reg.root / "cache" / "results")
    handler = logging.FileHandler(work / STAGE_LOG if rank == 0 else work / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(min(previous_level, logging.INFO) if previous_level else logging.INFO)
    stage_log.info("stage %s (%s) key %s starting; config: %s", name, item.kind, keys[name].key,
                   json.dumps(item.config.model_dump(mode="json")))
    if rank == 0:
        _write_tracking_facts(run, name, inputs, work)
    try:
        with streams_to(work / STAGE_LOG if rank == 0 else work / f"rank{rank}.log", quiet) as console:
            ctx.progress = progress_reporter(console, prefix) if rank == 0 else ctx.progress
            return item.stage.run(item.config, ctx) or {}
    except UserError as exc:
        stage_log.error("%s", exc)
        _mark_failed(work, out_dir, rank, "failed")
        raise StageFailed(f"stage {name!r} ({item.kind}) failed: {exc}", exit_code=exc.exit_code) from exc
    except (KeyboardInterrupt, SystemExit):
        stage_log.error("interrupted")
        _mark_failed(work, out_dir, rank, "interrupted")
        raise
    except Exception as exc:  # a bug or an environment problem: keep the traceback in the log
        if signals.interrupted():  # a library turned our Ctrl-C / SIGTERM into its own error
            stage_log.error("interrupted (surfaced as %s: %s)", type(exc).__name__, exc)
            _mark_failed(work, out_dir, rank, "interrupted")
            raise KeyboardInterrupt from exc
        stage_log.error("failed:\n%s", traceback.format_exc())
        _mark_failed(work, out_dir, rank, "failed")
        raise StageFailed(
            f"stage {name!r} ({item.kind}) failed: {type(exc).__name__}: {exc}\n"
            f"  traceback: {work / STAGE_LOG}\n"
            f"  resume with: {loaded.command()}"
        ) from exc
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()


def _write_tracking_facts(run: _Run, name: str, inputs: dict[str, Any], work: Path) -> None:
    """What experiment trackers label the stage's run with (posttrain/console/trackers.py reads it)."""
    from posttrain.console import TRACKING_FILE

    loaded, item = run.loaded, run.loaded.stages[name]
    facts = {"run_name": f"{loaded.ref_namespace}/{name}", "project": loaded.recipe.name,
             "recipe": loaded.ref_namespace, "recipe_file": str(loaded.path), "profile": loaded.profile,
             "stage": name, "kind": item.kind, "key": run.keys[name].key,
             "inputs": {path: {"stage": ref, "key": inputs[path].key} for path, ref in item.inputs.items()},
             "config": item.config.model_dump(mode="json")}
    (work / TRACKING_FILE).write_text(json.dumps(facts, indent=2) + "\n")


def _mark_failed(work: Path, out_dir: Path, rank: int, why: str) -> None:
    """FAILED in the work folder says `failed` or `interrupted` (a driver resubmits only the latter)."""
    if rank == 0:
        (work / "FAILED").write_text(f"{why} {time.time()}\n")
        shutil.rmtree(out_dir, ignore_errors=True)  # nothing half-written stays in the registry


def _build_as_follower(run: _Run, name: str) -> Entry:
    """Ranks > 0 take part in the stage (collectives need every rank) but never write the registry;
    work that rank 0 does alone (`runs_on_every_rank = False`) they only wait for."""
    reg, rank, key = run.reg, run.rank, run.keys[name].key
    work = reg.work_dir(key)
    scratch = work / f"rank{rank}-scratch"
    for _ in range(600):  # rank 0 creates the work folder under its lock
        if work.exists() or reg.get(key) is not None:
            break
        time.sleep(0.1)
    if not run.loaded.stages[name].stage.runs_on_every_rank:
        return wait_for_commit(reg, key, work, name)  # e.g. prepared data: made once, by rank 0
    scratch.mkdir(parents=True, exist_ok=True)
    _run_stage(run, name, scratch, work)
    return wait_for_commit(reg, key, work, name)


def wait_for_commit(reg: Registry, key: str, work: Path, name: str, poll: float = 0.2) -> Entry:
    """A follower rank waits for rank 0 to commit `key`; rank 0 holds the key's lock while it builds,
    so a free lock and no entry means rank 0 is gone (killed, or its machine lost) and waiting is over."""
    while True:
        entry = reg.get(key)
        if entry is not None:
            return entry
        if (work / "FAILED").exists():
            raise StageFailed(f"stage {name!r} failed on rank 0; see {work / STAGE_LOG}")
        if not reg.is_building(key):
            entry = reg.get(key)  # committed between the two checks
            if entry is not None:
                return entry
            raise StageFailed(f"stage {name!r}: rank 0 stopped without committing the entry or reporting a failure "
                              f"(killed?); see {work / STAGE_LOG}")
        time.sleep(poll)


def _as_input(entry: Entry):
    from posttrain.kinds import InputEntry

    return InputEntry(entry.key, entry.path, entry.kind, entry.manifest)


def _manifest(run: _Run, name: str, metrics: dict, started: float) -> dict:
    loaded, keys = run.loaded, run.keys
    item = loaded.stages[name]
    # Which candidate each selection took, with every candidate's score: the lineage of a choice.
    selected = {path: run.result.selections[ref] for path, ref in item.inputs.items() if ref in run.result.selections}
    return {
        "kind": item.kind,
        "stage": name,
        "recipe": loaded.recipe.name,
        "recipe_file": str(loaded.path),
        "profile": loaded.profile,
        "ref": f"{loaded.ref_namespace}/{name}",
        "inputs": {path: keys[ref].key for path, ref in item.inputs.items()},
        "input_names": dict(item.inputs),
        **({"selections": selected} if selected else {}),
        **({"candidate": {"of": item.candidate[0], "label": item.candidate[1], "overrides": item.candidate[2]}}
           if item.candidate else {}),
        "config": item.config.model_dump(mode="json"),
        # Set in the config but not part of the key (speed, logging, workers): how this entry was made.
        "operational": operational_settings(item.stage, item.config.model_dump(mode="json")),
        "key_material": keys[name].material,
        "metrics": metrics,
        "versions": library_versions(),
        "timings": {"started": started, "finished": time.time(), "seconds": round(time.time() - started, 3)},
        "host": {"python": platform.python_version(), "platform": platform.platform(), "argv": sys.argv},
    }


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            continue
    return found
