"""The flagship's datasets as local folders laid out like their hub repos.

Layouts as established from each dataset's card and viewer (file type, `configs:` block, column
types), with a few synthetic rows written in that shape, including the awkward ones real data has
(empty assistant turns, tool turns, a separate system column, JSON-string message columns). A `hub:`
source pointing at such a folder goes through exactly the loading path a hub id does
(`datasets.load_dataset(repo, name, split=...)`).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = 6  # ordinary rows per dataset (plus the awkward ones listed in EXPECTED_SKIPS)
TURN = pa.struct([("role", pa.string()), ("content", pa.string())])
SHAREGPT_TURN = pa.struct([("from", pa.string()), ("value", pa.string())])


def _parquet(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _readme(folder: Path, configs: list[dict] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    front = {"configs": configs} if configs else {}
    import yaml

    (folder / "README.md").write_text("---\n" + yaml.safe_dump(front) + "---\n# local copy for tests\n")


def _chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]


def evolkit(root: Path) -> Path:
    folder = root / "arcee-ai" / "EvolKit-75K"
    _readme(folder)
    rows = [{"conversations": [{"from": "human", "value": f"Explain idea {i}."}, {"from": "gpt", "value": f"Idea {i}."}]}
            for i in range(ROWS)]
    _parquet(folder / "data" / "train-00000-of-00001.parquet", rows,
             pa.schema([("conversations", pa.list_(SHAREGPT_TURN))]))
    return folder


def perfectblend(root: Path) -> Path:
    folder = root / "MaziyarPanahi" / "open-perfectblend-fixed"
    _readme(folder)
    rows = [{"conversations": [{"from": "human", "value": f"Blend {i}?"}, {"from": "gpt", "value": f"Blend {i}."}],
             "source": "blend"} for i in range(ROWS)]
    _parquet(folder / "data" / "train-00000-of-00001.parquet", rows,
             pa.schema([("conversations", pa.list_(SHAREGPT_TURN)), ("source", pa.string())]))
    return folder


def orca(root: Path) -> Path:
    """messages as a list column; two rows with an empty assistant turn (the real set has 68)."""
    folder = root / "mlabonne" / "orca-agentinstruct-1M-v1-cleaned"
    _readme(folder)
    rows = [{"messages": _chat(i), "split": "creative_content"} for i in range(ROWS)]
    rows += [{"messages": [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
              "split": "creative_content"} for _ in range(2)]
    _parquet(folder / "data" / "train-00000-of-00001.parquet", rows,
             pa.schema([("messages", pa.list_(TURN)), ("split", pa.string())]))
    return folder


def orca_original(root: Path) -> Path:
    """microsoft/orca-agentinstruct-1M-v1 stores each conversation as a JSON string."""
    folder = root / "microsoft" / "orca-agentinstruct-1M-v1"
    _readme(folder)
    rows = [{"messages": json.dumps([{"role": "system", "content": ""}, *_chat(i)])} for i in range(ROWS)]
    _parquet(folder / "data" / "creative_content-00000-of-00001.parquet", rows, pa.schema([("messages", pa.string())]))
    return folder


def autoif(root: Path) -> Path:
    """messages plus a separate `system` string column and an empty `tools` column."""
    folder = root / "Post-training-Data-Flywheel" / "AutoIF-instruct-61k-with-funcs"
    _readme(folder)
    rows = [{"system": f"Answer in exactly {i + 1} words.", "messages": _chat(i), "tools": ""} for i in range(ROWS)]
    _parquet(folder / "data" / "train-00000-of-00001.parquet", rows,
             pa.schema([("system", pa.string()), ("messages", pa.list_(TURN)), ("tools", pa.string())]))
    return folder


TOOLACE_SYSTEM = ("You are an expert in composing functions. Here is a list of functions in JSON format that you "
                  'can invoke:\n[{"name": "get_weather", "parameters": {"city": {"type": "string"}}}]')


def toolace(root: Path) -> Path:
    """One data.json: system (the function list) and conversations with user/assistant/tool turns."""
    folder = root / "Team-ACE" / "ToolACE"
    _readme(folder)
    rows = []
    for i in range(ROWS):
        rows.append({"system": TOOLACE_SYSTEM, "conversations": [
            {"from": "user", "value": f"Weather in city {i}?"},
            {"from": "assistant", "value": f"[get_weather(city='city {i}')]"},
            {"from": "tool", "value": json.dumps([{"name": "get_weather", "results": {"temp": 20 + i}}])},
            {"from": "assistant", "value": f"It is {20 + i} degrees in city {i}."}]})
    (folder / "data.json").write_text(json.dumps(rows))
    return folder


def m2lingual(root: Path) -> Path:
    """Three configs and no default; turns in `conversation` (singular)."""
    folder = root / "ServiceNow-AI" / "M2Lingual"
    configs = []
    for name in ("seed_data", "seed_evol_data", "full_data"):
        rows = [{"id": f"{name}-{i}", "conversation": _chat(i), "language": "fr"} for i in range(ROWS)]
        _parquet(folder / name / "train.parquet", rows,
                 pa.schema([("id", pa.string()), ("conversation", pa.list_(TURN)), ("language", pa.string())]))
        configs.append({"config_name": name, "data_files": [{"split": "train", "path": f"{name}/train.parquet"}]})
    _readme(folder, configs)
    return folder


def numina(root: Path) -> Path:
    folder = root / "AI-MO" / "NuminaMath-TIR"
    _readme(folder)
    schema = pa.schema([("problem", pa.string()), ("solution", pa.string()), ("messages", pa.list_(TURN))])
    for split in ("train", "test"):
        rows = [{"problem": f"Solve {i}", "solution": f"{i}", "messages": _chat(i)} for i in range(ROWS)]
        _parquet(folder / "data" / f"{split}-00000-of-00001.parquet", rows, schema)
    return folder


def tulu_personas(root: Path, which: str) -> Path:
    folder = root / "allenai" / f"tulu-3-sft-personas-{which}"
    _readme(folder)
    rows = [{"id": f"{which}-{i}", "prompt": _chat(i)[0]["content"], "messages": _chat(i)} for i in range(ROWS)]
    _parquet(folder / "data" / "train-00000-of-00001.parquet", rows,
             pa.schema([("id", pa.string()), ("prompt", pa.string()), ("messages", pa.list_(TURN))]))
    return folder


def ultrafeedback(root: Path) -> Path:
    """prompt string; chosen/rejected full conversations (user turn repeated); scores."""
    folder = root / "argilla" / "ultrafeedback-binarized-preferences-cleaned"
    _readme(folder)
    rows = []
    for i in range(ROWS):
        prompt = f"Write a line about {i}."
        rows.append({"prompt": prompt, "chosen": [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": f"A fine line about {i}."}],
                     "chosen-rating": 5.0, "rejected": [{"role": "user", "content": prompt},
                                                        {"role": "assistant", "content": "No."}],
                     "rejected-rating": 1.0})
    _parquet(folder / "data" / "train-00000-of-00001.parquet", rows,
             pa.schema([("prompt", pa.string()), ("chosen", pa.list_(TURN)), ("chosen-rating", pa.float64()),
                        ("rejected", pa.list_(TURN)), ("rejected-rating", pa.float64())]))
    return folder


def flagship_datasets(root: Path) -> dict[str, Path]:
    """hub id -> local folder, for every dataset the flagship recipe names."""
    folders = [evolkit(root), perfectblend(root), orca(root), autoif(root), toolace(root), m2lingual(root),
               numina(root), *(tulu_personas(root, w) for w in ("code", "math", "math-grade", "algebra")),
               ultrafeedback(root)]
    return {str(folder.relative_to(root)): folder for folder in folders}


# What the data layer must report for each: rows read, rows used, rows skipped.
EXPECTED = {name: (ROWS, ROWS, 0) for name in (
    "arcee-ai/EvolKit-75K", "MaziyarPanahi/open-perfectblend-fixed", "Post-training-Data-Flywheel/AutoIF-instruct-61k-with-funcs",
    "Team-ACE/ToolACE", "ServiceNow-AI/M2Lingual", "AI-MO/NuminaMath-TIR", "allenai/tulu-3-sft-personas-code",
    "allenai/tulu-3-sft-personas-math", "allenai/tulu-3-sft-personas-math-grade", "allenai/tulu-3-sft-personas-algebra")}
EXPECTED["mlabonne/orca-agentinstruct-1M-v1-cleaned"] = (ROWS + 2, ROWS, 2)
