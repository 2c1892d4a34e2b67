"""The on-disk checkpoint registry.

Layout under the root:
  entries/<key>/      finished entries: the stage's files plus manifest.json, written last
  tmp/<key>.incomplete  an entry being built; renamed into entries/ only when complete
  work/<key>/         in-stage checkpoints and logs that survive a failure or a kill (for resume)
  locks/<key>.lock    held while an entry is built
  refs/<recipe>/<stage>.json  named pointers to keys
  trash/              corrupt entries moved aside (never reused), emptied by `gc`
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.core.errors import UserError
from posttrain.registry.entry_keys import short
from posttrain.registry.locking import exclusive_lock, is_locked, lock_if_free
from posttrain.registry.paths import check_key, safe_child

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
ENV_VAR = "POSTTRAIN_REGISTRY"


def default_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "posttrain" / "registry"


def resolve_root(flag: str | None = None, recipe_value: str | None = None, recipe_dir: Path | None = None) -> Path:
    """--registry beats $POSTTRAIN_REGISTRY beats the recipe's `registry:` beats ~/.cache/posttrain/registry."""
    if flag:
        return Path(flag).expanduser().resolve()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser().resolve()
    if recipe_value:
        path = Path(recipe_value).expanduser()
        if not path.is_absolute() and recipe_dir is not None:
            path = recipe_dir / path
        return path.resolve()
    return default_root()


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "?")


