"""Stage kinds used only by the tests, registered through the `posttrain.stages` entry-point group
exactly as a third-party package would register its own."""
from __future__ import annotations

import json
import os
import time
from typing import Literal

from posttrain.kinds import Stage, StageConfig, StageContext


class CountConfig(StageConfig):
    kind: Literal["count"] = "count"
    model: str = "base"
    steps: int = 3
    sleep: float = 0.0
    label: str = "x"


class CountStage(Stage):
    """Counts to `steps`, saving progress to the work folder after each step so a re-run resumes."""

    kind = "count"
    version = "1"
    Config = CountConfig
    produces = "files"

    def inputs(self, config: CountConfig) -> dict[str, str]:
        return {"model": config.model}

    # Hooks, overridden as a plugin does (a built-in kind keeps them in its hooks.py instead).
    def headline_metrics(self) -> tuple[str, ...]:
        return ("steps",)

    def curves(self) -> dict[str, str]:
        return {}

    def memory_estimate(self, config: CountConfig, arch, launch) -> str:
        return f"a counter to {config.steps} (no model in memory)"

    def run(self, config: CountConfig, ctx: StageContext) -> dict:
        progress_file = ctx.work_dir / "progress.json"
        start = json.loads(progress_file.read_text())["done"] if progress_file.exists() else 0
        runs_file = ctx.work_dir.parent.parent / "count-runs.log"  # test bookkeeping, outside entries
        with open(runs_file, "a") as fh:
            fh.write(f"{ctx.name} {config.label} pid={os.getpid()} start={start}\n")
        if config.label == "boom" and os.environ.get("COUNT_FAIL"):
            raise RuntimeError("label boom asked to fail")
        for step in range(start, config.steps):
            time.sleep(config.sleep)
            tmp = progress_file.with_suffix(".tmp")  # atomic, so a kill never leaves a torn checkpoint
            tmp.write_text(json.dumps({"done": step + 1}))
            os.replace(tmp, progress_file)
        upstream = ctx.inputs["model"]
        (ctx.out_dir / "result.json").write_text(json.dumps({"count": config.steps, "label": config.label,
                                                             "input": upstream.key}))
        return {"steps": config.steps, "resumed_from": start}
