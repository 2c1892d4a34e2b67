"""Read a recipe file, apply a profile and overrides, and validate everything, collecting every problem.

Each problem is reported where the user must fix it: the recipe line of the key (or of the profile
or `defaults` entry that set it, or the command line for an override).
"""
from __future__ import annotations

import os

import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from posttrain.core.errors import Problem, RecipeError, UserError
from posttrain.recipe.merge import COMMAND_LINE, deep_merge, leaf_paths, parse_overrides
from posttrain.recipe.model import RESERVED_NAMES, Recipe
from posttrain.recipe.sweeps import apply_override, rewrite_references, select_configs, sweep_candidates
from posttrain.recipe.yaml_lines import load_yaml_with_lines
from posttrain.kinds import INTERNAL_KINDS, Stage, StageConfig, get_stage, known_kinds
from posttrain.recipe.selection import Selection
from posttrain.core.context import in_recipe

BASE = "base"


@dataclass
class ResolvedStage:
    """A node of the recipe's graph: a stage that builds an entry, or a selection (`stage` is then a
    `Selection`, kind "select") that hands on the candidate it chose."""

    name: str
    kind: str
    stage: Stage | Selection
    config: StageConfig
    inputs: dict[str, str]  # dotted config path -> name of the stage/model it reads
    candidate: tuple[str, str, dict] | None = None  # (swept stage, label, overrides) of a sweep's candidate


@dataclass
class LoadedRecipe:
    path: Path
    recipe: Recipe
    profile: str | None
    overrides: list[str]
    stages: dict[str, ResolvedStage]  # includes `base` and `models:` as kind "model"
    order: list[str] = field(default_factory=list)  # dependencies first

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def ref_namespace(self) -> str:
        """Refs of a profile live apart (`name@tiny/sft`), so a tiny run never replaces the real refs."""
        return f"{self.recipe.name}@{self.profile}" if self.profile else self.recipe.name

    def command(self, verb: str = "run") -> str:
        """The command line that reproduces this load, for 'resume with:' messages."""
        import shlex

        parts = ["posttrain", verb, shlex.quote(str(self.path))]
        if self.profile:
            parts += ["--profile", shlex.quote(self.profile)]
        parts += [shlex.quote(o) for o in self.overrides]
        # Inside a launch, the launcher's own options, so the command relaunches the same way.
        launch = os.environ.get(LAUNCH_OPTIONS_ENV, "")
        return " ".join(parts + ([launch] if launch and verb == "run" else []))


# Set by `posttrain run --launcher ...` for the processes it starts: its launch options, shell-quoted.
LAUNCH_OPTIONS_ENV = "POSTTRAIN_LAUNCH_OPTIONS"


class _Origins:
    """Maps key paths to where they were written (file and line)."""

    def __init__(self) -> None:
        self.where: dict[tuple, tuple[str, int | None]] = {}

    def locate(self, path: tuple) -> tuple[tuple, str, int | None]:
        for cut in range(len(path), -1, -1):
            if path[:cut] in self.where:
                file, line = self.where[path[:cut]]
                return path[:cut], file, line
        return (), "?", None


