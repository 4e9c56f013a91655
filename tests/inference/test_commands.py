"""speechlm generate / merge / push, called as the console script's main()."""

from __future__ import annotations

import json
import shutil

import pytest
import soundfile as sf
from huggingface_hub import CommitInfo, HfApi
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoProcessor

from speechlm.cli import main
from tests.inference.conftest import SAMPLE

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
SECRET = "hf_NotARealTokenButSecret1234567890"


def test_generate_streams_text_and_writes_the_speech(speaking_dir, tmp_path, capsys):
    wav = tmp_path / "answer.wav"
    code = main(["generate", "--model", str(speaking_dir), "--audio", str(SAMPLE), "--text", "What?",
                 "--output", "text+speech", "--out-audio", str(wav), "--max-new-tokens", "4",
                 "--max-speech-units", "30"])
    assert code == 0
    audio, rate = sf.read(wav)
    assert rate == 16000 and 0 < audio.size <= 30 * 320
    assert f"to {wav}" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--output", "speech", "--text", "hi"], "--output speech speaks: give --out-audio FILE.wav"),
    (["--output", "text"], "give --audio FILE and/or --text STR"),
    (["--audio", "nope.flac"], "nope.flac: audio file not found"),
    (["--text", "hi", "--out-audio", "x.wav"], "--out-audio needs --output speech or text+speech"),
])
def test_generate_user_errors_exit_2_with_one_line(speaking_dir, capsys, args, message):
    assert main(["generate", "--model", str(speaking_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("speechlm generate: error: ") and message in err and "\n" not in err


def test_merge_makes_a_checkpoint_that_needs_no_base(lora_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(lora_dir), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["text_model_name_or_path"] is None and config["mode"] == "frozen"
    with safe_open(out / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert not any("lora_" in key for key in keys)
    assert (out / "codec" / "SpeechTokenizer.pt").is_file()
    assert main(["merge", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "not a saved SpeechLM directory" in capsys.readouterr().err


@pytest.fixture
def hub_calls(monkeypatch):
    """What push would send: create_repo arguments and each committed file's bytes."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = {"repo_id": repo_id, **kwargs}

    def create_commit(self, repo_id, operations, **kwargs):
        calls["files"] = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
        calls["commit"] = {"repo_id": repo_id, **kwargs}
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", commit_message="",
                          commit_description="", oid="abc")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return calls


@pytest.fixture
def hub_adapter(lora_dir, tmp_path):
    """The LoRA checkpoint as if its base were the Hub's SmolLM2, with a recipe and an eval report."""
    directory = tmp_path / "adapter"
    shutil.copytree(lora_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["text_model_name_or_path"] = HUB_BASE
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "training_recipe.yaml").write_text("# speechlm train configs/tiny/train.yaml\nmax_steps: 2\n")
    (directory / "eval_asr.json").write_text(json.dumps({"task": "asr", "data": "dev.jsonl",
                                                         "totals": {"wer": 0.25, "items": 40}}))
    return directory


def test_push_uploads_a_small_adapter_with_a_card(hub_adapter, hub_calls, capsys):
    assert main(["push", str(hub_adapter), "me/tiny-speechlm", "--private"]) == 0
    assert hub_calls["repo"] == {"repo_id": "me/tiny-speechlm", "repo_type": "model", "private": True,
                                 "exist_ok": True}
    files = hub_calls["files"]
    assert {"README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "codec/config.json", "codec/SpeechTokenizer.pt", "training_recipe.yaml"} <= set(files)
    config = json.loads(files["config.json"])
    assert config["text_model_name_or_path"] == HUB_BASE
    # Adapter-only: LoRA, projector and speech rows, never the backbone's own weights.
    header = json.loads(files["model.safetensors"][8:8 + int.from_bytes(files["model.safetensors"][:8], "little")])
    backbone = [key for key in header if key.startswith("language_model.")]
    assert backbone and all("lora_" in key for key in backbone)
    card = files["README.md"].decode()
    front = card.split("---")[1]
    assert f"base_model: {HUB_BASE}" in front and "library_name: speechlm" in front
    assert "pipeline_tag: any-to-any" in front and "- lora" in front and "- adapter" in front
    assert "- speechtokenizer" in front and "(SpeechTokenizer layer 1, 50 Hz)" in card  # the codec's kind
    assert "max_steps: 2" in card and "| wer | 0.25 |" in card and "asr" in card
    assert 'pipeline("speechlm", model="me/tiny-speechlm")' in card
    out = capsys.readouterr()
    assert "me/tiny-speechlm/commit/abc" in out.out
    # The token is huggingface_hub's to read: it appears in nothing sent or shown.
    assert all(SECRET.encode() not in content for content in files.values())
    assert SECRET not in out.out + out.err


def test_push_merged_sends_a_standalone_checkpoint(hub_adapter, lora_dir, hub_calls, tmp_path):
    # Merging loads the base, so point the config back at the local one; the card still names the source.
    config = json.loads((lora_dir / "config.json").read_text())
    (hub_adapter / "config.json").write_text(json.dumps(config))
    assert main(["push", str(hub_adapter), "me/merged", "--merged"]) == 0
    files = hub_calls["files"]
    assert json.loads(files["config.json"])["text_model_name_or_path"] is None
    header = json.loads(files["model.safetensors"][8:8 + int.from_bytes(files["model.safetensors"][:8], "little")])
    assert "language_model.model.layers.0.mlp.up_proj.weight" in header
    card = files["README.md"].decode()
    assert "- merged" in card and "base_model:" not in card  # a local base is no Hub model to link
    assert "max_steps: 2" in card


def test_push_refuses_an_adapter_whose_base_is_a_local_path(lora_dir, hub_calls, capsys):
    assert main(["push", str(lora_dir), "me/x"]) == 2
    err = capsys.readouterr().err
    assert "comes from the local path" in err and "--merged" in err
    assert "files" not in hub_calls


def test_init_saves_the_codec_inside_a_directory_that_can_move(tmp_path):
    from pathlib import Path

    from transformers import AutoProcessor

    tiny_yaml = Path(__file__).parents[2] / "configs" / "tiny" / "model.yaml"
    assert main(["init", str(tiny_yaml), "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "processor_config.json").read_text())["codec_name_or_path"] == "codec"
    (tmp_path / "a").rename(tmp_path / "b")
    codec = AutoProcessor.from_pretrained(tmp_path / "b").codec
    assert codec.codebook_size == 1024 and codec.n_q == 1 and codec.codebooks_filled


def test_a_codec_must_fit_the_speech_units(tmp_path, capsys):
    from pathlib import Path

    tiny_yaml = Path(__file__).parents[2] / "configs" / "tiny" / "model.yaml"
    assert main(["init", str(tiny_yaml), "--out", str(tmp_path), "codec.codebook_size=512"]) == 2
    assert "codec.codebook_size=512 differs from num_speech_units=1024" in capsys.readouterr().err


def test_merge_of_a_qlora_checkpoint_folds_lora_into_full_precision_weights(llama_dir, tmp_path):
    """4-bit weights cannot take a merge exactly: the backbone is reloaded in full precision first."""
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForCausalLM

    from speechlm.adapters.building import build_processor, build_speechlm
    from tests.conftest import tiny_spec

    base = tmp_path / "base"
    shutil.copytree(llama_dir, base)
    model, tokenizer = build_speechlm(tiny_spec(text_model=str(base), text=None, mode="qlora"))
    with torch.no_grad():
        for name, param in model.language_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    qlora = tmp_path / "qlora"
    model.save_pretrained(qlora)
    build_processor(tokenizer, model.config).save_pretrained(qlora)
    assert main(["merge", str(qlora), "--out", str(tmp_path / "merged")]) == 0

    ids = torch.tensor([tokenizer("merge me").input_ids])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(qlora, mode="lora")(input_ids=ids).logits
    shutil.rmtree(base)  # the merged checkpoint needs no base
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.mode == "frozen" and not getattr(merged.text_model, "is_loaded_in_4bit", False)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_token_given_to_loading_is_written_nowhere(speaking_dir, tmp_path, capsys, caplog):
    model = AutoModelForCausalLM.from_pretrained(speaking_dir, token=SECRET)
    processor = AutoProcessor.from_pretrained(speaking_dir, token=SECRET)
    assert processor.has_codec and processor.codec is not None  # the codec loads with the same hub arguments
    model.save_pretrained(tmp_path / "again")
    processor.save_pretrained(tmp_path / "again")
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written and all(SECRET.encode() not in path.read_bytes() for path in written)
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err + caplog.text
    assert SECRET not in repr(model.config) + str(processor.to_dict())
