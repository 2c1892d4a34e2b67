"""`posttrain` command line. User errors print one clear message and exit non-zero, never a traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from posttrain.core import signals
from posttrain.core.errors import UserError
from posttrain.core.context import in_recipe


def _registry_for(args, loaded=None):
    """The registry a command works on, found one way for every command: `--registry`, else the
    recipe's `registry:` (when the command names a recipe, or passes the one it loaded), else
    POSTTRAIN_REGISTRY or the default."""
    from posttrain.registry import Registry, resolve_root
    from posttrain.runner import open_registry

    if loaded is None and getattr(args, "recipe", None):
        from posttrain.recipe import load_recipe

        loaded = load_recipe(args.recipe)
    return open_registry(loaded, args.registry) if loaded is not None else Registry(resolve_root(args.registry))


def cmd_validate(args) -> int:
    from posttrain.recipe import load_recipe

    loaded = load_recipe(args.recipe_file, args.profile, args.overrides, deep=True)
    stages = [n for n in loaded.order if loaded.stages[n].kind != "model" or n != "base"]
    print(f"{args.recipe_file}: ok — {len(stages)} stages: {' -> '.join(stages)}")
    return _validate_data(loaded, args.data) if args.data else 0


def _validate_data(loaded, rows: int) -> int:
    """Read `rows` rows of every data source of every stage and say what training would accept."""
    from posttrain.data.inspect import format_report, inspect_data
    from posttrain.data.sources import row_normaliser

    failed = False
    for name in loaded.order:  # each prepared-data step once (candidates and evals share them)
        item = loaded.stages[name]
        if item.kind != "prepare_data":
            continue
        data = item.config.data
        reports = inspect_data(data, loaded.dir, row_normaliser(item.config.format), rows)
        print("\n".join(format_report(f"{name} (first {rows} rows of each source)", reports)))
        failed |= not all(r.usable for r in reports)
    if failed:
        print("posttrain: some sources give no usable rows (see above)", file=sys.stderr)
        return 2
    return 0


def cmd_plan(args) -> int:
    from posttrain.recipe import load_recipe
    from posttrain.registry import short
    from posttrain.runner import plan

    loaded = load_recipe(args.recipe_file, args.profile, args.overrides)
    registry = _registry_for(args, loaded)
    items = plan(loaded, registry)
    print(f"recipe {loaded.ref_namespace}  registry {registry.root}")
    width = max(len(i.name) for i in items)
    for item in items:
        inputs = ", ".join(sorted(set(loaded.stages[item.name].inputs.values()))) or "-"
        key = short(item.key) if item.key != "-" else "pending"
        print(f"  {item.name:<{width}}  {item.kind:<14} {item.status:<7} {key:<12}  <- {inputs:<20} {item.reason}")
    todo = sum(i.status not in ("cached", "select") for i in items)
    print(f"{todo} of {len(items)} stages would run")
    launch = loaded.recipe.launch
    print(f"memory estimates ({launch.num_processes} process{'es' if launch.num_processes > 1 else ''}"
          f"{', ' + launch.accelerate_config if launch.accelerate_config else ''}):")
    for item in items:
        if item.memory != "-":  # prepared data: streamed, nothing to estimate
            print(f"  {item.name:<{width}}  {item.memory}")
    from posttrain.execution.driver import placement

    header, where = placement(loaded, executor_settings(args, loaded))
    print(header + (":" if where else ""))
    for item in items:
        if item.name in where and item.status not in ("cached", "select"):
            print(f"  {item.name:<{width}}  {where[item.name]}")
    return 0


def launch_command(args, launch=None, recipe_dir: Path | None = None) -> list[str]:
    """The same `posttrain run`, started once per process by torchrun or accelerate.

    Unset process counts and accelerate config come from the recipe's `launch:` section.
    """
    if launch is not None:
        if not args.nproc and launch.num_processes > 1:
            args.nproc = launch.num_processes
        if args.launcher == "accelerate" and not args.accelerate_config and launch.accelerate_config:
            args.accelerate_config = str(in_recipe(launch.accelerate_config, recipe_dir or Path(".")))
    inner = ["-m", "posttrain.cli", "run", args.recipe_file, *args.overrides]
    if args.profile:
        inner += ["--profile", args.profile]
    if args.registry:
        inner += ["--registry", args.registry]
    if getattr(args, "verbose", False):
        inner += ["--verbose"]
    if getattr(args, "stage", None):  # one stage, as an executor's job builds it
        inner += ["--stage", args.stage] + (["--expect-key", args.expect_key] if args.expect_key else [])
    nodes = getattr(args, "nnodes", None) or 1
    if args.launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc or 2)]
        if nodes > 1:
            command += ["--nnodes", str(nodes), "--node_rank", str(args.node_rank),
                        "--master_addr", args.main_address, "--master_port", str(args.main_port)]
        return command + inner
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if args.accelerate_config:
        if not Path(args.accelerate_config).is_file():
            raise UserError(f"accelerate config not found: {args.accelerate_config}")
        command += ["--config_file", args.accelerate_config]
    if args.nproc:
        command += ["--num_processes", str(args.nproc * nodes)]  # accelerate counts every machine's
    if nodes > 1:
        command += ["--num_machines", str(nodes), "--machine_rank", str(args.node_rank),
                    "--main_process_ip", args.main_address, "--main_process_port", str(args.main_port)]
    return command + inner


def launch_options(args) -> str:
    """The `--launcher ...` options of this command, shell-quoted, for 'resume with:' lines."""
    import shlex

    options = ["--launcher", args.launcher]
    if args.nproc:
        options += ["--nproc", str(args.nproc)]
    if args.accelerate_config:
        options += ["--accelerate-config", args.accelerate_config]
    return " ".join(shlex.quote(o) for o in options)


def run_launched(command: list[str], options: str) -> int:
    """Run the launch, passing its output through; once a process has named a failed stage, what
    torchrun's agent prints about the exit (tracebacks of the launcher itself, per-rank exit codes) is
    left out: the stage's message and its rank logs say what happened."""
    import subprocess

    from posttrain.recipe.load import LAUNCH_OPTIONS_ENV

    env = {**os.environ, LAUNCH_OPTIONS_ENV: options}
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    reported = False
    for line in child.stderr:
        if line.startswith("posttrain: "):
            reported = True
        elif reported and not line.startswith("  resume with:"):
            continue
        sys.stderr.write(line)
        sys.stderr.flush()
    return child.wait()