class CorruptEntry(Exception):
    """An entry whose manifest or files do not match: reported and never used."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size, sha256, mtime and inode of every file under `folder` (except the manifest), for the manifest.

    Size, mtime and inode are the cheap check before every reuse: writing into a file changes its
    mtime, replacing it changes its inode. Only when they differ is the file hashed again."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            stat = path.stat()
            files[path.relative_to(folder).as_posix()] = {"size": stat.st_size, "sha256": sha256_file(path),
                                                          "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    return files


def _make_read_only(folder: Path) -> None:
    """Entries are never written again: their files lose their write bits (the folders keep theirs, so
    `gc` can still remove them)."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode & ~0o222)


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    # -- layout -------------------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        return self.root / name

    def entry_dir(self, key: str) -> Path:
        return safe_child(self._dir("entries"), check_key(key))

    def work_dir(self, key: str) -> Path:
        return safe_child(self._dir("work"), check_key(key))

    def tmp_dir(self, key: str) -> Path:
        return safe_child(self._dir("tmp"), check_key(key) + ".incomplete")

    def _ref_path(self, ref: str) -> Path:
        recipe, sep, stage = ref.partition("/")
        if not sep or not recipe or not stage or "/" in stage:
            raise UserError(f"a ref looks like <recipe>/<stage>, not {ref!r}")
        return safe_child(self._dir("refs"), recipe, stage + ".json")

    # -- reading ------------------------------------------------------------------------------
    def load(self, key: str) -> Entry:
        """The finished entry for `key`. Raises KeyError if absent, CorruptEntry if damaged.

        This is the cheap check used before reuse: manifest readable, every file present with its size.
        `verify` also checks contents.
        """
        path = self.entry_dir(key)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise KeyError(key)
        if not manifest_path.is_file():
            raise CorruptEntry(f"entry {short(key)} has no {MANIFEST}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise CorruptEntry(f"entry {short(key)}: {MANIFEST} is unreadable ({exc})") from exc
        if manifest.get("key") != key:
            raise CorruptEntry(f"entry {short(key)}: manifest names key {str(manifest.get('key'))[:12]}")
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise CorruptEntry(f"entry {short(key)}: its manifest lists no files")
        for rel, meta in files.items():
            file = path / rel
            if not file.is_file():
                raise CorruptEntry(f"entry {short(key)}: file {rel} is missing")
            stat = file.stat()
            if stat.st_size != meta["size"]:
                raise CorruptEntry(f"entry {short(key)}: file {rel} has {stat.st_size} bytes, expected {meta['size']}")
            touched = (stat.st_mtime_ns != meta.get("mtime_ns", stat.st_mtime_ns)
                       or stat.st_ino != meta.get("inode", stat.st_ino))
            if touched and sha256_file(file) != meta["sha256"]:
                raise CorruptEntry(f"entry {short(key)}: file {rel} was changed after it was committed")
        return Entry(key, path, manifest)

    def get(self, key: str) -> Entry | None:
        try:
            return self.load(key)
        except (KeyError, CorruptEntry):
            return None

    def keys(self) -> list[str]:
        entries = self._dir("entries")
        if not entries.is_dir():
            return []
        return sorted(p.name for p in entries.iterdir() if p.is_dir() and len(p.name) == 64)

    def resolve(self, ref_or_key: str) -> str:
        """A ref (`recipe/stage`), a full key, or an unambiguous key prefix of 6+ characters."""
        if "/" in ref_or_key:
            key = self.get_ref(ref_or_key)
            if key is None:
                raise UserError(f"no ref {ref_or_key!r} in registry {self.root}")
            return key
        if len(ref_or_key) < 6 or any(c not in "0123456789abcdef" for c in ref_or_key):
            raise UserError(f"{ref_or_key!r} is neither a ref (recipe/stage) nor a key (6+ hex characters)")
        matches = [k for k in self.keys() if k.startswith(ref_or_key)]
        if len(matches) != 1:
            raise UserError(f"key prefix {ref_or_key!r} matches {len(matches)} entries in {self.root}")
        return matches[0]

    # -- refs ---------------------------------------------------------------------------------
    def set_ref(self, ref: str, key: str) -> None:
        path = self._ref_path(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps({"key": check_key(key), "updated": time.time()}) + "\n")

    def get_ref(self, ref: str) -> str | None:
        path = self._ref_path(ref)
        try:
            return json.loads(path.read_text())["key"]
        except (OSError, ValueError, KeyError):
            return None

    def refs(self) -> dict[str, str]:
        found = {}
        refs_dir = self._dir("refs")
        if refs_dir.is_dir():
            for path in sorted(refs_dir.glob("*/*.json")):
                name = f"{path.parent.name}/{path.stem}"
                key = self.get_ref(name)
                if key:
                    found[name] = key
        return found

    # -- building -----------------------------------------------------------------------------
    @contextmanager
    def lock(self, key: str, on_wait=None) -> Iterator[None]:
        with exclusive_lock(safe_child(self._dir("locks"), check_key(key) + ".lock"), on_wait):
            yield

    def fresh_tmp_dir(self, key: str) -> Path:
        """An empty folder to build `key` in (whatever a killed earlier attempt left there is removed)."""
        tmp = self.tmp_dir(key)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, key: str, tmp: Path, manifest: dict[str, Any]) -> Entry:
        """Write the manifest last, then move the folder into place in one rename."""
        if not tmp.is_dir() or not any(tmp.iterdir()):
            raise CorruptEntry(f"entry {short(key)}: its build folder {tmp} is gone or empty; nothing committed")
        _make_read_only(tmp)
        manifest = dict(manifest, key=key, format=MANIFEST_FORMAT, files=describe_files(tmp))
        _atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        target = self.entry_dir(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            self.discard(key, reason="replaced")
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        work = self.work_dir(key)
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
        return Entry(key, target, manifest)

    def discard(self, key: str, reason: str = "corrupt") -> Path:
        """Move an entry aside so it is never used again (kept in trash/ for inspection until `gc`)."""
        trash = self._dir("trash")
        trash.mkdir(parents=True, exist_ok=True)
        dest = trash / f"{key}.{reason}.{int(time.time() * 1000)}"
        os.rename(self.entry_dir(key), dest)
        return dest

    # -- checking and cleaning ----------------------------------------------------------------
    def verify(self, keys: list[str] | None = None) -> dict[str, list[str]]:
        """Full check of entries (contents hashed): key -> list of problems (empty when sound)."""
        report = {}
        for key in keys if keys is not None else self.keys():
            problems: list[str] = []
            try:
                entry = self.load(key)
            except KeyError:
                problems.append("no such entry")
            except CorruptEntry as exc:
                problems.append(str(exc))
            else:
                for rel, meta in entry.manifest.get("files", {}).items():
                    if sha256_file(entry.path / rel) != meta["sha256"]:
                        problems.append(f"entry {short(key)}: file {rel} content does not match its sha256")
            report[key] = problems
        return report

    def lineage(self, key: str) -> set[str]:
        """`key` and every entry it was built from, transitively."""
        seen, todo = set(), [key]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            entry = self.get(current)
            if entry:
                todo.extend(entry.manifest.get("inputs", {}).values())
        return seen

    def is_building(self, key: str) -> bool:
        """Whether a live process is building `key` now (it holds the key's lock)."""
        return is_locked(safe_child(self._dir("locks"), check_key(key) + ".lock"))

    def remove(self, path: Path) -> bool:
        """Remove one item `garbage` listed; a build folder or work folder only while no live process
        builds its key (checked under the key's lock). Returns whether it was removed."""
        key = path.name.split(".")[0]
        if path.parent.name in ("tmp", "work") and len(key) == 64:
            with lock_if_free(safe_child(self._dir("locks"), check_key(key) + ".lock")) as free:
                if not free:
                    return False
                shutil.rmtree(path, ignore_errors=True)
                return True
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return True

    def garbage(self, include_work: bool = False) -> list[Path]:
        """What `gc` would remove: entries no ref reaches, leftovers of killed builds, trash. Build and
        work folders of keys a live process is building are never listed."""
        keep: set[str] = set()
        for key in self.refs().values():
            keep |= self.lineage(key)
        found = [self.entry_dir(k) for k in self.keys() if k not in keep]
        trash = self._dir("trash")
        if trash.is_dir():
            found.extend(sorted(trash.iterdir()))
        tmp = self._dir("tmp")
        if tmp.is_dir():
            found.extend(p for p in sorted(tmp.iterdir()) if not self._live(p.name.split(".")[0]))
        work = self._dir("work")
        if work.is_dir():
            for path in sorted(work.iterdir()):
                if self._live(path.name):
                    continue
                # A work folder of an unfinished entry is what a re-run resumes from: only on request.
                if include_work or (self.entry_dir(path.name).exists() if len(path.name) == 64 else True):
                    found.append(path)
        return found

    def _live(self, key: str) -> bool:
        return len(key) == 64 and self.is_building(key)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
