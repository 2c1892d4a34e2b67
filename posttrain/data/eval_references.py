"""The evaluation items training data is checked against: lm-eval tasks (local folders offline, or any
task lm-eval knows) and plain files."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field

from posttrain.data.decontam import EvalItem, words
from posttrain.core.errors import UserError
from posttrain.core.strict import StrictModel
from posttrain.core.context import in_recipe

QUESTION_FIELDS = ("question", "prompt", "query", "problem", "text", "input")
ANSWER_FIELDS = ("answer", "target", "solution", "output")
OPTION_FIELDS = ("choices", "options")


class Decontamination(StrictModel):
    """Training rows containing an evaluation item are dropped (or flagged) before anything trains."""

    tasks: list[str] = Field(default_factory=list, description="lm-eval task (or group) names.")
    task_dirs: list[str] = Field(default_factory=list, description="Folders of local lm-eval task YAMLs.")
    files: list[str] = Field(default_factory=list,
                             description=".jsonl/.json rows with question/answer/choices fields, or .txt lines.")
    n: int = Field(13, ge=1, le=16, description="Word n-gram length.")
    min_words: int = Field(3, ge=1, description="Content words a question needs to identify its item alone; "
                           "shorter (or shared) ones match only with their options or gold answer.")
    policy: str = Field("drop", pattern="^(drop|flag)$", description="drop the row, or keep it and flag it.")
    fail_above: float | None = Field(None, ge=0, le=1, description="Fail when this share of rows is contaminated.")
    workers: int = Field(2, ge=1, description="Processes that check rows (sources of 20k rows or more).")


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _options(value: Any) -> list[str]:
    """Answer options as texts: a list, ARC's {"label": [...], "text": [...]}, or {label: text}."""
    if isinstance(value, dict):
        value = value.get("text", list(value.values()))
    if not isinstance(value, list):
        return []
    return [text for text in map(_text, value) if text]


def _item(task: str, item: str, question: str | None, answer: str | None, options: list[str]) -> Iterator[EvalItem]:
    tokens = tuple(words(question)) if question else ()
    if tokens:
        yield EvalItem(task, item, tokens, tuple(words(answer)) if answer else (),
                       tuple(t for t in (tuple(words(o)) for o in options) if t))


def file_items(path: Path) -> Iterator[EvalItem]:
    label = path.name
    if not path.is_file():
        raise UserError(f"decontamination file not found: {path}")
    if path.suffix == ".txt":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield from _item(label, f"line {number}", line, None, [])
        return
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        raise UserError(f"{path}: decontamination files are .jsonl, .json or .txt")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {number}: a mapping with a question field is expected")
        question = next((_text(row[k]) for k in QUESTION_FIELDS if k in row), None)
        answer = next((_text(row[k]) for k in ANSWER_FIELDS if k in row), None)
        if question is None:
            raise UserError(f"{path}: row {number}: no question field ({', '.join(QUESTION_FIELDS)})")
        options = next((_options(row[k]) for k in OPTION_FIELDS if k in row), [])
        yield from _item(label, str(row.get("id", f"row {number}")), question, answer, options)


def _flatten(tasks: dict) -> Iterator[tuple[str, Any]]:
    for name, task in tasks.items():
        if isinstance(task, dict):
            yield from _flatten(task)
        else:
            yield getattr(name, "group_name", None) or str(name), task


def task_items(names: list[str], task_dirs: list[Path]) -> Iterator[EvalItem]:
    """Every test (else validation) document of the tasks: the prompt text, the gold answer and, for a
    multiple-choice task, the options."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from posttrain.evaluation.tasks import copy_task_dirs

    with tempfile.TemporaryDirectory() as tmp:
        include = str(copy_task_dirs(task_dirs, Path(tmp) / "tasks")) if task_dirs else None
        try:
            tasks = get_task_dict(names, TaskManager(include_path=include))
        except (KeyError, ValueError) as exc:
            raise UserError(f"decontamination: lm-eval does not know task {exc}; check tasks and task_dirs") from None
        except Exception as exc:  # noqa: BLE001 - datasets raises many types when a task's data cannot be had
            raise UserError(f"decontamination: could not load the evaluation tasks {', '.join(names)} "
                            f"({type(exc).__name__}: {exc}); they are needed offline in the HF cache or online") from None
        for name, task in _flatten(tasks):
            docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
            for number, doc in enumerate(docs or []):
                question = _text(task.doc_to_text(doc))
                target = task.doc_to_target(doc)
                options = _choices(task, doc)
                if isinstance(target, int) and options:
                    target = options[target] if 0 <= target < len(options) else None
                label = f"doc {number}: {question[:60]}" if question else f"doc {number}"
                yield from _item(name, label, question, _text(target), options)


def _choices(task: Any, doc: dict) -> list[str]:
    """A multiple-choice task's options for one document; none for other tasks."""
    if getattr(task, "OUTPUT_TYPE", None) != "multiple_choice":
        return []
    try:
        return _options(task.doc_to_choice(doc))
    except Exception:  # noqa: BLE001 - a task's own choice template failing leaves the item without options
        return []


def reference_items(config: Decontamination, recipe_dir: Path) -> list[EvalItem]:
    def resolve(value: str) -> Path:
        return in_recipe(value, recipe_dir)

    items = [item for value in config.files for item in file_items(resolve(value))]
    if config.tasks:
        items += list(task_items(config.tasks, [resolve(d) for d in config.task_dirs]))
    if not items:
        raise UserError("decontamination has no evaluation items: give tasks (with task_dirs for local ones) or files")
    return items
