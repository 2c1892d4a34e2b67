"""The body of a prepared-data step: the model input's tokenizer (with the stage's template) and the
data config -> `posttrain.data.prepare`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from posttrain.core.context import StageContext
from posttrain.data.prepare import prepare
from posttrain.training.splits import tokenization_fingerprint
from posttrain.training.trainer_common import load_chat_tokenizer

if TYPE_CHECKING:  # the config class, for the signature only (the stage module imports this one)
    from posttrain.kinds.prepare_data.stage import PrepareDataConfig


def run_prepare(config: PrepareDataConfig, ctx: StageContext) -> dict[str, Any]:
    tokenizer = load_chat_tokenizer(ctx.inputs["model"].path, config.chat_template, ctx)
    if config.format == "preference" and not tokenizer.chat_template:
        from posttrain.core.errors import UserError

        raise UserError("the model's tokenizer has no chat template; set base.chat_template (e.g. llama-3.1) "
                        "or the stage's chat_template")
    stats = prepare(config.format, config.data, tokenizer, ctx.recipe_dir, ctx.seed, ctx.out_dir,
                    ctx.work_dir / "prepare", assistant_only=config.assistant_only, progress=ctx.progress)
    stats["tokenization"] = tokenization_fingerprint(tokenizer)
    return stats
