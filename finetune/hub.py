"""Upload a trained model folder (weights, config, processor) to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

# Checkpoints hold optimizer state and are for resuming here, not for sharing.
IGNORED = ["checkpoint-*", "checkpoint-*/**", "runs/**", ".cache/**", "*.tmp*"]


def push_folder(folder: str | Path, repo_id: str, *, private: bool = True, token: str | None = None,
                commit_message: str = "speechlm train: final model") -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` but its checkpoints; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=IGNORED,
                      commit_message=commit_message)
    return str(url)
