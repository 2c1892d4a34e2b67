"""Stages as jobs (issue 24): local slots and submitit's local executor run independent stages and
sweep candidates at once, a killed job is resubmitted and resumes, a failed stage stops only what
needs it, two drivers on one registry build each entry once, and a Slurm job script carries the
recipe's resources and the stage's inner launch (checked through a stand-in sbatch, no cluster)."""
from __future__ import annotations

import itertools
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY_MODEL, cli, count_runs, write_recipe
from posttrain.recipe.load import load_recipe
from posttrain.registry import Registry

EXECUTORS = {
    "local slots": ["--slots", "2"],
    "submitit local": ["launch.slurm.cluster=local", "--executor", "slurm"],
}


def sweep_recipe(folder: Path, steps: int = 6, sleep: float = 0.25) -> Path:
    """Three candidates of a swept stage (one of them, `boom`, fails when COUNT_FAIL is set), a stage
    on the `boom` candidate and one on `x`."""
    return write_recipe(folder, f"""
        name: jobs
        base: {{model: {TINY_MODEL}, chat_template: llama-3.1}}
        stages:
          cand: {{kind: count, steps: {steps}, sleep: {sleep}, sweep: {{grid: {{label: [x, y, boom]}}}}}}
          on_boom: {{kind: count, model: "cand[label=boom]", steps: 1, label: on_boom}}
          on_x: {{kind: count, model: "cand[label=x]", steps: 1, label: on_x}}
        """)


def count_recipe(folder: Path, name: str, body: str) -> Path:
    """A recipe of test `count` stages over the tiny model: `body` is everything after `base:`."""
    header = f"name: {name}\nbase: {{model: {TINY_MODEL}, chat_template: llama-3.1}}\n"
    return write_recipe(folder, header + textwrap.dedent(body).lstrip())


