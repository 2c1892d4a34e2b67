"""Local lm-eval task folders: read safely, and copied with their data files made absolute.

Shared by the eval stage (which runs the tasks) and decontamination (which reads their items).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from posttrain.core.errors import UserError


def read_task_yaml(task_file: Path) -> dict[str, Any]:
    """A local lm-eval task YAML, read safely. `!function` (lm-eval runs a Python function from the task
    folder) is refused with its line: posttrain runs no code from data folders."""
    import yaml

    class TaskLoader(yaml.SafeLoader):
        pass

    def refuse(loader, node):
        raise UserError(f"{task_file}:{node.start_mark.line + 1}: `!function {node.value}` runs Python code from "
                        "the task folder, which posttrain does not run; use a task without it")

    TaskLoader.add_constructor("!function", refuse)
    try:
        data = yaml.load(task_file.read_text(encoding="utf-8"), Loader=TaskLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise UserError(f"{task_file}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{task_file}: a task file must be a mapping")
    return data


def task_file_problems(folder: Path) -> list[str]:
    if not folder.is_dir():
        return [f"task folder not found: {folder}"]
    problems = []
    for task_file in sorted(folder.glob("*.yaml")):
        try:
            read_task_yaml(task_file)
        except UserError as exc:
            problems.append(str(exc))
    return problems


def copy_task_dirs(folders: list[Path], target: Path) -> Path:
    """Copy task YAMLs into `target` with their data_files made absolute: lm-eval hands `data_files` to
    datasets, which resolves relative paths against the current directory; recipes must work from anywhere."""
    import yaml

    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for i, source in enumerate(folders):
        if not source.is_dir():
            raise UserError(f"task folder not found: {source}")
        for task_file in sorted(source.glob("*.yaml")):
            data = read_task_yaml(task_file)
            files = (data.get("dataset_kwargs") or {}).get("data_files")
            if isinstance(files, dict):
                data["dataset_kwargs"]["data_files"] = {
                    split: str((source / path).resolve()) if not Path(path).is_absolute() else path
                    for split, path in files.items()}
            (target / f"{i}-{task_file.name}").write_text(yaml.safe_dump(data, sort_keys=False))
    return target
