"""Resume only from a checkpoint the Trainer finished writing."""
from __future__ import annotations

import pytest

from posttrain.training.checkpoints import last_complete_checkpoint


def test_cut_short_checkpoints_are_skipped(tmp_path):
    for step, state in ((5, '{"global_step": 5}'), (10, '{"global_step": 10}'), (15, ""), (20, '{"global_st')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-25").mkdir()  # killed before trainer_state.json was started
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-10"
    assert last_complete_checkpoint(tmp_path / "missing") is None


@pytest.mark.slow
def test_no_in_stage_checkpoint_at_the_last_step():
    """The entry is saved right after training: a checkpoint at max_steps only costs a full optimizer
    state on disk (4x the training time of a 30-step 1B run on an H100) and, resumed from, an extra step."""
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import DefaultFlowCallback

    from posttrain.training.checkpoints import no_final_checkpoint

    args = TrainingArguments(output_dir="unused", save_strategy="steps", save_steps=2, report_to=[], use_cpu=True)
    saved = []
    for step in range(1, 5):
        state, control = TrainerState(max_steps=4, global_step=step, save_steps=2), TrainerControl()
        for callback in (DefaultFlowCallback(), no_final_checkpoint()):  # the Trainer's order: defaults first
            control = callback.on_step_end(args, state, control) or control
        if control.should_save:
            saved.append(step)
    assert saved == [2]
