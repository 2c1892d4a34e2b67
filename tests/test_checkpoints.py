"""Resume only from a checkpoint the Trainer finished writing."""
from __future__ import annotations

from posttrain.training.checkpoints import last_complete_checkpoint


def test_cut_short_checkpoints_are_skipped(tmp_path):
    for step, state in ((5, '{"global_step": 5}'), (10, '{"global_step": 10}'), (15, ""), (20, '{"global_st')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-25").mkdir()  # killed before trainer_state.json was started
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-10"
    assert last_complete_checkpoint(tmp_path / "missing") is None
