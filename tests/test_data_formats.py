"""The data layer: every format gives the same tokens; bad rows are named by file, row and field."""
from __future__ import annotations

import json

import pytest

from conftest import TINY_MODEL
from posttrain.data.formats import to_messages
from posttrain.data.sources import DataConfig
from support.in_memory import load_conversations
from posttrain.core.errors import UserError

CONVERSATION = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]
SAME_CONVERSATION_IN_EVERY_FORMAT = {
    "messages": {"messages": CONVERSATION},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "5"}]},
    "alpaca": {"instruction": "What is 2 plus 3?", "input": "", "output": "5"},
    "prompt_completion": {"prompt": "What is 2 plus 3?", "completion": "5"},
    "prompt_completion_conversational": {"prompt": [CONVERSATION[0]], "completion": [CONVERSATION[1]]},
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from posttrain.hf.tokenizer_setup import attach_chat_template

    folder = tmp_path_factory.mktemp("tok")
    attach_chat_template(TINY_MODEL, folder, "llama-3.1", folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_every_format_gives_the_same_token_ids(tokenizer):
    from posttrain.data.tokens import tokenize_row

    tokens = {name: tokenize_row(tokenizer, to_messages(row), 512, True)
              for name, row in SAME_CONVERSATION_IN_EVERY_FORMAT.items()}
    reference = tokens["messages"]
    for name, got in tokens.items():
        assert got == reference, name


@pytest.mark.slow
def test_labels_are_masked_exactly_outside_assistant_content(tokenizer):
    from posttrain.data.tokens import IGNORE, tokenize_row

    row = {"messages": [{"role": "system", "content": "Be brief."}, *CONVERSATION,
                        {"role": "user", "content": "And 1 plus 1?"}, {"role": "assistant", "content": "2"}]}
    ids, labels, truncated = tokenize_row(tokenizer, row, 512, assistant_only=True)
    assert not truncated and len(ids) == len(labels)
    trained = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE])
    masked = tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE])
    # Only the two answers and the <|eot_id|> closing each of them are learned...
    assert trained == "5<|eot_id|>2<|eot_id|>"
    # ...the headers, system prompt and user turns are not (the headers before each answer included).
    assert masked.count("<|start_header_id|>assistant<|end_header_id|>") == 2
    assert "Be brief." in masked and "What is 2 plus 3?" in masked and "5" not in masked.split("assistant")[1][:4]
    assert all(l == t for t, l in zip(ids, labels) if l != IGNORE)


@pytest.mark.slow
def test_plain_text_is_trained_whole_and_ends_with_eos(tokenizer):
    from posttrain.data.tokens import tokenize_row

    ids, labels, _ = tokenize_row(tokenizer, to_messages({"text": "hello world"}), 512, True)
    assert labels == ids and ids[-1] == tokenizer.eos_token_id


@pytest.mark.slow
def test_overlong_rows_are_truncated_and_flagged(tokenizer):
    from posttrain.data.tokens import tokenize_row

    ids, labels, truncated = tokenize_row(tokenizer, {"messages": CONVERSATION}, 10, True)
    assert truncated and len(ids) == 10 == len(labels)


BAD_ROWS = {
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
                     "row 2: field messages.0.role: unknown role 'bot'"),
    "missing role": ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]},
                     "row 2: field messages.0.role: missing 'role'"),
    "empty content": ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]},
                      "row 2: field messages.0.content: content is empty"),
    "non-string content": ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
                           "row 2: field messages.0.content: content must be a string, not int"),
    "ends with user": ({"messages": [{"role": "user", "content": "x"}]},
                       "row 2: field messages: conversation must end with an assistant turn"),
    "sharegpt bad speaker": ({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]},
                             "row 2: field conversations.0.from: unknown role 'robot'"),
    "alpaca missing output": ({"instruction": "x", "output": None},
                              "row 2: field output: missing field 'output'"),
    "unknown turn field": ({"messages": [{"role": "user", "content": "x", "mood": "sad"},
                                         {"role": "assistant", "content": "y"}]},
                           "row 2: field messages.0: unknown field(s) ['mood'] in turn"),
    "late system turn": ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                                       {"role": "assistant", "content": "y"}]},
                         "row 2: field messages.1: a system turn may only come first"),
    "unrecognised columns": ({"question": "x", "answer": "y"},
                             "row 2: cannot tell the format from columns ['answer', 'question']"),
    "empty messages": ({"messages": []}, "row 2: field messages: messages must be a non-empty list of turns"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_is_named_precisely(case, tmp_path):
    row, expected = BAD_ROWS[case]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps(row) + "\n")
    config = DataConfig(sources=[{"path": str(data)}])
    with pytest.raises(UserError) as err:
        load_conversations(config, tmp_path, seed=0)
    assert f"{data}: {expected}" in str(err.value)
    rows, stats = load_conversations(DataConfig(sources=[{"path": str(data)}], on_bad_rows="skip"), tmp_path, 0)
    assert len(rows) == 1 and stats["bad_rows_skipped"] == 1


def test_invalid_json_line_is_named(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n{oops\n")
    with pytest.raises(UserError, match=r"d.jsonl: row 2: invalid JSON"):
        load_conversations(DataConfig(sources=[{"path": str(data)}]), tmp_path, 0)


def test_mixture_weights_and_caps_are_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, word in ((a, "A"), (b, "B")):
        path.write_text("".join(json.dumps({"prompt": f"{word}{i}", "completion": "x"}) + "\n" for i in range(10)))
    config = DataConfig(sources=[{"path": str(a), "weight": 0.5}, {"path": str(b), "max_samples": 3}])
    rows, stats = load_conversations(config, tmp_path, seed=7)
    firsts = [r["messages"][0]["content"][0] for r in rows]
    assert firsts.count("A") == 5 and firsts.count("B") == 3 and stats["rows_used"] == 8
    assert load_conversations(config, tmp_path, seed=7)[0] == rows
    assert load_conversations(config, tmp_path, seed=8)[0] != rows
    doubled, _ = load_conversations(DataConfig(sources=[{"path": str(a), "weight": 2}]), tmp_path, 0)
    assert len(doubled) == 20


@pytest.mark.slow
def test_columns_mapping_and_csv_and_parquet(tmp_path):
    import datasets

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.csv", "d.parquet"):
        config = DataConfig(sources=[{"path": name, "columns": {"question": "prompt", "answer": "completion"}}])
        got, _ = load_conversations(config, tmp_path, 0)
        assert sorted(r["messages"][1]["content"] for r in got) == ["a0", "a1", "a2", "a3"]


@pytest.mark.slow
def test_hub_style_source_and_named_eval_split(tmp_path):
    """`hub:` goes through datasets.load_dataset, exercised offline on a local dataset folder."""
    from support.in_memory import load_eval_rows

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(6)))
    (folder / "test.jsonl").write_text(json.dumps({"prompt": "held", "completion": "out"}) + "\n")
    config = DataConfig(sources=[{"hub": str(folder), "split": "train"}],
                        eval_sources=[{"hub": str(folder), "split": "test"}])
    rows, stats = load_conversations(config, tmp_path, 0)
    assert stats["rows_used"] == 6
    held = load_eval_rows(config, tmp_path, 0, load_conversations)
    # Each row carries the index of the source it came from (for per-source counts).
    assert held == [{"messages": [{"role": "user", "content": "held"}, {"role": "assistant", "content": "out"}],
                     "source": 0}]