def load_recipe(path: str | Path, profile: str | None = None, overrides: list[str] | tuple = (),
                deep: bool = False) -> LoadedRecipe:
    """Load and fully validate a recipe. Raises RecipeError listing every problem found."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe {path}: {exc}") from exc
    return load_recipe_text(text, path, profile, overrides, deep=deep)


def load_recipe_text(text: str, path: Path, profile: str | None = None, overrides: list[str] | tuple = (),
                     shown: str | None = None, deep: bool = False) -> LoadedRecipe:
    """Validate recipe text as if read from `path` (relative paths resolve against its folder)."""
    shown = shown or str(path)
    data, lines, problems = load_yaml_with_lines(text, shown)
    if problems and data is None:
        raise RecipeError(problems)
    if not isinstance(data, dict):
        raise RecipeError([Problem(shown, 1, "", "a recipe must be a mapping with name, base and stages")])

    origins = _Origins()
    origins.where = {p: (shown, line) for p, line in lines.items()}
    data = _apply_profile(data, profile, lines, origins, shown, problems)
    override_data, override_problems = parse_overrides(list(overrides))
    problems += override_problems
    if override_data:
        data = deep_merge(data, override_data)
        for leaf in leaf_paths(override_data):
            for cut in range(1, len(leaf) + 1):
                origins.where[leaf[:cut]] = (COMMAND_LINE, None)

    def report(loc: tuple, message: str, anchor: tuple | None = None) -> None:
        _, file, line = origins.locate(anchor if anchor is not None else loc)
        problem = Problem(file, line, ".".join(str(p) for p in loc), message)
        if problem not in problems:  # each candidate of a sweep checks the stage's shared settings again
            problems.append(problem)

    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(error["loc"])
            if loc[:1] == ("stages",) and len(loc) > 2:
                continue  # stage bodies get their own, more precise, validation below
            report(loc, _message(error, Recipe, loc))

    recipe_dir = path.parent.resolve()
    stages = _validate_stages(data, recipe_dir, report, origins, deep)
    order: list[str] = []
    if stages is not None:
        order = _check_graph(stages, report)
        if recipe is not None:
            from posttrain.evaluation.gates import gate_stages

            for i, gate in enumerate(recipe.gates):
                for name in gate_stages(gate):
                    if name not in stages:
                        report(("gates", i), f"gate {gate.name!r} reads stage {name!r}, which is not in the recipe")
    launch_kinds = (data.get("launch") or {}).get("kinds") if isinstance(data.get("launch"), dict) else None
    if isinstance(launch_kinds, dict):  # read raw: said even when other launch settings are wrong too
        runnable = set(known_kinds()) | {"prepare_data"}  # a select step is no job: nothing to launch
        for kind in launch_kinds:
            if str(kind) not in runnable:
                report(("launch", "kinds", kind), f"unknown stage kind {kind!r}{_suggest(kind, sorted(runnable))}")
    if problems:
        raise RecipeError(sorted(problems, key=lambda p: (p.file != shown, p.line or 0)))
    assert recipe is not None
    return LoadedRecipe(path.resolve(), recipe, profile, list(overrides), stages, order)


def _apply_profile(data: dict, profile: str | None, lines: dict, origins: _Origins, shown: str, problems: list) -> dict:
    profiles = data.get("profiles") or {}
    if profile is None:
        return data
    if not isinstance(profiles, dict) or profile not in profiles:
        known = ", ".join(sorted(profiles)) if isinstance(profiles, dict) and profiles else "none defined"
        line = lines.get(("profiles",), lines.get((), 1))
        problems.append(Problem(shown, line, "profiles", f"profile {profile!r} does not exist (known: {known})"))
        return data
    body = profiles[profile]
    if body is None:
        return data
    if not isinstance(body, dict):
        problems.append(Problem(shown, lines.get(("profiles", profile)), f"profiles.{profile}", "must be a mapping"))
        return data
    for forbidden in ("profiles", "name"):
        if forbidden in body:
            line = lines.get(("profiles", profile, forbidden))
            problems.append(Problem(shown, line, f"profiles.{profile}.{forbidden}", "a profile cannot change this"))
    merged = deep_merge(data, {k: v for k, v in body.items() if k not in ("profiles", "name")})
    prefix = ("profiles", profile)
    for key_path, line in lines.items():
        if key_path[:2] == prefix and len(key_path) > 2:
            origins.where[key_path[2:]] = (shown, line)
    return merged


def _validate_stages(data: dict, recipe_dir: Path, report, origins: _Origins, deep: bool = False
                     ) -> dict[str, ResolvedStage] | None:
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, dict):
        return None
    defaults = data.get("defaults") if isinstance(data.get("defaults"), dict) else {}
    kinds = known_kinds()
    for kind in defaults:
        if kind not in kinds:
            report(("defaults", kind), f"unknown stage kind {kind!r}{_suggest(str(kind), kinds)}")
    resolved: dict[str, ResolvedStage] = {}

    for name, spec in _source_models(data):
        stage = get_stage("model")
        try:
            config = stage.Config.model_validate({"kind": "model", **spec})
        except ValidationError:
            continue  # already reported by the Recipe model
        for key, message in stage.validate(config, recipe_dir):
            loc = (BASE,) if name == BASE else ("models", name)
            report(loc + tuple(key.split(".")), message)
        resolved[name] = ResolvedStage(name, "model", stage, config, {})

    model_names = {n for n, _ in _source_models(data)} | {BASE}
    swept = sweep_candidates(raw_stages, report)
    selections: dict[str, tuple] = {}
    for name, body in raw_stages.items():
        loc = ("stages", name)
        stage = _stage_kind(name, body, loc, model_names, kinds, report)
        if stage is None:
            continue
        kind = body["kind"]
        body = rewrite_references(name, kind, {k: v for k, v in body.items() if k != "sweep"}, swept, selections, report)
        kind_defaults = defaults.get(kind) if isinstance(defaults.get(kind), dict) else {}
        for stage_name, label, overrides, places in swept.get(name) or [(name, None, {}, {})]:
            candidate = body
            for dotted, value in overrides.items():
                candidate = apply_override(candidate, dotted, value)
            if overrides:  # again, for selections a candidate's own values bring (a variant's models)
                candidate = rewrite_references(name, kind, candidate, swept, selections, report)
            config = _validated(stage, kind, deep_merge(kind_defaults, candidate), loc, places, origins, report)
            if config is None:
                continue
            if stage_name == name or stage_name == swept[name][0][0]:  # a candidate's checks repeat the first's
                checks = stage.validate(config, recipe_dir) + (stage.deep_validate(config, recipe_dir) if deep else [])
                for key, message in checks:
                    report(_place(loc, key, places), message)
                for key, value in stage.local_files(config).items():
                    p = in_recipe(value, recipe_dir)
                    if not p.exists():
                        report(_place(loc, key, places), f"file not found: {p}")
            resolved[stage_name] = ResolvedStage(stage_name, kind, stage, config, stage.inputs(config),
                                                 (name, label, overrides) if label is not None else None)
    selection = Selection()
    for node, body in select_configs(selections, raw_stages, swept, report).items():
        config = selection.Config.model_validate(body)
        resolved[node] = ResolvedStage(node, selection.kind, selection, config, selection.inputs(config))
    for item in resolved.values():
        for path, ref in item.inputs.items():
            if ref in swept and item.kind != "select":
                where = ("stages", item.candidate[0] if item.candidate else item.name) + tuple(path.split("."))
                report(where, f"stage {ref!r} is swept into {len(swept[ref])} candidates: take one with "
                              f"{{best_of: {ref}, by: <eval stage>/<metric>, mode: min|max}}")
    _add_prepared_steps(resolved, report)
    return resolved


def _place(loc: tuple, key: str, places: dict[str, tuple]) -> tuple:
    """Where a problem with `key` was written: the sweep value that set it, or the stage's own key."""
    for dotted, place in places.items():
        if key == dotted or key.startswith(dotted + "."):
            return place
    return loc + tuple(key.split("."))


