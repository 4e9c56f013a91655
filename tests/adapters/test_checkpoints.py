from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import speechlm  # noqa: F401  (registers the Auto classes)
from speechlm import SpeechLMForCausalLM, merge_lora
from speechlm.adapters.building import build_speechlm
from tests.adapters.conftest import audio_inputs
from tests.conftest import tiny_spec


def save(model, tokenizer, directory):
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_random_model_saves_whole_and_reloads_exactly(tiny, tmp_path):
    model, tokenizer = tiny
    save(model, tokenizer, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, SpeechLMForCausalLM)
    inputs = audio_inputs(model, tokenizer, [40, 22])
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())


def test_frozen_backbone_with_a_source_saves_only_what_trained(llama_dir, whisper_pt, tmp_path):
    model, tokenizer = build_speechlm(tiny_spec(text_model=llama_dir, text={}, audio_encoder=whisper_pt, audio={}))
    save(model, tokenizer, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert {key.split(".")[0] for key in saved} == {"multi_modal_projector", "speech_vocab"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_model_name_or_path"] == llama_dir and config["audio_model_name_or_path"] == whisper_pt
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    inputs = audio_inputs(model, tokenizer, [40])
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_lora_checkpoint_holds_adapters_and_reloads_exactly(llama_dir, tmp_path):
    model, tokenizer = build_speechlm(tiny_spec(text_model=llama_dir, text={}, mode="lora"))
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for name, param in model.language_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    save(model, tokenizer, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    lm_keys = [key for key in saved if key.startswith("language_model.")]
    assert lm_keys and all("lora_" in key for key in lm_keys)
    loaded = SpeechLMForCausalLM.from_pretrained(tmp_path)
    inputs = audio_inputs(model, tokenizer, [40])
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)


def test_merge_makes_a_standalone_checkpoint(llama_dir, tmp_path):
    backbone = tmp_path / "base"
    shutil.copytree(llama_dir, backbone)
    model, tokenizer = build_speechlm(tiny_spec(text_model=str(backbone), text={}, mode="lora"))
    with torch.no_grad():
        for name, param in model.language_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    inputs = audio_inputs(model, tokenizer, [40])
    before = logits(model, inputs)
    merged = merge_lora(model)
    save(merged, tokenizer, tmp_path / "merged")
    shutil.rmtree(backbone)  # the merged checkpoint must not need the base any more
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(loaded, inputs), before, rtol=1e-5, atol=1e-5)
    assert loaded.config.mode == "frozen" and loaded.config.text_model_name_or_path is None


def test_tokenizer_from_another_checkpoint_is_named(tiny, tmp_path):
    model, tokenizer = tiny
    save(model, tokenizer, tmp_path)
    other = AutoTokenizer.from_pretrained(tmp_path)
    other.add_tokens(["<|extra|>"])
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizer: has 279 tokens but the model config expects 278"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_weights_with_another_speech_vocabulary_are_named(tiny, tmp_path):
    model, tokenizer = tiny
    save(model, tokenizer, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["speech_vocab.embed_tokens.weight"] = weights["speech_vocab.embed_tokens.weight"][:10]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="has 10 speech-vocabulary rows but config.json expects 19"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_tensors_are_named(tiny, tmp_path):
    model, tokenizer = tiny
    save(model, tokenizer, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["multi_modal_projector.linear_1.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing 1 tensors \\['multi_modal_projector.linear_1.weight'\\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "speechlm"}))
        SpeechLMForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a SpeechLM directory"):
        SpeechLMForCausalLM.from_pretrained(str(tmp_path / "nowhere"))


def test_qlora_checkpoint_reloads_in_4bit_and_in_full_precision(llama_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    model, tokenizer = build_speechlm(tiny_spec(text_model=llama_dir, text={}, mode="qlora"))
    save(model, tokenizer, tmp_path)
    assert all(not key.startswith("language_model.") or "lora_" in key
               for key in load_file(tmp_path / "model.safetensors"))
    inputs = audio_inputs(model, tokenizer, [30])
    assert torch.equal(logits(SpeechLMForCausalLM.from_pretrained(tmp_path), inputs), logits(model, inputs))
    full_precision = SpeechLMForCausalLM.from_pretrained(tmp_path, mode="lora")
    assert not getattr(full_precision.text_model, "is_loaded_in_4bit", False)


def test_a_hub_revision_picks_the_speechlm_snapshot_not_the_base_models(llama_dir, tmp_path, monkeypatch):
    import huggingface_hub

    from speechlm.adapters import loading

    model, tokenizer = build_speechlm(tiny_spec(text_model=llama_dir, text={}))
    save(model, tokenizer, tmp_path / "snapshot")
    downloads, backbones = [], []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kwargs: downloads.append((repo, kwargs)) or str(tmp_path / "snapshot"))
    load_backbone = loading.load_backbone
    monkeypatch.setattr(loading, "load_backbone",
                        lambda source, **kwargs: backbones.append((source, kwargs)) or load_backbone(source, **kwargs))
    loaded = SpeechLMForCausalLM.from_pretrained("someone/speech-llama", revision="v1", token="t")
    assert downloads == [("someone/speech-llama", {"revision": "v1", "token": "t"})]
    assert backbones[0][0] == llama_dir and "revision" not in backbones[0][1] and backbones[0][1]["token"] == "t"
    # the name stays the one asked for; the pipeline loads the processor from the snapshot of that revision
    assert loaded.name_or_path == "someone/speech-llama" and loaded.checkpoint_dir == tmp_path / "snapshot"


def test_dtype_auto_is_the_checkpoints_and_an_unknown_dtype_is_named(tiny, tmp_path):
    model, tokenizer = tiny
    save(model.to(torch.bfloat16), tokenizer, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert {p.dtype for p in loaded.multi_modal_projector.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(tmp_path).multi_modal_projector.parameters()} \
        == {torch.float32}  # not given: float32, as before
    with pytest.raises(ValueError, match="dtype='float8'.*'auto'"):
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype="float8")


def test_a_device_map_puts_the_model_on_one_device_or_says_no(tiny, tmp_path):
    model, tokenizer = tiny
    save(model, tokenizer, tmp_path)
    for device_map in ("cpu", {"": "cpu"}, {"language_model": "cpu", "audio_tower": "cpu"}, "auto"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map)
        assert {p.device.type for p in loaded.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"} \
            if device_map == "auto" else {"cpu"}
    with pytest.raises(ValueError, match="spreads it over"):
        AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"language_model": "cpu", "audio_tower": "disk"})
    with pytest.raises(ValueError, match="not a device"):
        AutoModelForCausalLM.from_pretrained(tmp_path, device_map="the-gpu")


def test_unknown_loading_arguments_are_refused_by_name(tiny, tmp_path):
    model, tokenizer = tiny
    save(model, tokenizer, tmp_path)
    with pytest.raises(TypeError, match="low_cpu_mem_usagee"):
        SpeechLMForCausalLM.from_pretrained(tmp_path, low_cpu_mem_usagee=True)
    with pytest.raises(TypeError, match="positional"):
        SpeechLMForCausalLM.from_pretrained(tmp_path, "extra")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", local_files_only=True)
    assert loaded.text_model.config._attn_implementation == "eager"


def test_the_backbone_loads_without_hub_kernels_unless_asked(llama_dir, tmp_path, monkeypatch):
    # transformers kernelizes a model loaded onto a GPU by default, fetching kernels from the Hub (offline that
    # load fails): the backbone is loaded with use_kernels=False, and a caller may still ask for them.
    from speechlm.adapters import loading

    model, tokenizer = build_speechlm(tiny_spec(text_model=llama_dir, text={}))
    save(model, tokenizer, tmp_path)
    asked = []
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained",
                        lambda source, **kwargs: asked.append(kwargs["use_kernels"]) or load(source, **kwargs))
    SpeechLMForCausalLM.from_pretrained(tmp_path)
    SpeechLMForCausalLM.from_pretrained(tmp_path, use_kernels=True)
    assert asked == [False, True]
