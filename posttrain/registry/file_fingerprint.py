"""Content fingerprints of local files and folders: editing a data file changes the stage's key.

Hashing a 20 GB model folder on every `plan` would be slow, so each file's sha256 is cached by
(path, size, mtime) in the registry, the way DVC does it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from posttrain.registry.store import sha256_file


class FingerprintCache:
    def __init__(self, path: Path | None):
        self.path = path
        self._data: dict[str, str] = {}
        self._dirty = False
        if path and path.is_file():
            try:
                self._data = json.loads(path.read_text())
            except ValueError:
                self._data = {}

    def file_hash(self, file: Path) -> str:
        stat = file.stat()
        token = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if token not in self._data:
            self._data[token] = sha256_file(file)
            self._dirty = True
        return self._data[token]

    def save(self) -> None:
        if not (self.path and self._dirty):
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._data))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only registry still works; hashes are just recomputed next time


def fingerprint(path: Path, cache: FingerprintCache) -> str:
    """sha256 over a file's content, or over (relative path, content hash) of every file in a folder."""
    if path.is_file():
        return cache.file_hash(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        digest.update(f"{rel.as_posix()}\0{cache.file_hash(file)}\n".encode())
    return digest.hexdigest()
