"""Shared fixtures. Nothing here downloads: the tiny model lives in data/, test stage kinds in plugins/."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "data" / "tiny-llama"
PLUGINS = Path(__file__).resolve().parent / "plugins"


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A site folder holding an installed-looking distribution that registers the test stage kinds."""
    site = tmp_path_factory.mktemp("site")
    info = site / "posttrain_testkinds-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: posttrain-testkinds\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[posttrain.stages]\ncount = posttrain_testkinds:CountStage\n")
    return site


@pytest.fixture(autouse=True)
def isolated(plugin_site, tmp_path, monkeypatch):
    """Every test gets its own registry and sees the test plugin, in-process and in subprocesses."""
    from posttrain import kinds

    for path in (str(plugin_site), str(PLUGINS)):
        if path not in sys.path:
            sys.path.insert(0, path)
    kinds._plugin_targets.cache_clear()
    kinds.get_stage.cache_clear()
    pythonpath = os.pathsep.join([str(plugin_site), str(PLUGINS), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", pythonpath)
    monkeypatch.setenv("POSTTRAIN_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    yield
    kinds._plugin_targets.cache_clear()
    kinds.get_stage.cache_clear()


@pytest.fixture
def registry_dir(tmp_path) -> Path:
    return tmp_path / "registry"


def write_recipe(folder: Path, body: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def two_stage_recipe(folder: Path, one_steps: int = 2, two_steps: int = 3, sleep: float = 0.0) -> Path:
    return write_recipe(folder, f"""
        name: pair
        base:
          model: {TINY_MODEL}
          chat_template: llama-3.1
        stages:
          one:
            kind: count
            steps: {one_steps}
            sleep: {sleep}
          two:
            kind: count
            model: one
            steps: {two_steps}
        """)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `posttrain` console entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def count_runs(registry: Path) -> list[str]:
    log = registry / "count-runs.log"
    return log.read_text().splitlines() if log.exists() else []


def run_and_kill_at_checkpoint(recipe: Path, registry: Path, step: int, timeout: float = 240,
                               extra: tuple[str, ...] = ()) -> None:
    """Start `posttrain run` (with `extra` arguments, e.g. a launcher) and SIGKILL it, with every process
    it started, once in-stage checkpoint-<step> has been written: what a preempted node looks like."""
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    pattern = f"work/*/checkpoints/checkpoint-{step}/trainer_state.json"
    while time.time() < deadline and not list(registry.glob(pattern)):
        assert proc.poll() is None, "run finished before it could be killed"
        time.sleep(0.02)
    # torchrun starts its workers in sessions of their own: kill the whole tree, leaves first.
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
