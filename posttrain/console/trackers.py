"""Experiment trackers (`training.report_to: [wandb | mlflow | trackio | tensorboard]`) named and
labelled by posttrain.

The trackers themselves are transformers' integrations, started by the Trainer. This module only
makes each run findable: it is named `<recipe>/<stage>` (with the profile, e.g. `flagship@tiny/sft`),
filed under the recipe's name as the project or experiment unless the user chose one
(WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME, `training.project`), and carries the stage's lineage and
resolved config (input stages with their registry keys, the entry's key) next to the Trainer's own
arguments. The runner writes those facts to the stage's work folder (`tracking.json`) before the
stage starts.

Reporting never changes what a stage writes: stage bodies import this through `posttrain.console`,
which stage keys leave out (`code_fingerprint.NEUTRAL`), so changing how runs are labelled rebuilds
nothing. A tracker that fails to take the labels only logs a warning.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

TRACKING_FILE = "tracking.json"
log = logging.getLogger("posttrain.trackers")

# Where each tracker takes its project from when the Trainer does not pass one.
PROJECT_VARIABLES = {"wandb": "WANDB_PROJECT", "mlflow": "MLFLOW_EXPERIMENT_NAME"}


def tracking_facts(work_dir: Path) -> dict[str, Any] | None:
    """What the runner wrote for this stage, or None (e.g. a stage body called outside a run)."""
    try:
        return json.loads((Path(work_dir) / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return None


def tracker_callbacks(ctx) -> list:
    """The Trainer callback that names and labels the stage's tracker runs (none outside a run)."""
    facts = tracking_facts(ctx.work_dir)
    if facts is None:
        return []
    from transformers import TrainerCallback

    class LabelTrackerRuns(TrainerCallback):
        def __init__(self):
            self.set_variables: list[str] = []

        def on_init_end(self, args, state, control, **kwargs):
            # Before any integration starts its run (they start in on_train_begin).
            if args.run_name is None or args.run_name == args.output_dir:
                args.run_name = facts["run_name"]
            if args.project == "huggingface":  # transformers' placeholder (trackio's project)
                args.project = facts["project"]
            for tracker, variable in PROJECT_VARIABLES.items():
                if tracker in (args.report_to or []) and variable not in os.environ:
                    os.environ[variable] = facts["project"]
                    self.set_variables.append(variable)

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            for tracker in args.report_to or []:
                attach = ATTACH.get(tracker)
                if attach is None:
                    continue
                try:
                    attach(facts, args)
                except Exception as exc:  # reporting must never fail training
                    log.warning("could not attach the lineage to the %s run: %s", tracker, exc)

        def on_train_end(self, args, state, control, **kwargs):
            # transformers leaves wandb's and mlflow's runs open, and the next stage's Trainer in this
            # process would log into them: the stage's run ends with the stage.
            if state.is_world_process_zero:
                for tracker in args.report_to or []:
                    try:
                        FINISH.get(tracker, lambda facts: None)(facts)
                    except Exception as exc:
                        log.warning("could not close the %s run: %s", tracker, exc)
            for variable in self.set_variables:  # later stages in this process choose their own
                os.environ.pop(variable, None)
            self.set_variables.clear()

    return [LabelTrackerRuns()]


def _labels(facts: dict[str, Any]) -> dict[str, str]:
    return {"posttrain.recipe": facts["recipe"], "posttrain.stage": facts["stage"], "posttrain.kind": facts["kind"],
            "posttrain.key": facts["key"]}


def _attach_wandb(facts: dict[str, Any], args) -> None:
    import wandb

    if wandb.run is None:
        return
    wandb.run.config.update({"posttrain": facts}, allow_val_change=True)
    wandb.run.tags = tuple(dict.fromkeys([*(wandb.run.tags or ()), "posttrain", facts["kind"]]))


def _attach_mlflow(facts: dict[str, Any], args) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.set_tags(_labels(facts))
    mlflow.log_dict(facts, "posttrain/lineage.json")


def _attach_trackio(facts: dict[str, Any], args) -> None:
    import trackio

    trackio.config.update({"posttrain": facts}, allow_val_change=True)


def _attach_tensorboard(facts: dict[str, Any], args) -> None:
    """A text summary beside the Trainer's scalars (the newest run folder, which its callback just made)."""
    from torch.utils.tensorboard import SummaryWriter

    folder = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if folder is None:
        runs = [p for p in (Path(args.output_dir) / "runs").glob("*") if p.is_dir()]
        if not runs:
            return
        folder = str(max(runs, key=lambda p: p.stat().st_mtime))
    writer = SummaryWriter(log_dir=folder)
    writer.add_text("posttrain/lineage", "```\n" + json.dumps(facts, indent=2) + "\n```")
    writer.close()


def _finish_wandb(facts: dict[str, Any]) -> None:
    import wandb

    if wandb.run is not None and wandb.run.name == facts["run_name"]:
        wandb.finish()


def _finish_mlflow(facts: dict[str, Any]) -> None:
    import mlflow

    run = mlflow.active_run()
    if run is not None and run.data.tags.get("posttrain.key") == facts["key"]:
        mlflow.end_run()


FINISH = {"wandb": _finish_wandb, "mlflow": _finish_mlflow}
ATTACH = {"wandb": _attach_wandb, "mlflow": _attach_mlflow, "trackio": _attach_trackio,
          "tensorboard": _attach_tensorboard}