def executor_settings(args, loaded):
    """The recipe's `launch:` with the command line's --executor / --slots written over it."""
    update = {}
    if getattr(args, "executor", None):
        update["executor"] = args.executor
    if getattr(args, "slots", None) is not None:
        if args.slots < 1:
            raise UserError(f"--slots must be at least 1, not {args.slots}")
        update["slots"] = args.slots
        update.setdefault("executor", "local")
    return loaded.recipe.launch.model_copy(update=update) if update else loaded.recipe.launch


def cmd_run(args) -> int:
    from posttrain.recipe import load_recipe
    from posttrain.runner import StageFailed, rank_info, run

    loaded = load_recipe(args.recipe_file, args.profile, args.overrides)
    launch = executor_settings(args, loaded)
    if getattr(args, "stage", None) and not getattr(args, "launcher", None):
        return _build_one(args, loaded)
    if not getattr(args, "stage", None) and (launch.executor == "slurm" or launch.slots > 1):
        return _drive(args, loaded, launch)
    if getattr(args, "launcher", None):
        command = launch_command(args, loaded.recipe.launch, loaded.dir)
        print("launching:", " ".join(command), flush=True)
        return run_launched(command, launch_options(args))
    if rank_info()[0] != 0:  # one process speaks for all
        sys.stdout = open(os.devnull, "w")
        sys.stderr = open(os.devnull, "w")  # its failures are in its rank log; rank 0 names the stage
    started = time.time()
    try:
        result = run(loaded, registry=args.registry, quiet=not args.verbose)
    except StageFailed as exc:
        print(f"posttrain: {exc}", file=sys.stderr)
        if "resume with" not in str(exc):
            print(f"  resume with: {loaded.command()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"\nposttrain: interrupted; work so far is kept. Resume with: {loaded.command()}", file=sys.stderr)
        return 130
    print(f"{len(result.ran)} ran, {len(result.cached)} cached in {time.time() - started:.1f}s; "
          f"refs under {loaded.ref_namespace}/ in {result.registry.root}")
    print("\n".join(_summary_table(result)))
    return _print_gates(result)


def _build_one(args, loaded) -> int:
    """`run --stage NAME`: build one stage whose inputs are in the registry (what a job runs)."""
    from posttrain.runner import StageFailed, build_stage, rank_info

    if rank_info()[0] != 0:
        sys.stdout = open(os.devnull, "w")
        sys.stderr = open(os.devnull, "w")
    try:
        build_stage(loaded, args.stage, registry=args.registry, expect_key=args.expect_key, quiet=not args.verbose)
    except StageFailed as exc:
        print(f"posttrain: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"\nposttrain: stage {args.stage!r} interrupted; work so far is kept", file=sys.stderr)
        return 130
    return 0


def _drive(args, loaded, launch) -> int:
    """Every stage a job: `slots` local subprocesses, or Slurm jobs through submitit."""
    from posttrain.execution.driver import JobOptions, executor_options, run_as_jobs

    registry = _registry_for(args, loaded)
    own = {}  # --nproc / --accelerate-config: the training stages' own launch inside their jobs
    if args.nproc:
        own["num_processes"] = args.nproc
    if args.accelerate_config:
        if not Path(args.accelerate_config).is_file():
            raise UserError(f"accelerate config not found: {args.accelerate_config}")
        own["accelerate_config"] = str(Path(args.accelerate_config).resolve())
    launch = type(launch).model_validate({**launch.model_dump(exclude_unset=True), **own}) if own else launch
    started = time.time()
    resume = f"{loaded.command()} {executor_options(launch)}"
    if args.launcher:
        resume += f" {launch_options(args)}"
    try:
        result = run_as_jobs(loaded, registry, launch, JobOptions(launcher=args.launcher, verbose=args.verbose),
                             echo=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(f"\nposttrain: interrupted; work so far is kept. Resume with: {resume}", file=sys.stderr)
        return 130
    print(f"{len(result.ran)} ran, {len(result.cached)} cached, {len(result.failed)} failed, "
          f"{len(result.blocked)} not started in {time.time() - started:.1f}s; refs under "
          f"{loaded.ref_namespace}/ in {registry.root}")
    print("\n".join(_summary_table(result)))
    if result.failed:
        for name, why in result.failed.items():
            print(f"posttrain: stage {name!r} failed: {why}", file=sys.stderr)
        if result.blocked:
            print(f"posttrain: not started, as they need a failed stage: {', '.join(result.blocked)}", file=sys.stderr)
        print(f"  resume with: {resume}", file=sys.stderr)
        return 1
    return _print_gates(result)


def _print_gates(result) -> int:
    if result.gates:
        for gate in result.gates:
            print(f"gate {'PASS' if gate.passed else 'FAIL'}  {gate.name}: {gate.detail}")
        failed = [g.name for g in result.gates if not g.passed]
        if failed:
            print(f"posttrain: {len(failed)} quality gate(s) failed: {', '.join(failed)}", file=sys.stderr)
            return 3
    return 0


def _summary_table(result) -> list[str]:
    """stage, kind, status, time and the key metric of every stage of the run."""
    from posttrain.runner import headline

    rows = [("stage", "kind", "status", "time", "key metric")]
    for name, entry in result.entries.items():
        if name in result.selections:  # a select step: the candidate it chose
            found = result.selections[name]
            rows.append((name, "select", "chose", "-", f"{found['chosen']} ({found['by']} {found['score']:.4g})"))
            continue
        metrics = entry.manifest.get("metrics", {})
        seconds = entry.manifest.get("timings", {}).get("seconds")
        key_metric = headline(entry.kind, metrics).strip()
        jobs = result.jobs.get(name)
        status = ("ran" if name in result.ran else "cached") + (f" (job {jobs[-1]})" if jobs and name in result.ran else "")
        rows.append((name, entry.kind, status, f"{seconds:.1f}s" if isinstance(seconds, (int, float)) else "-",
                     key_metric))
    for name, why in result.failed.items():
        jobs = result.jobs.get(name)
        rows.append((name, result.recipe.stages[name].kind, "FAILED" + (f" (job {jobs[-1]})" if jobs else ""), "-",
                     why.splitlines()[0][:80]))
    for name, why in result.blocked.items():
        rows.append((name, result.recipe.stages[name].kind, "not run", "-", why))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def cmd_ls(args) -> int:
    from posttrain.registry import CorruptEntry, short

    registry = _registry_for(args)
    refs_by_key: dict[str, list[str]] = {}
    for ref, key in registry.refs().items():
        refs_by_key.setdefault(key, []).append(ref)
    keys = registry.keys()
    if not keys:
        print(f"registry {registry.root} is empty")
        return 0
    print(f"registry {registry.root}")
    print(f"  {'KEY':<12}  {'KIND':<14} {'CREATED':<16} {'SIZE':>9}  REFS")
    for key in keys:
        try:
            entry = registry.load(key)
        except CorruptEntry as exc:
            print(f"  {short(key):<12}  CORRUPT: {exc}")
            continue
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.manifest.get("timings", {}).get("finished", 0)))
        size = sum(f["size"] for f in entry.manifest.get("files", {}).values())
        refs = ", ".join(sorted(refs_by_key.get(key, []))) or "-"
        print(f"  {short(key):<12}  {entry.kind:<14} {created:<16} {_human(size):>9}  {refs}")
    return 0


def cmd_show(args) -> int:
    from posttrain.hf.model_card import lineage_lines
    from posttrain.registry import CorruptEntry

    registry = _registry_for(args)
    key = registry.resolve(args.ref)
    try:
        entry = registry.load(key)
    except CorruptEntry as exc:
        raise UserError(f"{exc} (run `posttrain verify`; the next run rebuilds it)") from exc
    except KeyError:
        raise UserError(f"entry {key[:12]} is not in {registry.root}") from None
    m = entry.manifest
    refs = [r for r, k in registry.refs().items() if k == key]
    print(f"key      {key}\nkind     {m.get('kind')}\nstage    {m.get('stage')} (recipe {m.get('recipe')})")
    print(f"path     {entry.path}\nrefs     {', '.join(refs) or '-'}")
    print(f"built    {time.ctime(m.get('timings', {}).get('finished', 0))} in {m.get('timings', {}).get('seconds')}s")
    print("lineage")
    print(f"  - {m.get('stage')} ({m.get('kind')})")
    for line in lineage_lines(registry, m.get("inputs", {}), m.get("input_names", {}), depth=2):
        print(line.replace("**", "").replace("`", ""))
    print("config")
    print("  " + json.dumps(m.get("config", {}), indent=2).replace("\n", "\n  "))
    metrics = m.get("metrics", {})
    if metrics:
        print("metrics")
        for name, value in sorted(metrics.items()):
            if isinstance(value, list):
                value = f"[{len(value)} points] last={value[-1] if value else None}"
            elif isinstance(value, dict):
                value = json.dumps(value)[:200]
            print(f"  {name}: {value}")
    return 0


def cmd_verify(args) -> int:
    from posttrain.registry import short

    registry = _registry_for(args)
    keys = [registry.resolve(r) for r in args.refs] if args.refs else None
    report = registry.verify(keys)
    bad = {k: p for k, p in report.items() if p}
    for key, problems in report.items():
        for problem in problems:
            print(f"CORRUPT {short(key)}: {problem}")
        if problems and registry.entry_dir(key).exists():
            print(f"  set aside as {registry.discard(key).relative_to(registry.root)}: no run will use it")
    print(f"verified {len(report)} entries in {registry.root}: {len(report) - len(bad)} ok, {len(bad)} corrupt")
    if bad:
        print("the next run that needs a set-aside entry rebuilds it")
    return 1 if bad else 0


def cmd_gc(args) -> int:
    from posttrain.execution.jobs import job_folders, remove_job_folder

    registry = _registry_for(args)
    job_logs = job_folders(registry, include_unbuilt=args.include_work)
    garbage = registry.garbage(include_work=args.include_work) + job_logs
    total = sum(_size(p) for p in garbage)
    for path in garbage:
        size = _human(_size(path))
        if args.yes and not (remove_job_folder(registry, path) if path in job_logs else registry.remove(path)):
            print(f"kept {path.relative_to(registry.root)}: a running build uses it")
            continue
        print(f"{'removing' if args.yes else 'would remove'} {path.relative_to(registry.root)} ({size})")
    verb = "removed" if args.yes else "would free"
    print(f"{verb} {_human(total)} in {len(garbage)} items" + ("" if args.yes else "; pass --yes to delete"))
    return 0


def cmd_report(args) -> int:
    from posttrain import report as reporting
    from posttrain.registry import CorruptEntry

    target = args.target
    if Path(target).suffix in (".yaml", ".yml") or Path(target).is_file():
        from posttrain.recipe import load_recipe

        loaded = load_recipe(target, args.profile, args.overrides)
        registry = _registry_for(args, loaded)
        entries, missing = {}, []
        for name in loaded.order:
            key = registry.get_ref(f"{loaded.ref_namespace}/{name}")
            entry = registry.get(key) if key else None
            (entries.__setitem__(name, entry) if entry else missing.append(name))
        title = loaded.ref_namespace
        if missing:
            print(f"not built yet (run the recipe first): {', '.join(missing)}")
    else:
        registry = _registry_for(args)
        key = registry.resolve(target)
        try:
            top = registry.load(key)
        except (KeyError, CorruptEntry) as exc:
            raise UserError(f"cannot report on {target}: {exc}") from None
        found = [e for e in map(registry.get, registry.lineage(key)) if e is not None]
        found.sort(key=lambda e: e.manifest.get("timings", {}).get("finished", 0))  # build order
        entries = {e.manifest.get("stage", e.key[:12]): e for e in found}
        title = top.manifest.get("ref", target)
    if not entries:
        raise UserError(f"nothing to report for {target}: no built entries")
    report = reporting.build(title, entries)
    out = Path(args.out) if args.out else Path("reports") / title.replace("/", "_")
    written = reporting.write(report, out)
    for line in reporting.table_lines(report):
        print(line)
    for name, kind, summary in reporting.training_summary(report):
        print(f"{name} ({kind}): {summary}")
    print(f"wrote {written['markdown']}, {written['html']} and {len(written) - 2} PNGs in {out}")
    return 0


def cmd_export(args) -> int:
    from posttrain.publish.export import export_model

    registry = _registry_for(args)
    exported = export_model(registry, args.ref, Path(args.folder), dtype=args.dtype, force=args.force)
    print(f"exported {args.ref} ({exported.key[:12]}) to {exported.folder}: {len(exported.files)} files, "
          f"weights {exported.dtype or 'in mixed dtypes'}, {len(exported.evaluations)} evaluation(s) in the card")
    return 0


def cmd_push(args) -> int:
    from posttrain.publish.push import push_model

    registry = _registry_for(args)
    pushed = push_model(registry, args.ref, args.repo_id, revision=args.revision, private=args.private,
                        overwrite=args.overwrite, dtype=args.dtype)
    print(f"pushed {args.ref} ({pushed.key[:12]}) to {pushed.repo_id} on {pushed.revision!r}: "
          f"{len(pushed.files)} files" + (f"\n  {pushed.url}" if pushed.url else ""))
    return 0


def cmd_recode(args) -> int:
    """Re-encode a capture folder outside the registry (in a recipe: `kind: recode_logits`)."""
    import shutil
    import tempfile

    from posttrain.kinds.recode_logits.run import recode_capture

    source, target = Path(args.source).expanduser().resolve(), Path(args.target).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target} exists and is not empty: choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.recode"  # finished shards survive a kill: rerun to resume
    with tempfile.TemporaryDirectory(prefix=".recode-", dir=target.parent) as scratch:
        metrics = recode_capture(source, Path(scratch) / "out", staging, args.encoding, args.mass)
        if target.exists():
            target.rmdir()
        (Path(scratch) / "out").rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    print(f"recoded {metrics['shards']} shard(s) of {source} from {metrics['from_encoding']} to {args.encoding}: "
          f"{_human(metrics['source_bytes'])} -> {_human(metrics['bytes'])} ({metrics['bytes_per_token']} B/token, "
          f"mean |value change| {metrics['mean_abs_value_error'] or 0:.2g}) in {target}")
    return 0


