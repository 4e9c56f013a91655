"""A Hugging Face cache as ``huggingface_hub`` (2.x) leaves it after downloading a repo, for tests that load Hub
repo ids with ``HF_HUB_OFFLINE=1``.

The layout, per repo ``owner/name``, under the cache root (``HF_HUB_CACHE``)::

    models--owner--name/
        blobs/<etag>                      file contents; etag = git blob sha1, or sha256 for git-LFS files
        refs/main                         the commit the branch points at (no newline)
        snapshots/<commit>/<path>         relative symlinks to ../../blobs/<etag> (one more ../ per folder)
        trees/<commit>.json               the tree listing; offline, snapshot_download checks the snapshot against it

No Hub code writes it here (``huggingface_hub`` has no public call that fills a cache without a server);
`test_the_cache_is_what_huggingface_hub_reads` checks it with ``scan_cache_dir`` and ``try_to_load_from_cache``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Binary weights live in git LFS on the Hub (its default .gitattributes); the cache names their blobs by sha256.
LFS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".model")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_repo(cache_dir: str | os.PathLike, repo_id: str, folder: str | os.PathLike, *,
               revision: str = "main") -> Path:
    """Put every file under ``folder`` into the cache at ``cache_dir`` as the snapshot of ``repo_id`` at
    ``revision``; returns the snapshot folder."""
    folder = Path(folder)
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    entries: dict[str, dict] = {}
    blobs: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        if path.suffix in LFS_SUFFIXES:
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
            entries[name] = {"size": len(pointer), "blob_id": git_blob_sha1(pointer.encode()),
                             "lfs_sha256": sha256, "lfs_size": len(data)}
            blobs[name] = sha256
        else:
            entries[name] = {"size": len(data), "blob_id": git_blob_sha1(data)}
            blobs[name] = entries[name]["blob_id"]
        (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "blobs" / blobs[name]).write_bytes(data)
    commit = hashlib.sha1(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    for name, blob in blobs.items():
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo_dir / "blobs" / blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    (repo_dir / "trees").mkdir(exist_ok=True)
    (repo_dir / "trees" / f"{commit}.json").write_text(
        json.dumps({"format_version": 1, "files": entries}, indent=1, sort_keys=True))
    return snapshot


@contextmanager
def offline_cache(cache_dir: str | os.PathLike) -> Iterator[Path]:
    """Within: ``cache_dir`` is the Hub cache (of this process, and of the processes it starts) and nothing is
    downloaded, as with ``HF_HUB_CACHE=cache_dir HF_HUB_OFFLINE=1`` set before the program started."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        # huggingface_hub reads both variables once, at import; its functions read these attributes per call.
        patch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setenv("HF_HUB_CACHE", str(cache_dir))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield Path(cache_dir)
