"""`posttrain push REF ORG/NAME`: export a model entry and upload it to the Hugging Face Hub.

The upload goes through huggingface_hub (`create_repo`, `upload_folder`), with the token from
`hf auth login` or $HF_TOKEN and the endpoint from $HF_ENDPOINT as usual. A repository that already
holds files at the revision is never overwritten unless asked: an accidental push onto a published
model would replace it for everyone who loads it.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.core.errors import UserError
from posttrain.publish.export import export_model
from posttrain.registry import Registry

# Files a new Hub repository starts with; a repository holding only these counts as empty.
HUB_SCAFFOLD = {".gitattributes"}


@dataclass
class Pushed:
    repo_id: str
    revision: str
    key: str
    files: list[str]
    url: str | None


def push_model(registry: Registry, ref_or_key: str, repo_id: str, revision: str | None = None,
               private: bool = False, overwrite: bool = False, dtype: str | None = None,
               api: Any = None) -> Pushed:
    """Export `ref_or_key` and upload it as `repo_id` (created if missing, `private` if new) on the
    branch `revision` (created from main if missing). `api` is an `HfApi` (a stand-in in tests)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"{repo_id!r} is not a Hub repository id (ORG/NAME): {exc}") from None
    if "/" not in repo_id:
        raise UserError(f"{repo_id!r}: give the owner too, as ORG/NAME (or USER/NAME)")
    branch = revision or "main"
    api = api if api is not None else HfApi()
    with tempfile.TemporaryDirectory(prefix="posttrain-push-") as scratch:
        exported = export_model(registry, ref_or_key, Path(scratch) / "model", dtype=dtype)
        with _hub_errors(repo_id):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            present = _files_at(api, repo_id, branch)
            if present is None:
                api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
                present = []
            kept = sorted(set(present) - HUB_SCAFFOLD)
            if kept and not overwrite:
                raise UserError(f"{repo_id} already has {len(kept)} file(s) on {branch!r} ({', '.join(kept[:3])}"
                                f"{', ...' if len(kept) > 3 else ''}); pass --overwrite to replace them, or "
                                f"push to another --revision")
            info = api.upload_folder(
                repo_id=repo_id, folder_path=str(exported.folder), repo_type="model", revision=branch,
                commit_message=f"posttrain: {ref_or_key} ({exported.key[:12]})",
                commit_description=f"Registry key {exported.key}. Lineage in posttrain_lineage.json.",
                # Replacing a model means no stale file of the old one stays (e.g. a shard count change).
                delete_patterns=["*"] if kept else None)
    return Pushed(repo_id, branch, exported.key, exported.files, getattr(info, "commit_url", None))


def _files_at(api, repo_id: str, branch: str) -> list[str] | None:
    """The repository's files on `branch`, or None when the branch does not exist yet."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return list(api.list_repo_files(repo_id, revision=branch, repo_type="model"))
    except RevisionNotFoundError:
        return None


class _hub_errors:
    """Hub failures a user can fix (no token, no rights, no network) as one clear line."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

        if exc is None or isinstance(exc, UserError):
            return False
        if isinstance(exc, LocalTokenNotFoundError):
            raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN") from None
        if isinstance(exc, HfHubHTTPError):
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise UserError(f"the Hub refused the push to {self.repo_id} (HTTP {status}): check that your "
                                "token (`hf auth login`, HF_TOKEN) has write access to it") from None
            raise UserError(f"the Hub refused the push to {self.repo_id}: {str(exc).splitlines()[0]}") from None
        if _is_network_error(exc):
            raise UserError(f"could not reach the Hub to push {self.repo_id}: {exc}") from None
        return False


def _is_network_error(exc: BaseException) -> bool:
    try:
        import httpx
    except ImportError:  # pragma: no cover - huggingface_hub brings httpx
        return isinstance(exc, ConnectionError)
    return isinstance(exc, (ConnectionError, httpx.TransportError))
