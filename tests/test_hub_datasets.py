"""The flagship's real datasets, as laid out on the hub, through the same `hub:` loading path.

Each dataset is a local folder shaped like its hub repo (tests/support/hub_datasets.py); the flagship
recipe's own source list is used with each hub id pointed at its folder, so names, configs and
column mappings are exactly what the recipe says.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, TINY_MODEL, cli, write_recipe
from posttrain.data.sources import DataConfig
from support.in_memory import load_conversations, load_preferences
from posttrain.core.errors import UserError
from support import hub_datasets
from support.hub_datasets import EXPECTED, TOOLACE_SYSTEM

FLAGSHIP = ROOT / "recipes" / "intellect1_instruct.yaml"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return hub_datasets.flagship_datasets(tmp_path_factory.mktemp("hub"))


def flagship_data(hub, stage: str) -> tuple[DataConfig, list[str]]:
    """The flagship stage's data settings with every hub id pointed at its local hub-style folder."""
    from posttrain.recipe import load_recipe

    data = load_recipe(FLAGSHIP).stages[f"{stage}.data"].config.data  # the prepared-data step all candidates share
    ids = [source.hub for source in data.sources]
    sources = [source.model_copy(update={"hub": str(hub[source.hub])}) for source in data.sources]
    # Decontamination against the benchmarks needs them from the hub; it has its own tests.
    return data.model_copy(update={"sources": sources, "test_size": None, "decontaminate": None}), ids


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from posttrain.hf.tokenizer_setup import attach_chat_template

    folder = tmp_path_factory.mktemp("tok")
    attach_chat_template(TINY_MODEL, folder, "llama-3.1", folder)
    return AutoTokenizer.from_pretrained(folder)


def test_every_sft_source_of_the_flagship_loads_with_the_right_counts(hub, tmp_path):
    data, ids = flagship_data(hub, "sft")
    assert set(ids) == set(EXPECTED)  # every SFT dataset the flagship names has a hub-style copy here
    rows, stats = load_conversations(data, tmp_path, 0)
    for hub_id, counts in zip(ids, stats["sources"]):
        read, used, skipped = EXPECTED[hub_id]
        assert (counts["rows_read"], counts["rows_used"], counts["skipped"]) == (read, used, skipped), hub_id
    orca = stats["sources"][ids.index("mlabonne/orca-agentinstruct-1M-v1-cleaned")]
    assert orca["skipped_by_reason"] == {"messages.content: content is empty": 2}
    assert stats["rows_used"] == len(rows) == sum(used for _, used, _ in EXPECTED.values())


def test_toolace_rows_keep_their_function_list_and_tool_turns_and_train_only_on_answers(hub, tmp_path, tokenizer):
    from posttrain.data.tokens import IGNORE, tokenize_row

    data, ids = flagship_data(hub, "sft")
    rows, _ = load_conversations(data, tmp_path, 0)
    toolace = [row for row in rows if row["source"] == ids.index("Team-ACE/ToolACE")]
    assert len(toolace) == hub_datasets.ROWS
    messages = toolace[0]["messages"]
    assert messages[0] == {"role": "system", "content": TOOLACE_SYSTEM}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "ipython", "assistant"]
    ids_, labels, _ = tokenize_row(tokenizer, toolace[0], 4096, assistant_only=True)
    trained = tokenizer.decode([t for t, l in zip(ids_, labels) if l != IGNORE])
    call, answer = messages[2]["content"], messages[4]["content"]
    assert trained == f"{call}<|eot_id|>{answer}<|eot_id|>"  # the call and the answer; never the tool result
    assert "<|start_header_id|>ipython<|end_header_id|>" in tokenizer.decode(ids_)


def test_autoif_keeps_its_system_column(hub, tmp_path):
    data, ids = flagship_data(hub, "sft")
    rows, _ = load_conversations(data, tmp_path, 0)
    autoif = [r for r in rows if r["source"] == ids.index("Post-training-Data-Flywheel/AutoIF-instruct-61k-with-funcs")]
    assert all(r["messages"][0]["role"] == "system" and r["messages"][0]["content"].startswith("Answer in exactly")
               for r in autoif)
    assert all("tools" not in r for r in autoif)  # its `tools` column is empty


@pytest.mark.slow
def test_m2lingual_without_a_config_is_a_clear_error_naming_the_configs(hub, tmp_path, capsys):
    config = DataConfig(sources=[{"hub": str(hub["ServiceNow-AI/M2Lingual"]), "columns": {"conversation": "messages"}}])
    with pytest.raises(UserError, match=r"several configs and no default: choose one with `name:` "
                                        r"\(full_data, seed_data, seed_evol_data\)|\(seed_data, seed_evol_data, full_data\)"):
        load_conversations(config, tmp_path, 0)
    recipe = sft_recipe(tmp_path, "m2", [f'{{hub: {hub["ServiceNow-AI/M2Lingual"]}, columns: {{conversation: messages}}}}'])
    result = cli("validate", str(recipe))
    assert result.returncode == 2
    assert "stages.sft.data.sources.0.name: " in result.stderr and "several configs and no default" in result.stderr
    assert "seed_data, seed_evol_data, full_data" in result.stderr


def test_the_flagship_dpo_source_loads(hub, tmp_path):
    data, ids = flagship_data(hub, "dpo")
    rows, stats = load_preferences(data, tmp_path, 0)
    assert ids == ["argilla/ultrafeedback-binarized-preferences-cleaned"]
    assert stats["rows_used"] == hub_datasets.ROWS and stats["bad_rows_skipped"] == 0
    assert rows[0]["prompt"][0]["role"] == "user" and rows[0]["chosen"][-1]["role"] == "assistant"


