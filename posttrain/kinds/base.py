"""What a stage is: a config model, its inputs, and a `run` that fills a fresh directory.

Stages know nothing about the registry or the recipe's other stages: the runner hands them resolved
inputs (folders of finished entries) and an output folder, and stores what they write.
Heavy libraries (torch, transformers, trl) are imported inside `run`, so validating or planning a
recipe stays fast.
"""
from __future__ import annotations

import difflib
import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

from pydantic import Field

from posttrain.core.context import InputEntry, StageContext  # noqa: F401 - part of the plugin API
from posttrain.core.strict import StrictModel


class StageConfig(StrictModel):
    """Fields every stage has. A kind's config subclasses this and narrows `kind` to a Literal."""

    kind: str
    description: str | None = None
    seed: int | None = Field(None, description="Overrides the recipe seed for this stage.")


# Set by posttrain itself: a recipe must not override these through `training:`.
RESERVED_TRAINING_KEYS = {"output_dir", "max_length", "assistant_only_loss", "packing", "padding_free",
                          "gradient_checkpointing", "activation_checkpointing", "seed", "dataset_text_field", "resume_from_checkpoint"}


class LoraSettings(StrictModel):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainsWeights(StrictModel):
    """Fields of every stage that trains a model's weights (sft, dpo, distill)."""

    master_weights: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype of the weights the optimizer updates. float32 (default) with training.bf16: "
                               "true computes in bf16 under autocast; bfloat16 trains pure-bf16 weights, which "
                               "lose small updates.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (explicit: trl "
                                                            "would otherwise turn it on).")
    save_steps: int = Field(50, gt=0, description="In-stage checkpoint interval (for resume).")
    training: dict[str, Any] = Field(default_factory=dict, description="Any field of the stage's trainer config "
                                     "(TrainingArguments; trl SFTConfig for sft, DPOConfig for dpo).")


class ChatTraining(StrictModel):
    """Fields of the stages that train on chat data through trl (sft, dpo)."""

    lora: LoraSettings | None = Field(None, description="Train a LoRA adapter (merged into the output).")
    chat_template: str | None = Field(
        None, description="Replace the input's chat template (a known name, .jinja file or text); saved in the output.")


def check_training_keys(training: dict[str, Any], trl_config: tuple[str, str] | None = ("trainer/sft_config.py", "SFTConfig")
                        ) -> list[tuple[str, str]]:
    """`training:` keys must be fields of TrainingArguments (and of the trl config, if the stage uses one)."""
    from posttrain.hf.training_fields import trainer_fields

    known = trainer_fields(trl_config)
    problems = []
    for key in training:
        if key in RESERVED_TRAINING_KEYS:
            problems.append((f"training.{key}", "set by posttrain; use the stage's own setting instead"))
        elif known and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            owner = f"TrainingArguments/{trl_config[1]}" if trl_config else "TrainingArguments"
            problems.append((f"training.{key}", f"not a {owner} field{hint}"))
    return problems


class Stage(ABC):
    """Base class for stage kinds. Subclasses set the class attributes and implement `run`."""

    kind: ClassVar[str]
    # Bump when a change would make the stage produce different output for the same config: it is
    # part of every entry's key, so old entries are not reused by mistake.
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]]
    # Settings that change how a stage runs or reports, not what it writes: left out of entry keys, so
    # changing them never rebuilds a finished entry (dotted paths into the config).
    operational_keys: ClassVar[tuple[str, ...]] = (
        "save_steps", "training.logging_steps", "training.logging_first_step", "training.report_to",
        "training.save_total_limit", "training.dataloader_num_workers", "training.disable_tqdm",
        "data.workers", "data.decontaminate.workers", "data.warn_skipped_share")
    produces: ClassVar[Literal["model", "logits", "eval", "files", "data"]] = "model"
    # False for work that rank 0 does alone while the other ranks of a launch wait for its entry.
    runs_on_every_rank: ClassVar[bool] = True

    def inputs(self, config: StageConfig) -> dict[str, str]:
        """Map each input's dotted config path to the stage or model name it refers to."""
        return {}

    def prepared_data(self, config: StageConfig) -> dict[str, dict[str, Any]]:
        """Input name -> `prepare_data` config for each dataset this stage reads prepared (the loader adds
        a `<stage>.<input>` step for it and hands its entry to the stage as that input)."""
        return {}

    def keeps_tokenizer(self, config: StageConfig) -> str | None:
        """The input whose tokenizer this stage's output carries unchanged, if any: prepared data made
        with either tokenizer is the same, so its key follows the tokenizer back to where it was set."""
        return None

    def local_files(self, config: StageConfig) -> dict[str, str]:
        """Map dotted config paths to local files/folders this stage reads (checked, fingerprinted)."""
        return {}

    def validate(self, config: StageConfig, recipe_dir: Path) -> list[tuple[str, str]]:
        """Extra checks that need more than the config model: (dotted path, message) pairs."""
        return []

    def deep_validate(self, config: StageConfig, recipe_dir: Path) -> list[tuple[str, str]]:
        """Checks that need heavy libraries (e.g. mergekit's own config model). Run by `posttrain validate`
        and at the start of the stage, but not by `plan`/`run`'s fast path."""
        return []

    # -- hooks: what the kind knows about its own runs, for `plan`, the console and the report --------------
    # They change no output, so a built-in kind keeps them in `hooks.py` beside its stage module, which no
    # stage module imports: editing an estimate or a label never changes a key. A plugin may override
    # these methods instead.

    def hooks(self) -> ModuleType | None:
        """The kind's `hooks` module (beside its stage module), or None when it has none."""
        package = type(self).__module__.rpartition(".")[0]
        if not package:
            return None
        try:
            return importlib.import_module(f"{package}.hooks")
        except ModuleNotFoundError as exc:
            if exc.name == f"{package}.hooks":
                return None
            raise

    def memory_estimate(self, config: StageConfig, arch: Any, launch: Any) -> str | None:
        """`plan`'s one-line memory estimate for this stage on `arch` (a planning Architecture) under
        `launch`, or None when the kind makes none."""
        estimate = getattr(self.hooks(), "memory_estimate", None)
        return estimate(config, arch, launch) if estimate else None

    def memory_parts(self, config: StageConfig, arch: Any, launch: Any) -> dict[str, float]:
        """The parts of a training process's peak, in bytes (empty for kinds that do not train)."""
        parts = getattr(self.hooks(), "memory_parts", None)
        return parts(config, arch, launch) if parts else {}

    def headline_metrics(self) -> tuple[str, ...]:
        """The metrics worth a glance on the stage's closing line and in `run`'s table, first found first."""
        return tuple(getattr(self.hooks(), "HEADLINE_METRICS", ("final_train_loss", "final_eval_loss")))

    def spreads_over_launch(self) -> bool:
        """Whether the kind's work spreads over a launch's processes (training) when it runs as a job. A
        plugin says so with `uses_launch = True` on its Stage class; a built-in kind with `USES_LAUNCH`
        in its hooks (a scheduling fact that changes no output, so not in its key)."""
        declared = getattr(self, "uses_launch", None)
        return bool(declared if declared is not None else getattr(self.hooks(), "USES_LAUNCH", False))

    def curves(self) -> dict[str, str]:
        """Metric series worth plotting (the name the stage stores them under -> a label)."""
        return dict(getattr(self.hooks(), "CURVES", {"loss": "train loss", "eval_loss": "eval loss"}))

    @abstractmethod
    def run(self, config: StageConfig, ctx: StageContext) -> dict[str, Any]:
        """Do the work, write the result into `ctx.out_dir`, and return metrics for the manifest."""
