"""`posttrain report`: the metrics table with deltas, Markdown/HTML, and PNGs that contain the curves."""
from __future__ import annotations

import pytest

import numpy as np
import yaml

import posttrain
from conftest import ROOT, TINY_MODEL, cli, write_recipe

TRAIN = ROOT / "data" / "sft" / "tiny_chat_train.jsonl"
HELDOUT = ROOT / "data" / "sft" / "tiny_chat_heldout.jsonl"


def pipeline(folder):
    body = {"name": "reptest", "base": {"model": str(TINY_MODEL), "chat_template": "llama-3.1"},
            "stages": {
                "sft": {"kind": "sft", "data": {"sources": [{"path": str(TRAIN)}], "test_size": 16, "max_length": 96},
                        "training": {"max_steps": 12, "per_device_train_batch_size": 16, "learning_rate": 3e-3,
                                     "eval_strategy": "steps", "eval_steps": 4}},
                "eval": {"kind": "eval", "models": ["base", "sft"],
                         "perplexity": {"sources": [{"path": str(HELDOUT), "max_samples": 8}]}}}}
    return write_recipe(folder, yaml.safe_dump(body, sort_keys=False))


def colored_pixels(png, rgb, tolerance=0.08) -> int:
    import matplotlib.image

    image = matplotlib.image.imread(png)[..., :3]
    return int((np.abs(image - np.array(rgb)).max(-1) < tolerance).sum())


@pytest.mark.slow
def test_report_table_files_and_curves(tmp_path, registry_dir):
    recipe = pipeline(tmp_path)
    posttrain.run(recipe)
    out = tmp_path / "out"
    result = cli("report", str(recipe), "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["metric", "base", "sft"]  # stages as columns, in the recipe's order
    loss_row = next(line for line in lines if line.startswith("heldout/loss"))
    assert "(-" in loss_row  # SFT's delta against base: the held-out loss fell
    md = (out / "report.md").read_text()
    assert "| metric | base | sft |" in md and "![lineage](lineage.png)" in md and "![sft](curves-sft.png)" in md
    assert "<table>" in (out / "report.html").read_text()
    # The curve PNG holds the plotted lines: matplotlib's first two colours (train and eval loss).
    assert colored_pixels(out / "curves-sft.png", (0.122, 0.467, 0.706)) > 200
    assert colored_pixels(out / "curves-sft.png", (1.0, 0.498, 0.055)) > 50
    assert colored_pixels(out / "lineage.png", (0.859, 0.914, 0.965)) > 500  # node boxes


@pytest.mark.slow
def test_report_on_a_ref_follows_its_lineage(tmp_path, registry_dir):
    posttrain.run(pipeline(tmp_path))
    out = tmp_path / "ref-out"
    result = cli("report", "reptest/sft", "--out", str(out), "--registry", str(registry_dir))
    assert result.returncode == 0, result.stderr
    assert (out / "curves-sft.png").is_file() and (out / "lineage.png").is_file()
    assert "| sft | sft |" in (out / "report.md").read_text()


def test_report_on_an_unknown_ref_is_one_clear_error(tmp_path, registry_dir):
    result = cli("report", "nope/nothing", "--registry", str(registry_dir))
    assert result.returncode == 2 and "no ref 'nope/nothing'" in result.stderr and "Traceback" not in result.stderr
