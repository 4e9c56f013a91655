"""Where a model's, processor's or codec's files come from: a local path, or a Hub repo id (``owner/name``,
optionally followed by a folder inside the repo: ``fnlp/SpeechTokenizer/speechtokenizer_hubert_avg``).

A name that exists on disk is a path, as in transformers. Anything else is a repo id, fetched by
``huggingface_hub`` into its cache, or with ``HF_HUB_OFFLINE=1`` (or ``local_files_only``) read from the
cache alone; a repo that is not there is an error that names it and the cache, instead of
huggingface_hub's message, which names neither.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What a download takes (revision: a branch, tag or commit of the repo); local paths ignore them, as in transformers.
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
_REPO_PATH = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")


def split_repo_path(name: str) -> tuple[str, str]:
    """``"owner/name/sub/folder"`` -> ``("owner/name", "sub/folder")``; a repo id has exactly two parts."""
    if not _REPO_PATH.match(name) or ".." in name.split("/"):
        raise FileNotFoundError(f"{name}: no such local path, and not a Hub repo id (owner/name, optionally "
                                f"followed by a folder in the repo: owner/name/folder)")
    owner, repo, *folder = name.split("/")
    return f"{owner}/{repo}", "/".join(folder)


def is_offline(hub_kwargs: dict | None = None) -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE or (hub_kwargs or {}).get("local_files_only"))


def not_cached_message(what: str, name: str, hub_kwargs: dict | None = None) -> str:
    """What to say when ``name`` is neither on disk nor in the Hub cache and nothing may be downloaded."""
    from huggingface_hub import constants

    repo_id = split_repo_path(name)[0]
    cache = (hub_kwargs or {}).get("cache_dir") or constants.HF_HUB_CACHE
    revision = (hub_kwargs or {}).get("revision") or "main"
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "local_files_only=True"
    return (f"{what} {name!r}: no such local path, and the Hub repo {repo_id} (revision {revision}) is not in the "
            f"Hugging Face cache {cache} ({why}, so nothing is downloaded). Download it where the Hub is reachable "
            f"(`hf download {repo_id}` with this HF_HUB_CACHE), or give a local directory")


def download_repo_folder(what: str, name: str, *, patterns: tuple[str, ...] | None = None, subfolder: str = "",
                         **hub_kwargs) -> Path:
    """The local folder of ``name`` (``owner/name[/folder]``, plus ``subfolder``) in a snapshot of its repo:
    downloaded into the Hub cache, or read from it offline. ``patterns`` (relative to that folder) limit
    what is fetched; by default the whole repo."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, folder = split_repo_path(name)
    folder = "/".join(part for part in (folder, subfolder) if part)
    if patterns is not None:
        hub_kwargs["allow_patterns"] = [f"{folder}/{p}" if folder else p for p in patterns]
    try:
        snapshot = snapshot_download(repo_id, **hub_kwargs)
    except LocalEntryNotFoundError as error:
        if is_offline(hub_kwargs):
            raise FileNotFoundError(not_cached_message(what, name, hub_kwargs)) from error
        raise FileNotFoundError(f"{what} {name!r}: no such local path, and the Hub repo {repo_id} could not be "
                                f"fetched ({error})") from error
    path = Path(snapshot) / folder
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {name!r}: the Hub repo {repo_id} has no folder {folder!r} (or none of "
                                f"its files in the cache)")
    return path


def missing_from_cache(name: str | os.PathLike, hub_kwargs: dict | None = None) -> bool:
    """Whether ``name`` is a repo id that cannot load here: not on disk, nothing may be downloaded, and the cache
    has no snapshot of it at the revision asked for (a branch or tag in ``refs/``, or a commit)."""
    from huggingface_hub import constants

    if hub_name(name) is None or not is_offline(hub_kwargs):
        return False
    repo_id = split_repo_path(str(name))[0]
    kwargs = hub_kwargs or {}
    repo = Path(kwargs.get("cache_dir") or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    revision = kwargs.get("revision") or "main"
    # what snapshot_download looks for offline before it gives up
    return not ((repo / "refs" / revision).is_file() or (repo / "snapshots" / revision).is_dir())


def hub_name(name: str | os.PathLike) -> str | None:
    """``name`` as a repo id when it is not a local path, else None."""
    return None if Path(name).exists() or str(name).startswith((".", "/")) else str(name)
