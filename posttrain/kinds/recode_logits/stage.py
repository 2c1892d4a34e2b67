"""`kind: recode_logits`: store an existing teacher capture in another encoding, without the teacher.

A capture of a 405B teacher over billions of tokens costs thousands of GPU hours; choosing a smaller
encoding afterwards (fp16 -> compact, ~4x fewer bytes at V = 128256) should cost a read and a write.
The entry has the capture's layout and metadata (teacher, tokenizer hash, data fingerprint), so a
`distill` stage takes it as `teacher_logits` exactly like the capture it came from.

    teacher_logits_compact:
      kind: recode_logits
      capture: teacher_logits      # a capture_logits (or another recode_logits) stage
      encoding: compact
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from posttrain.kinds.base import Stage, StageConfig, StageContext


class RecodeConfig(StageConfig):
    kind: Literal["recode_logits"] = "recode_logits"
    capture: str = Field(description="The capture_logits (or recode_logits) stage whose shards are re-encoded.")
    encoding: Literal["fp16", "q8", "q10", "q12", "compact"] = Field(
        "compact", description="The new encoding (see capture_logits). Values already quantised by the "
                               "source's encoding stay as they were stored, never better.")
    mass: float | None = Field(None, gt=0, le=1, description="compact only: per position, keep the fewest "
                                                             "best entries whose probability reaches this mass.")


class RecodeLogitsStage(Stage):
    kind = "recode_logits"
    version = "1"
    Config = RecodeConfig
    produces = "logits"
    runs_on_every_rank = False  # reading and writing shards: one process

    def inputs(self, config: RecodeConfig) -> dict[str, str]:
        return {"capture": config.capture}

    def validate(self, config: RecodeConfig, recipe_dir) -> list[tuple[str, str]]:
        if config.mass is not None and config.encoding != "compact":
            return [("mass", "a variable number of entries per position needs encoding: compact")]
        return []

    def run(self, config: RecodeConfig, ctx: StageContext) -> dict[str, Any]:
        from posttrain.kinds.recode_logits.run import recode_capture

        return recode_capture(ctx.inputs["capture"].path, ctx.out_dir, ctx.work_dir / "shards",
                              config.encoding, config.mass, progress=ctx.progress)