def _validated(stage: Stage, kind: str, body: dict[str, Any], loc: tuple, places: dict[str, tuple],
               origins: _Origins, report) -> StageConfig | None:
    """The stage's config, or None after reporting each problem where it was written: the stage's own
    line, the `defaults` entry that set it, or the sweep value that made it."""
    try:
        return stage.Config.model_validate(body)
    except ValidationError as exc:
        for error in exc.errors():
            sub = tuple(error["loc"])
            full = loc + sub
            anchor = full
            swept = next((place for dotted, place in places.items()
                          if tuple(dotted.split(".")) == tuple(str(s) for s in sub[:len(dotted.split("."))])), None)
            found, _, _ = origins.locate(full)
            default_found, _, _ = origins.locate(("defaults", kind) + sub)
            if swept:
                full = anchor = swept  # a swept value
            elif len(default_found) - 2 > len(found) - 2 and len(default_found) > 2:
                full = anchor = ("defaults", kind) + sub  # the bad value came from `defaults`
            report(full, _message(error, stage.Config, sub), anchor)
        return None


def tokenizer_origin(stages: dict[str, ResolvedStage], name: str) -> str:
    """The stage or model that last set the tokenizer `name`'s output carries: stages that keep their
    input's tokenizer (`Stage.keeps_tokenizer`) are followed back to their input."""
    item = stages[name]
    while True:
        kept = item.stage.keeps_tokenizer(item.config)
        if not kept or item.inputs.get(kept) not in stages:
            return item.name
        item = stages[item.inputs[kept]]