def cmd_schema(args) -> int:
    from posttrain.recipe.schema import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))
    return 0


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="Post-train a base model into an instruct model from one YAML recipe.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def recipe_verb(name: str, func, help_text: str):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("recipe_file", metavar="RECIPE", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. stages.sft.training.learning_rate=2e-5")
        p.add_argument("--profile", "-p", help="apply a named profile from the recipe, e.g. tiny")
        p.add_argument("--registry", help="registry folder (default: $POSTTRAIN_REGISTRY, the recipe's, or ~/.cache/posttrain/registry)")
        p.set_defaults(func=func)
        return p

    run_parser = recipe_verb("run", cmd_run, "run every stage not already in the registry")
    run_parser.add_argument("--launcher", choices=["torchrun", "accelerate"],
                            help="start one process per device (each runs the stages; rank 0 writes the registry)")
    run_parser.add_argument("--nproc", type=int, default=None, help="processes per machine (torchrun default: 2)")
    run_parser.add_argument("--accelerate-config", help="an accelerate config file, e.g. configs/accelerate/fsdp.yaml")
    run_parser.add_argument("--executor", choices=["local", "slurm"],
                            help="local: on this machine (with --slots N, N stages at once, each a job of its "
                                 "own); slurm: each stage a Slurm job through submitit (default: the recipe's "
                                 "launch.executor)")
    run_parser.add_argument("--slots", type=int, default=None,
                            help="local executor: stages at once (default: the recipe's launch.slots, 1)")
    run_parser.add_argument("--stage", metavar="NAME",
                            help="build only this stage; its inputs must be in the registry (what a job runs)")
    run_parser.add_argument("--expect-key", help=argparse.SUPPRESS)  # the key the submitting driver computed
    for flag, kind in (("--nnodes", int), ("--node-rank", int), ("--main-address", str), ("--main-port", int)):
        run_parser.add_argument(flag, type=kind, default=29500 if flag == "--main-port" else None,
                                help=argparse.SUPPRESS)  # set by a multi-node Slurm job for its launcher
    run_parser.add_argument("--verbose", "-v", action="store_true",
                            help="stream every library's output to the console (by default it goes to each "
                                 "stage's log, and the console shows one line per stage)")
    plan_parser = recipe_verb("plan", cmd_plan, "show what would run, what is cached, and why")
    plan_parser.add_argument("--executor", choices=["local", "slurm"], help="as for run: where stages would run")
    plan_parser.add_argument("--slots", type=int, default=None, help="as for run: local stages at once")
    validate = recipe_verb("validate", cmd_validate, "check a recipe and report every error at once (no side effects)")
    validate.add_argument("--data", type=int, nargs="?", const=200, default=0, metavar="ROWS",
                          help="also read ROWS rows (default 200) of every data source and report per source "
                               "what training would accept (streams hub datasets; nothing is trained)")

    def registry_verb(name: str, func, help_text: str):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--registry", help="registry folder")
        p.add_argument("--recipe", "-r", help="use the registry this recipe names")
        p.set_defaults(func=func)
        return p

    registry_verb("ls", cmd_ls, "list registry entries and their refs")
    show = registry_verb("show", cmd_show, "config, metrics and lineage of one entry")
    show.add_argument("ref", metavar="REF|KEY", help="recipe/stage ref or key (prefix)")
    verify = registry_verb("verify", cmd_verify, "check every file of entries against its sha256")
    verify.add_argument("refs", nargs="*", metavar="REF|KEY")
    gc = registry_verb("gc", cmd_gc, "remove entries no ref reaches and leftovers of killed runs (dry run unless --yes)")
    gc.add_argument("--yes", action="store_true", help="really delete")
    gc.add_argument("--include-work", action="store_true", help="also delete work folders of interrupted runs")
    export = registry_verb("export", cmd_export, "write a model entry as a Hub-style folder: weights, tokenizer "
                           "with template, generation config, and a model card with lineage, metrics and recipe")
    export.add_argument("ref", metavar="REF|KEY", help="recipe/stage ref or key (prefix) of a model entry")
    export.add_argument("folder", metavar="DIR", help="the folder to write (must not exist or be empty)")
    export.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="cast the weights (default: the dtype the entry stores, that of its base model)")
    export.add_argument("--force", action="store_true", help="replace DIR if it holds files")
    push = registry_verb("push", cmd_push, "export a model entry and upload it to the Hugging Face Hub "
                         "(token from `hf auth login` or HF_TOKEN)")
    push.add_argument("ref", metavar="REF|KEY", help="recipe/stage ref or key (prefix) of a model entry")
    push.add_argument("repo_id", metavar="ORG/NAME", help="the Hub repository (created if missing)")
    push.add_argument("--revision", help="branch to push to (created if missing; default main)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--overwrite", action="store_true",
                      help="replace what the repository already holds on that branch")
    push.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="as for export")
    recode = sub.add_parser("recode", help="re-encode a teacher-logit capture folder (e.g. fp16 -> compact) "
                            "without the teacher", description="re-encode a capture folder outside the registry "
                            "(written by capture_logits, read by distill's teacher_logits_path); in a recipe, "
                            "use a `kind: recode_logits` stage instead")
    recode.add_argument("source", metavar="SRC", help="a capture folder (index.json and shards)")
    recode.add_argument("target", metavar="DST", help="the folder to write (must not exist or be empty)")
    recode.add_argument("--encoding", default="compact", choices=["fp16", "q8", "q10", "q12", "compact"])
    recode.add_argument("--mass", type=float, help="compact only: keep the fewest best entries reaching this mass")
    recode.set_defaults(func=cmd_recode)
    report = sub.add_parser("report", help="metrics table, loss curves and lineage graph (Markdown + HTML)",
                            description="metrics table (stages as columns, deltas against base), loss curves "
                                        "per training stage and the lineage graph, as Markdown and HTML")
    report.add_argument("target", metavar="RECIPE|REF", help="a recipe file, or a ref/key (its lineage)")
    report.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    report.add_argument("--profile", "-p")
    report.add_argument("--registry")
    report.add_argument("--out", "-o", help="output folder (default: reports/<recipe>)")
    report.set_defaults(func=cmd_report)
    schema = sub.add_parser("schema", help="print the recipe JSON schema (for editor autocompletion)")
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signals.install()
    try:
        return args.func(args)
    except UserError as exc:
        print(f"posttrain: {exc}" if "\n" not in str(exc) else str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nposttrain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
