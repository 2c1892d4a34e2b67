"""A stand-in for the Hugging Face Hub API, offline: `HfApi` with the calls `posttrain push` makes
answered from a folder. It subclasses the real `HfApi`, so the method signatures are huggingface_hub's
own (a test checks they still match), and it raises huggingface_hub's own errors."""
from __future__ import annotations

import fnmatch
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError


def _error(kind, status: int, message: str):
    request = httpx.Request("GET", "https://huggingface.co/api/stand-in")
    return kind(message, response=httpx.Response(status, request=request))


@dataclass
class Commit:
    commit_url: str
    oid: str


class StandInHub(HfApi):
    """Repositories live under `root/<org>/<name>/<branch>/`; `calls` records what was asked."""

    root: Path
    writable: set | None = None  # repo ids the token may write (None: all)

    def __init__(self, root: Path, writable: set | None = None):
        super().__init__(endpoint="http://stand-in.invalid", token="hf_stand_in")
        self.root, self.writable, self.calls, self.private = Path(root), writable, [], {}

    def _repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    def _check_write(self, repo_id: str) -> None:
        if self.writable is not None and repo_id not in self.writable:
            raise _error(HfHubHTTPError, 403, f"403 Forbidden: you may not write to {repo_id}")

    def create_repo(self, repo_id, *, token=None, private=None, visibility=None, repo_type=None, exist_ok=False,
                    resource_group_id=None, region=None, space_sdk=None, space_hardware=None,
                    space_sleep_time=None, space_secrets=None, space_variables=None, space_volumes=None,
                    space_template=None):
        self.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok}))
        self._check_write(repo_id)
        main = self._repo(repo_id) / "main"
        if main.exists() and not exist_ok:
            raise _error(HfHubHTTPError, 409, f"409 Conflict: {repo_id} exists")
        if not main.exists():
            main.mkdir(parents=True)
            (main / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
            self.private[repo_id] = bool(private)
        return f"http://stand-in.invalid/{repo_id}"

    def list_repo_files(self, repo_id, *, revision=None, repo_type=None, token=None):
        self.calls.append(("list_repo_files", repo_id, {"revision": revision}))
        if not self._repo(repo_id).exists():
            raise _error(RepositoryNotFoundError, 404, f"404: {repo_id} not found")
        branch = self._repo(repo_id) / (revision or "main")
        if not branch.exists():
            raise _error(RevisionNotFoundError, 404, f"404: revision {revision} not found")
        return sorted(str(p.relative_to(branch)) for p in branch.rglob("*") if p.is_file())

    def create_branch(self, repo_id, *, branch, revision=None, token=None, repo_type=None, exist_ok=False):
        self.calls.append(("create_branch", repo_id, {"branch": branch}))
        self._check_write(repo_id)
        target = self._repo(repo_id) / branch
        if not target.exists():
            shutil.copytree(self._repo(repo_id) / (revision or "main"), target)

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, commit_description=None,
                      token=None, repo_type=None, revision=None, create_pr=None, parent_commit=None,
                      allow_patterns=None, ignore_patterns=None, delete_patterns=None, run_as_future=False):
        self.calls.append(("upload_folder", repo_id, {"revision": revision, "message": commit_message,
                                                      "delete_patterns": delete_patterns}))
        self._check_write(repo_id)
        branch = self._repo(repo_id) / (revision or "main")
        if not branch.exists():
            raise _error(RevisionNotFoundError, 404, f"404: revision {revision} not found")
        patterns = [delete_patterns] if isinstance(delete_patterns, str) else delete_patterns or []
        for old in [p for p in branch.rglob("*") if p.is_file()]:  # the Hub keeps .gitattributes
            rel = str(old.relative_to(branch))
            if rel != ".gitattributes" and any(fnmatch.fnmatch(rel, pattern) for pattern in patterns):
                old.unlink()
        source = Path(folder_path)
        for path in source.rglob("*"):
            if path.is_file():
                target = branch / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        return Commit(f"http://stand-in.invalid/{repo_id}/commit/{len(self.calls)}", f"{len(self.calls):040x}")
