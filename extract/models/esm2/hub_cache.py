"""Hugging Face hub repo ids (`facebook/esm2_t33_650M_UR50D[@revision]`) resolved in the local Hugging Face
cache, with the hub's own conventions and no network: the cache is `HF_HUB_CACHE` (or the older
`HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
`~/.cache/huggingface/hub`; a repo is `models--<owner>--<name>/`, a branch or tag names a commit in `refs/`,
and a commit's files are in `snapshots/<commit>/`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from extract.errors import UserError

# A revision may name a branch with slashes, but not climb out of `refs/` with `..`.
REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>(?!.*\.\.)[\w./-]+))?")
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
FILE_SUFFIXES = (".pt", ".bin", ".safetensors", ".json")  # a path to a file, not a repo id


@dataclass(frozen=True)
class Snapshot:
    repo_id: str
    commit: str
    directory: Path


def is_repo_id(spec: str) -> bool:
    return REPO_ID.fullmatch(spec) is not None and not spec.endswith(FILE_SUFFIXES)


def cache_directory() -> Path:
    hub_cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if hub_cache:
        return Path(hub_cache).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("HF_HOME") or Path(xdg_cache) / "huggingface").expanduser() / "hub"


def cached_snapshot(spec: str) -> Snapshot:
    """The cached snapshot of `owner/name[@revision]` (default revision: main)."""
    match = REPO_ID.fullmatch(spec)
    repo_id, revision = match["repo"], match["revision"] or "main"
    repo = cache_directory() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / revision
    if COMMIT_HASH.fullmatch(revision):
        commit = revision
    elif ref.is_file():
        commit = ref.read_text().strip()
    else:
        raise UserError(f"model {spec}: not in the Hugging Face cache {cache_directory()} (no {ref}); fetch it "
                        f"where there is network with `hf download {repo_id}"
                        f"{f' --revision {revision}' if revision != 'main' else ''}` (HF_HUB_CACHE or HF_HOME "
                        f"choose the cache), or pass the model's directory")
    if not COMMIT_HASH.fullmatch(commit):
        raise UserError(f"model {spec}: {ref} holds no commit hash; fetch the model again with `hf download {repo_id}`")
    directory = repo / "snapshots" / commit
    if not directory.is_dir():
        raise UserError(f"model {spec}: the Hugging Face cache has no snapshot of commit {commit} ({directory}); "
                        f"fetch it with `hf download {repo_id} --revision {commit}`")
    return Snapshot(repo_id, commit, directory)