def drive(recipe: Path, executor: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`posttrain run RECIPE [overrides] --executor ...`: overrides come right after the recipe."""
    overrides = [a for a in executor if "=" in a and not a.startswith("-")]
    flags = [a for a in executor if a not in overrides]
    return subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe), *overrides, *flags],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def built(registry: Path) -> dict[str, dict]:
    """stage -> its entry's manifest, through the recipe's refs."""
    reg = Registry(registry)
    return {ref.split("/", 1)[1]: reg.load(key).manifest for ref, key in reg.refs().items()}


@pytest.mark.slow
@pytest.mark.parametrize("executor", [EXECUTORS["local slots"]], ids=["local slots"])
def test_candidates_run_at_once_and_build_what_the_sequential_run_builds(tmp_path, registry_dir, executor):
    recipe = sweep_recipe(tmp_path)
    parallel = drive(recipe, executor)
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr
    jobs = built(registry_dir)
    # The keys `plan` gives a fresh registry are the keys a one-stage-at-a-time run builds (this graph
    # has no selection; test_a_real_sweep_... compares with a real sequential run): an entry's key is
    # its whole history, so the lineage is the same too.
    from posttrain.runner import plan

    planned = {item.name: item.key for item in plan(load_recipe(recipe), Registry(tmp_path / "fresh"))}
    assert {n: m["key"] for n, m in jobs.items()} == planned
    assert all(m["inputs"] == {"model": planned[m["input_names"]["model"]]} for n, m in jobs.items() if n != "base")
    spans = {n: (m["timings"]["started"], m["timings"]["finished"]) for n, m in jobs.items() if n.startswith("cand")}
    overlaps = [(a, b) for (a, (s1, e1)), (b, (s2, e2)) in itertools.combinations(spans.items(), 2) if s1 < e2 and s2 < e1]
    assert overlaps, f"no two candidates ran at the same time: {spans}"
    # One line per state change, each naming the stage, and the closing table names the jobs.
    lines = parallel.stdout.splitlines()
    assert any("cand[label=y]" in line and " running " in line and " job " in line for line in lines)
    assert any("cand[label=y]" in line and " done " in line for line in lines)
    assert "ran (job " in parallel.stdout and "6 ran, 0 cached, 0 failed" in parallel.stdout
    # Job logs of built entries are what `gc` cleans up.
    swept = cli("gc", "--yes")
    assert swept.returncode == 0 and swept.stdout.count("removing jobs/") == 6, swept.stdout
    # Run again: everything is found in the registry, no job is started.
    again = drive(recipe, executor)
    assert again.returncode == 0 and "0 ran, 6 cached" in again.stdout, again.stdout
    assert " running " not in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("executor", [EXECUTORS["local slots"]], ids=["local slots"])
def test_a_failing_candidate_stops_only_what_needs_it(tmp_path, registry_dir, executor):
    recipe = sweep_recipe(tmp_path, steps=2, sleep=0.05)
    done = drive(recipe, executor, env={"COUNT_FAIL": "1"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "stage 'cand[label=boom]' failed" in done.stderr and "label boom asked to fail" in done.stderr
    assert "not started, as they need a failed stage: on_boom" in done.stderr
    assert "resume with: posttrain run" in done.stderr and "--executor" in done.stderr
    assert set(built(registry_dir)) == {"base", "cand[label=x]", "cand[label=y]", "on_x"}
    # A stage's own failure is not a preemption: it is not resubmitted.
    assert [line for line in count_runs(registry_dir) if " boom " in line][1:] == []
    # Fixed (the environment no longer fails it), the same command builds just what is missing.
    again = drive(recipe, executor)
    assert again.returncode == 0, again.stderr
    assert "2 ran, 4 cached" in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS.values(), ids=EXECUTORS.keys())
def test_a_job_killed_mid_stage_is_resubmitted_and_resumes(tmp_path, registry_dir, executor):
    recipe = count_recipe(tmp_path, "killed", """
        stages:
          long: {kind: count, steps: 40, sleep: 0.1, label: long}
          after: {kind: count, model: long, steps: 1, label: after}
        """)
    overrides = [a for a in executor if "=" in a]
    driver = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe), *overrides,
                               *[a for a in executor if a not in overrides]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    victim = None
    while time.time() < deadline and victim is None:
        progress = list(registry_dir.glob("work/*/progress.json"))
        if progress and json.loads(progress[0].read_text())["done"] >= 5:
            victim = int(next(l for l in count_runs(registry_dir) if " long " in l).split("pid=")[1].split()[0])
        time.sleep(0.05)
    assert victim, "the stage never got going"
    os.kill(victim, signal.SIGKILL)  # what a preempted node or an OOM kill looks like to the job
    out, err = driver.communicate(timeout=180)
    assert driver.returncode == 0, out + err
    assert "killed" in out and "resubmitting" in out and "attempt 2 of 3" in out
    starts = [line for line in count_runs(registry_dir) if " long " in line]
    assert len(starts) == 2 and starts[0].endswith("start=0")
    assert int(starts[1].split("start=")[1]) >= 5  # resumed from its in-stage progress, not from 0
    assert built(registry_dir)["long"]["metrics"]["steps"] == 40


@pytest.mark.slow
def test_ctrl_c_stops_the_local_jobs_which_keep_their_work(tmp_path, registry_dir):
    recipe = count_recipe(tmp_path, "stopped", """
        stages:
          long: {kind: count, steps: 40, sleep: 0.1, label: long}
        """)
    driver = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--slots", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        progress = list(registry_dir.glob("work/*/progress.json"))
        if progress and json.loads(progress[0].read_text())["done"] >= 3:
            break
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=90)
    assert driver.returncode == 130, out + err
    assert "interrupted; work so far is kept. Resume with: posttrain run" in err and "--slots 2" in err
    job = int(next(line for line in count_runs(registry_dir) if " long " in line).split("pid=")[1].split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(job, 0)  # the job stopped with its driver
    again = drive(recipe, ["--slots", "2"])
    assert again.returncode == 0, again.stderr
    assert int(count_runs(registry_dir)[-1].split("start=")[1]) >= 3


@pytest.mark.slow
def test_two_drivers_on_one_registry_build_each_entry_once(tmp_path, registry_dir):
    recipe = sweep_recipe(tmp_path, steps=6, sleep=0.2)
    drivers = [subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--slots", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [d.communicate(timeout=240) for d in drivers]
    assert all(d.returncode == 0 for d in drivers), results
    runs = [line.split(" pid=")[0] for line in count_runs(registry_dir)]
    assert sorted(runs) == sorted(set(runs)) and len(runs) == 5, runs  # every count stage built once
    # Each driver's table covers every stage, whoever built it.
    assert all("cand[label=boom]" in out for out, _ in results)


@pytest.mark.slow
def test_plan_says_where_each_stage_runs(tmp_path):
    recipe = count_recipe(tmp_path, "where", """
        launch:
          executor: local
          slots: 4
          gpus_per_slot: 2
        stages:
          a: {kind: count, steps: 1}
        """)
    shown = cli("plan", str(recipe))
    assert shown.returncode == 0, shown.stderr
    assert "executor: local, 4 slots, 2 GPUs each" in shown.stdout


def _fake_slurm(bin_dir: Path, job_id: int = 4242) -> Path:
    """`sbatch` and `srun` stand-ins: sbatch copies the script it is given and answers like Slurm."""
    bin_dir.mkdir()
    scripts = bin_dir / "scripts"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {scripts}.last\necho "Submitted batch job {job_id}"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod((bin_dir / tool).stat().st_mode | stat.S_IEXEC)
    return Path(f"{scripts}.last")


def test_the_slurm_job_script_carries_the_recipes_resources_and_the_inner_launch(tmp_path, monkeypatch):
    from posttrain.execution.driver import JobOptions, job_command
    from posttrain.execution.jobs import JobSpec
    from posttrain.execution.slurm import SubmititSlurm

    script = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    config = ROOT / "configs" / "accelerate" / "fsdp.yaml"
    recipe = write_recipe(tmp_path, f"""
        name: cluster
        base: {{model: {TINY_MODEL}, chat_template: llama-3.1}}
        launch:
          num_processes: 16
          accelerate_config: {config}
          executor: slurm
          slurm:
            partition: h100
            account: arcee
            nodes: 2
            gpus_per_node: 8
            cpus_per_task: 96
            mem_gb: 1800
            time: 2-00:00:00
            sbatch: {{constraint: ib, exclusive: true, reservation: posttrain}}
            setup: ["module load cuda/12.4"]
          kinds:
            merge: {{num_processes: 1, slurm: {{nodes: 1, gpus_per_node: 0, time: "04:00:00"}}}}
        stages:
          sft:
            kind: sft
            data: {{sources: [{{path: {ROOT / 'data' / 'sft' / 'tiny_chat_train.jsonl'}}}]}}
          soup: {{kind: merge, method: linear, models: [{{model: base}}, {{model: sft}}], parameters: {{weight: 0.5}}}}
        """)
    loaded = load_recipe(recipe)
    launch, reg = loaded.recipe.launch, Registry(tmp_path / "registry")
    transport = SubmititSlurm(reg.root / "jobs", lambda kind: launch.for_kind(kind).slurm)
    key = "a" * 64
    argv = job_command(loaded, reg, "sft", key, launch, JobOptions())
    job = transport.submit(JobSpec("sft", "sft", key, argv, reg.root / "jobs" / key / "attempt-1.log", nodes=2))
    assert job.job_id == "4242"
    text = script.read_text()
    for line in ("#SBATCH --partition=h100", "#SBATCH --account=arcee", "#SBATCH --nodes=2",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=96",
                 "#SBATCH --mem=1800GB", "#SBATCH --time=2880", "#SBATCH --constraint=ib", "#SBATCH --exclusive",
                 "#SBATCH --reservation=posttrain", "#SBATCH --job-name=posttrain:sft", "module load cuda/12.4"):
        assert line in text, (line, text)
    # The inner launch: accelerate across the job's GPUs, 8 processes on each of the 2 nodes, the
    # recipe's FSDP config, this stage and the key the driver expects.
    echoed = next(line for line in text.splitlines() if line.startswith("echo") and "posttrain job:" in line)
    for part in ("posttrain.cli run", str(recipe), "--stage sft", f"--expect-key {key}", "--launcher accelerate",
                 "--nproc 8", f"--accelerate-config {config}", f"--registry {reg.root}"):
        assert part in echoed, (part, echoed)
    assert argv == [sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--registry", str(reg.root),
                    "--stage", "sft", "--expect-key", key, "--launcher", "accelerate", "--nproc", "8",
                    "--accelerate-config", str(config)]
    # A merge needs no 8-GPU node and no launch: the kind's own settings.
    merge_argv = job_command(loaded, reg, "soup", key, launch, JobOptions())
    assert "--launcher" not in merge_argv
    transport.submit(JobSpec("soup", "merge", key, merge_argv, reg.root / "jobs" / key / "attempt-2.log"))
    text = script.read_text()
    assert "#SBATCH --nodes=1" in text and "--gpus-per-node" not in text and "#SBATCH --time=240" in text
    assert "#SBATCH --partition=h100" in text and "#SBATCH --account=arcee" in text
    # Overridden from the command line or the Python API (here: --nproc 4), the kinds' own settings hold.
    again = type(launch).model_validate({**launch.model_dump(exclude_unset=True), "num_processes": 4})
    assert "--launcher" not in job_command(loaded, reg, "soup", key, again, JobOptions())
    assert job_command(loaded, reg, "sft", key, again, JobOptions())[-4:-2] == ["--nproc", "2"]  # 4 over 2 nodes
    assert again.for_kind("merge").slurm.time == "04:00:00" and again.for_kind("sft").slurm.gpus_per_node == 8


def test_a_multi_node_stage_tells_each_launcher_its_node(tmp_path):
    from posttrain.cli import build_parser, launch_command

    args = build_parser().parse_args(["run", "r.yaml", "--stage", "sft", "--expect-key", "k" * 64, "--launcher",
                                      "accelerate", "--nproc", "8", "--nnodes", "2", "--node-rank", "1",
                                      "--main-address", "node017"])
    command = launch_command(args)
    joined = " ".join(command)
    assert "--num_processes 16 --num_machines 2 --machine_rank 1 --main_process_ip node017 --main_process_port 29500" in joined
    assert joined.endswith(f"run r.yaml --stage sft --expect-key {'k' * 64}")
    args.launcher = "torchrun"
    joined = " ".join(launch_command(args))
    assert "--nproc_per_node 8 --nnodes 2 --node_rank 1 --master_addr node017 --master_port 29500" in joined


@pytest.mark.slow
def test_slurm_without_slurm_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, but no sbatch/srun
    recipe = sweep_recipe(tmp_path)
    done = cli("run", str(recipe), "--executor", "slurm")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "posttrain: launch.executor slurm: sbatch/srun are not on PATH here (run the driver on a Slurm login "
        "node; launch.slurm.cluster: local tries the same jobs on this machine)"]


@pytest.mark.slow
def test_a_job_refuses_a_key_that_changed_since_it_was_submitted(tmp_path, registry_dir):
    recipe = sweep_recipe(tmp_path)
    assert cli("run", str(recipe), "--stage", "base").returncode == 0
    stale = cli("run", str(recipe), "--stage", "cand[label=x]", "--expect-key", "0" * 64)
    assert stale.returncode == 2
    assert "now has key" in stale.stderr and "nothing was built" in stale.stderr
    missing = cli("run", str(recipe), "--stage", "on_x")
    assert missing.returncode == 2 and "its input 'cand[label=x]'" in missing.stderr and "not in the registry" in missing.stderr
    assert count_runs(registry_dir) == []


def test_launch_settings_are_validated_where_they_are_written(tmp_path):
    recipe = count_recipe(tmp_path, "bad", """
        launch:
          executor: kubernetes
          slurm: {time: soon, gpu_per_node: 8}
          kinds:
            merg: {num_processes: 1}
        stages:
          a: {kind: count}
        """)
    done = cli("validate", str(recipe))
    assert done.returncode == 2
    assert "recipe.yaml:4: launch.executor:" in done.stderr
    assert "launch.slurm.time:" in done.stderr and "launch.slurm.gpu_per_node: unknown key" in done.stderr
    assert "launch.kinds.merg: unknown stage kind" in done.stderr


@pytest.mark.slow
def test_the_tiny_flagship_in_two_slots_builds_what_the_sequential_run_builds(tmp_path):
    """The README's main job with `--slots 2`: every stage's key (so its lineage) and every selection
    equal to the one-stage-at-a-time run's, with sweep candidates running at once. CI makes both runs
    before the tests (.ci/run passes their registries); run by hand, this test makes them itself."""
    flagship = ROOT / "recipes" / "intellect1_instruct.yaml"
    sequential = Path(os.environ.get("POSTTRAIN_FLAGSHIP_REGISTRY") or tmp_path / "sequential")
    slots = Path(os.environ.get("POSTTRAIN_FLAGSHIP_SLOTS_REGISTRY") or tmp_path / "slots")
    for registry, extra in ((sequential, ()), (slots, ("--slots", "2"))):
        if not (registry / "refs").is_dir():
            done = cli("run", str(flagship), "--profile", "tiny", "--registry", str(registry), *extra, timeout=900)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # gates included
    jobs, one_by_one = built(slots), built(sequential)
    assert set(jobs) == set(one_by_one) and len(jobs) > 30
    assert {n: m["key"] for n, m in jobs.items()} == {n: m["key"] for n, m in one_by_one.items()}

    def choices(manifests):
        return {n: {p: s["chosen"] for p, s in m.get("selections", {}).items()} for n, m in manifests.items()}

    assert choices(jobs) == choices(one_by_one)
    spans = [(m["timings"]["started"], m["timings"]["finished"]) for n, m in jobs.items() if n.startswith("sft[")]
    assert any(s1 < e2 and s2 < e1 for (s1, e1), (s2, e2) in itertools.combinations(spans, 2))
    # Built by jobs: each entry's log names the `--stage` command that built it.
    assert all("--stage" in " ".join(m["host"]["argv"]) for n, m in jobs.items() if n.startswith("sft["))


class _SynchronousTransport:
    """Builds each job in this process when the driver first polls it: the entry is committed just
    before the driver learns that the job ended (what a fast job looks like to a driver that polls)."""

    name = "synchronous"

    def __init__(self):
        self.count = 0

    def free(self) -> bool:
        return True

    def submit(self, spec):
        from posttrain.cli import main
        from posttrain.execution.jobs import JobEnd

        self.count += 1

        class Job:
            job_id = str(self.count)

            def started(self) -> bool:
                return True

            def poll(self):
                return JobEnd(main(spec.argv[3:]), "FINISHED")  # after `python -m posttrain.cli`

            def stop(self) -> None:
                pass

        return Job()

    def describe(self, kind: str) -> str:
        return "synchronous"

    def keeps_running_without_driver(self) -> bool:
        return False


@pytest.mark.slow
def test_a_selection_resolves_when_its_eval_is_the_last_job_to_end(tmp_path, registry_dir):
    from test_sweeps import recipe as sweep_sft_recipe

    from posttrain.execution.driver import Driver, JobOptions

    loaded = load_recipe(sweep_sft_recipe(tmp_path))
    lines: list[str] = []
    result = Driver(loaded, Registry(registry_dir), _SynchronousTransport(), loaded.recipe.launch, JobOptions(),
                    echo=lines.append, poll_seconds=0).run()
    assert not result.failed and not result.blocked, "\n".join(lines)
    assert result.selections["sft.best"]["chosen"] == "sft[learning_rate=0.003]"
    assert {"more", "soup"} <= set(result.ran)