def _add_prepared_steps(resolved: dict[str, ResolvedStage], report) -> None:
    """Put a `prepare_data` step in front of every stage that reads data (`Stage.prepared_data`), named
    `<stage>.<input>`. Inputs that ask for the same data through the same tokenizer (an eval of several
    models, a sweep's candidates) share one step."""
    stage = get_stage("prepare_data")
    made: dict[tuple, str] = {}
    for name, item in list(resolved.items()):
        family = item.candidate[0] if item.candidate else name
        for input_name, body in item.stage.prepared_data(item.config).items():
            if body["model"] not in resolved:
                continue  # the stage's own reference to it is reported as unknown
            # Shuffled with the recipe's seed, not the stage's: candidates that differ in seed share the data.
            # It reads the tokenizer where it was last set, so it does not wait for the stages in between.
            origin = tokenizer_origin(resolved, body["model"])
            config = stage.Config.model_validate({"kind": "prepare_data", "seed": None, **body, "model": origin})
            settings = config.model_dump(mode="json")
            group = (family, json.dumps(settings, sort_keys=True))
            if group not in made:
                made[group] = f"{family}.{input_name}"
                if made[group] in resolved:
                    report(("stages", made[group]), f"the name {made[group]!r} is the data step posttrain adds "
                                                    f"for stage {family!r}: rename this stage")
                    continue
                resolved[made[group]] = ResolvedStage(made[group], "prepare_data", stage, config, stage.inputs(config))
            item.inputs[input_name] = made[group]


def _stage_kind(name: str, body, loc: tuple, model_names: set[str], kinds: list[str], report):
    """The stage class of one `stages:` entry, or None after reporting why it has none."""
    if name in RESERVED_NAMES or name in model_names:
        report(loc, f"stage name {name!r} is taken by {'the base model' if name == BASE else 'a model in models:'}")
        return None
    if not isinstance(body, dict):
        report(loc, "a stage must be a mapping with a `kind`")
        return None
    kind = body.get("kind")
    if kind is None:
        report(loc, f"missing `kind` (one of: {', '.join(k for k in kinds if k != 'model')})")
        return None
    if kind in INTERNAL_KINDS:
        report(loc + ("kind",), f"kind {kind!r} is added by posttrain itself, in front of the stages that need it")
        return None
    if not isinstance(kind, str) or kind not in kinds:
        report(loc + ("kind",), f"unknown stage kind {kind!r}{_suggest(str(kind), kinds)}")
        return None
    try:
        stage = get_stage(kind)
    except UserError as exc:
        report(loc + ("kind",), str(exc))
        return None
    return stage


def _source_models(data: dict) -> list[tuple[str, dict]]:
    found = []
    if isinstance(data.get("base"), dict):
        found.append((BASE, data["base"]))
    if isinstance(data.get("models"), dict):
        found.extend((n, s) for n, s in data["models"].items() if isinstance(s, dict))
    return found


def _check_graph(stages: dict[str, ResolvedStage], report) -> list[str]:
    """References must name known stages/models; the graph must have no cycle. Returns a topological order."""
    names = sorted(stages)
    for item in stages.values():
        for key, ref in item.inputs.items():
            loc = ("stages", item.name) + tuple(key.split("."))
            if ref == item.name:
                report(loc, f"stage {item.name!r} cannot take itself as input")
            elif ref not in stages:
                report(loc, f"refers to {ref!r}, which is not a stage or model{_suggest(ref, names)}")
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = trail[trail.index(name):] + [name]
            report(("stages", name), "dependency cycle: " + " -> ".join(cycle))
            return
        state[name] = "active"
        for ref in stages[name].inputs.values():
            if ref in stages and ref != name:
                visit(ref, trail + [name])
        state[name] = "done"
        order.append(name)

    for name in stages:
        visit(name, [])
    return order


def _message(error: dict, model: type[BaseModel], loc: tuple) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key" + _suggest(str(loc[-1]), _field_names(model, loc[:-1]))
    if kind == "missing":
        return "required key is missing"
    return error["msg"].replace("Input should be", "must be").replace("Value error, ", "")


def _field_names(model: Any, loc: tuple) -> list[str]:
    """Field names of the (nested) model at `loc`, for 'did you mean' hints."""
    current = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = _unwrap(current.model_fields[part].annotation)
        elif isinstance(part, int):
            continue
        else:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    for arg in typing.get_args(annotation) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        inner = _unwrap(arg)
        if inner is not None and inner is not arg:
            return inner
    return annotation


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
