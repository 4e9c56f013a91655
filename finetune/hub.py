"""Standalone checkpoints (``speechlm merge``) and Hub uploads with a model card (``speechlm push``).

The Hub token is huggingface_hub's business: it reads ``HF_TOKEN`` or the login cache itself. Nothing
here reads, prints or writes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from speechlm.adapters.configuration import SpeechLMConfig
from speechlm.adapters.modeling import SpeechLMForCausalLM
from speechlm.adapters.modes import merge_lora
from speechlm.speech_io.processor import SpeechLMProcessor

# Written beside a trained model by the training and evaluation commands; the card quotes them if present.
RECIPE_FILE = "training_recipe.yaml"
EVAL_FILE_PATTERN = "eval*.json"
CARD_NAME = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model's speech units are, by its codec folder's kind (`speech_io.codec_loading.codec_type`).
UNIT_KINDS = {"speechtokenizer": "SpeechTokenizer layer 1, 50 Hz",
              "whisper-units": "k-means codes of Whisper encoder frames, 50 Hz, decoded by a vocoder trained for them"}


def merge_checkpoint(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Save ``source`` with LoRA folded into the backbone and every base weight included (no base model
    needed to load it), with its processor and codec. A QLoRA checkpoint is merged in full precision."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the checkpoint itself; merge into a new directory")
    config = SpeechLMConfig.from_pretrained(source)
    # 4-bit weights cannot take a merge exactly: reload the backbone in full precision first.
    mode = "lora" if config.mode == "qlora" else None
    model = merge_lora(SpeechLMForCausalLM.from_pretrained(source, mode=mode))
    model.save_pretrained(out)
    if (source / "processor_config.json").is_file():
        SpeechLMProcessor.from_pretrained(source).save_pretrained(out)
    for extra in (RECIPE_FILE, *(p.name for p in source.glob(EVAL_FILE_PATTERN))):
        if (source / extra).is_file():
            shutil.copy2(source / extra, out / extra)
    return out


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a Hub repo id rather than a local path (which others cannot load)."""
    return bool(name) and _HUB_ID.match(name) is not None and not Path(name).exists()