def test_json_string_message_columns_are_parsed(tmp_path):
    folder = hub_datasets.orca_original(tmp_path)
    # The original set names its splits by category; its files say so (creative_content-*.parquet).
    rows, stats = load_conversations(DataConfig(sources=[{"hub": str(folder), "split": "creative_content"}]), tmp_path, 0)
    assert stats["rows_used"] == hub_datasets.ROWS
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]  # the empty system turn is left out


def test_openai_tool_calls_with_arrow_nulls_render_like_the_official_template(tmp_path, tokenizer):
    """Arrow gives every turn of a column the `tool_calls` field (null where absent): one row with a call
    must not reject the dataset, and the call renders exactly as the official Llama-3.1 template does."""
    from support.llama3 import reference_file

    call_type = pa.struct([("type", pa.string()), ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
    turn = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(call_type))])
    rows = [{"messages": [{"role": "user", "content": "Weather in Oslo?", "tool_calls": None},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                          {"role": "tool", "content": '{"temp": 3}', "tool_calls": None},
                          {"role": "assistant", "content": "3 degrees.", "tool_calls": None}]},
            {"messages": [{"role": "user", "content": "Hi", "tool_calls": None},
                          {"role": "assistant", "content": "Hello!", "tool_calls": None}]}]
    (tmp_path / "calls" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("messages", pa.list_(turn))])),
                   tmp_path / "calls" / "data" / "train-00000-of-00001.parquet")
    loaded, stats = load_conversations(DataConfig(sources=[{"hub": str(tmp_path / "calls")}]), tmp_path, 0)
    assert stats["rows_used"] == 2 and stats["bad_rows_skipped"] == 0
    row = next(r for r in loaded if len(r["messages"]) == 4)
    official = reference_file("chat_template.jinja").read_text()
    ours = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert ours == tokenizer.apply_chat_template(row["messages"], chat_template=official, tokenize=False)
    from posttrain.data.tokens import IGNORE, tokenize_row

    ids, labels, _ = tokenize_row(tokenizer, row, 4096, assistant_only=True)
    trained = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE])
    assert trained == '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>3 degrees.<|eot_id|>'


def test_tools_column_renders_like_the_official_template(tokenizer):
    from posttrain.data.formats import to_messages
    from support.llama3 import reference_file

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    row = to_messages({"messages": [{"role": "user", "content": "Weather in Oslo?"},
                                    {"role": "assistant", "content": "Let me check."}], "tools": json.dumps(tools)})
    official = reference_file("chat_template.jinja").read_text()
    ours = tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
    assert ours == tokenizer.apply_chat_template(row["messages"], tools=row["tools"], chat_template=official,
                                                 tokenize=False)
    assert "Environment: ipython" in ours and '"get_weather"' in ours


def sft_recipe(folder, name: str, sources: list[str], data: str = "", training: str = ""):
    """A one-stage SFT recipe on the tiny model over hub-layout sources (YAML flow mappings)."""
    listed = "\n".join(f"                - {source}" for source in sources)
    return write_recipe(folder, f"""
        name: {name}
        base: {{model: {TINY_MODEL}, chat_template: llama-3.1}}
        stages:
          sft:
            kind: sft
            data:
              sources:
{listed}
              on_bad_rows: skip{data}
            training: {{max_steps: 1, per_device_train_batch_size: 4, report_to: []{training}}}
        """, name=f"{name}.yaml")


@pytest.mark.slow
def test_sft_stage_records_per_source_counts_and_warns_when_a_source_loses_rows(hub, tmp_path):
    recipe = sft_recipe(tmp_path, "counts", [f'{{hub: {hub["mlabonne/orca-agentinstruct-1M-v1-cleaned"]}}}',
                                             f'{{hub: {hub["Team-ACE/ToolACE"]}}}'],
                        data="\n              max_length: 240")
    result = cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: " in result.stdout and "2 of 8 rows (25%) skipped as bad" in result.stdout
    import posttrain

    sources = posttrain.run(recipe).metrics("sft.data")["sources"]
    assert [(s["rows_read"], s["rows_used"], s["skipped"]) for s in sources] == [(8, 6, 2), (6, 6, 0)]
    assert sources[0]["truncated"] == 0
    assert sources[1]["truncated"] == 6  # ToolACE rows, with their function list, run ~295 tokens
    report = cli("report", str(recipe), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Data sources" in text and "content is empty (2)" in text


@pytest.mark.slow
def test_validate_data_reports_what_each_source_would_give(hub, tmp_path):
    recipe = sft_recipe(tmp_path, "peek", [
        f'{{hub: {hub["mlabonne/orca-agentinstruct-1M-v1-cleaned"]}}}',
        f'{{hub: {hub["ServiceNow-AI/M2Lingual"]}, name: full_data, columns: {{conversation: messages}}}}'])
    result = cli("validate", str(recipe), "--data", "50")
    assert result.returncode == 0, result.stderr
    assert "6/8 rows accepted" in result.stdout and "2 skipped: messages.content: content is empty" in result.stdout
    assert "6/6 rows accepted" in result.stdout
    bad = sft_recipe(tmp_path, "peek2", [f'{{hub: {hub["ServiceNow-AI/M2Lingual"]}, name: full_data}}'])
    result = cli("validate", str(bad), "--data")
    assert result.returncode == 2 and "0/6 rows accepted" in result.stdout and "EMPTY" in result.stdout