def model_card(directory: str | os.PathLike, repo_id: str, *, base_model: str | None = None) -> str:
    """README.md for a saved SpeechLM: Hub metadata, what it is built from, its recipe and eval figures
    when present, and how to use it."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    processor = _read_json(directory / "processor_config.json") or {}
    base_model = base_model or config.get("text_model_name_or_path")
    adapter_only = config.get("text_model_name_or_path") is not None and config.get("mode") != "full"
    speaks = processor.get("codec_name_or_path") is not None
    codec_kind = _codec_kind(directory / processor["codec_name_or_path"]) if speaks else None
    text_type = config.get("text_config", {}).get("model_type", "llama")
    tags = ["speechlm", "speech-language-model", "audio", text_type, "whisper"]
    tags += [codec_kind, "text-to-speech"] if speaks else []
    tags += [config.get("mode", "frozen"), "adapter" if adapter_only else "merged" if base_model else "standalone"]
    metadata = {"library_name": "speechlm", "pipeline_tag": "any-to-any" if speaks else "audio-text-to-text",
                "tags": tags}
    if is_hub_id(base_model):
        metadata["base_model"] = base_model
        if not adapter_only:
            metadata["base_model_relation"] = "merge" if config.get("mode") != "full" else "finetune"
    projector = config.get("projector_config", {})
    audio = config.get("audio_config", {})
    outputs = "text, speech or text then speech" if speaks else "text"
    lines = [
        "---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "",
        f"# {repo_id.split('/')[-1]}", "",
        f"A speech language model made with [speechlm](https://pypi.org/project/speechlm/): it hears through a "
        f"Whisper encoder ({audio.get('n_audio_layer')} layers, width {audio.get('n_audio_state')}) and a "
        f"`{projector.get('projector_type')}` projector (stacking {projector.get('stack_factor')} frames) into a "
        f"{text_type} backbone" + (f" ([{base_model}](https://huggingface.co/{base_model}))" if is_hub_id(base_model)
                                   else "") + f", and answers in {outputs}.", "",
        "| | |", "| --- | --- |",
        f"| backbone training | {config.get('mode')} |",
        f"| weights in this repo | {'adapters only (projector, new vocabulary rows, LoRA); the backbone loads from ' + str(base_model) if adapter_only else 'everything (standalone)'} |",  # noqa: E501
        f"| speech units | {config.get('num_speech_units')} ({UNIT_KINDS[codec_kind] if speaks else 'none'}) |",
        f"| speech output codec | {'`' + processor['codec_name_or_path'] + '/` in this repo' if speaks else 'none'} |",
        "",
    ]
    recipe = directory / RECIPE_FILE
    if recipe.is_file():
        lines += ["## Training recipe", "", "```yaml", recipe.read_text().strip(), "```", ""]
    evals = sorted(directory.glob(EVAL_FILE_PATTERN))
    if evals:
        lines += ["## Evaluation", ""]
        for path in evals:
            lines += _eval_table(path)
    example = "text+speech" if speaks else "text"
    lines += [
        "## Usage", "", "```bash", "pip install speechlm", "```", "", "```python",
        "import speechlm  # registers the model, processor and the \"speechlm\" pipeline with transformers",
        "from transformers import pipeline", "",
        f'pipe = pipeline("speechlm", model="{repo_id}")',
        f'reply = pipe("question.wav", text="Answer the question.", output="{example}")',
        'print(reply["text"])  # reply["audio"]: {"array", "sampling_rate"} when it spoke', "```", "",
        "Or from the command line:", "", "```bash",
        f"speechlm generate --model {repo_id} --audio question.wav --output {example} --out-audio answer.wav",
        "```", "",
    ]
    return "\n".join(lines)


def _eval_table(path: Path) -> list[str]:
    """The numbers of an eval report: its ``totals`` (or top-level numbers) as a table."""
    report = _read_json(path)
    if not isinstance(report, dict):
        return []
    figures = report.get("totals", report)
    rows = [(key, value) for key, value in figures.items() if isinstance(value, (int, float))
            and not isinstance(value, bool)] if isinstance(figures, dict) else []
    if not rows:
        return []
    title = report.get("task") or path.stem
    data = report.get("data")
    heading = f"{title}" + (f" on `{data}`" if isinstance(data, str) else "")
    return [f"**{heading}**", "", "| metric | value |", "| --- | --- |",
            *(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in rows), ""]


def _codec_kind(folder: Path) -> str:
    from speechlm.speech_io.codec_loading import codec_type

    return codec_type(folder) if folder.is_dir() else "speechtokenizer"  # a Hub codec: the published kind


def _read_json(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def stage_upload(directory: str | os.PathLike, repo_id: str, staging: str | os.PathLike, *, merged: bool) -> Path:
    """Fill ``staging`` with exactly what the repo receives: the checkpoint (merged if asked), its
    processor and codec, and a generated model card."""
    directory, staging = Path(directory), Path(staging)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: not a saved SpeechLM (no config.json)")
    config = json.loads((directory / "config.json").read_text())
    base = config.get("text_model_name_or_path")
    if merged:
        merge_checkpoint(directory, staging)
    else:
        adapter_only = base is not None and config.get("mode") != "full"
        for key, what in (("text_model_name_or_path", "backbone"), ("audio_model_name_or_path", "Whisper encoder")):
            source = config.get(key)
            if adapter_only and source is not None and not is_hub_id(source):
                raise ValueError(f"{directory}: the {what} comes from the local path {source!r}, which nobody who "
                                 f"downloads this repo has; push with --merged to include the base weights")
        shutil.copytree(directory, staging, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(CARD_NAME, ".*", "__pycache__", "checkpoint-*"))
    (staging / CARD_NAME).write_text(model_card(staging, repo_id, base_model=base))
    return staging


def push(directory: str | os.PathLike, repo_id: str, *, private: bool = False, merged: bool = False,
         api=None) -> str:
    """Create (or reuse) the model repo ``repo_id`` and upload the staged checkpoint in one commit.
    Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api or HfApi()
    with tempfile.TemporaryDirectory(prefix="speechlm-push-") as staging:
        stage_upload(directory, repo_id, staging, merged=merged)
        # One explicit commit of exactly the staged files (upload_folder may split or skip files).
        operations = [CommitOperationAdd(path_in_repo=path.relative_to(staging).as_posix(), path_or_fileobj=str(path))
                      for path in sorted(Path(staging).rglob("*")) if path.is_file()]
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations=operations, repo_type="model",
                                 commit_message=f"Upload SpeechLM ({'merged' if merged else 'as saved'}) with speechlm")
    return str(getattr(info, "commit_url", info))
