from __future__ import annotations

import pytest
import torch

from speechlm.configfile import apply_overrides, build_dataclass, read_yaml
from speechlm.finetune import recipe
from speechlm.finetune.alignment import align_projector
from speechlm.finetune.config import AlignmentConfig, TrainConfig
from speechlm.finetune.examples import Example
from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.features import log_mel_features
from tests.finetune.conftest import TINY_TRAIN_YAML

# The tiny default's byte tokenizer spells a transcript a token per character: stacking 1 keeps 50 frames
# a second, more than the demo corpus speaks characters.
TINY = ["model.projector.stack_factor=1", "model.mode=frozen"]


def tiny_model(prepared, *extra):
    config = build_dataclass(TrainConfig, apply_overrides(read_yaml(TINY_TRAIN_YAML), [
        f"data.train=[{prepared}]", *TINY, *extra]))
    model, tokenizer = recipe.build_model(config)
    return config, model, tokenizer


def test_ctc_alignment_trains_only_the_projector_and_its_loss_falls(prepared):
    config, model, tokenizer = tiny_model(prepared, "alignment.max_steps=40", "alignment.batch_size=4",
                                          "alignment.learning_rate=0.01")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    examples = recipe.load_training_examples(config)
    result = recipe.align(config, model, tokenizer, examples, progress=False)
    assert result.steps == 40 and result.clips == len(examples) and not result.skipped
    assert result.vocabulary == len({t for e in examples for t in tokenizer(e.text, add_special_tokens=False)["input_ids"]})
    assert result.losses[-1] < 0.7 * result.losses[0]
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and all(name.startswith("multi_modal_projector.") for name in changed)
    # the projected frames come out at the scale of the LM's embeddings
    features = log_mel_features([load_audio(examples[0].audio)])
    with torch.no_grad():
        frames = model.get_audio_features(features.input_features, features.input_features_mask)
    embedding_norm = model.get_input_embeddings().weight.norm(dim=1).mean()
    assert frames.norm(dim=-1).mean() == pytest.approx(embedding_norm.item(), rel=0.3)


def test_alignment_off_by_default_and_the_recipe_runs_it_before_the_trainer(prepared, tmp_path):
    config, model, tokenizer = tiny_model(prepared)
    assert config.alignment.max_steps == 0
    assert recipe.align(config, model, tokenizer, recipe.load_training_examples(config)) is None
    config = build_dataclass(TrainConfig, apply_overrides(read_yaml(TINY_TRAIN_YAML), [
        f"data.train=[{prepared}]", *TINY, "alignment.max_steps=3", "alignment.batch_size=2",
        "training.max_steps=1", f"training.output_dir={tmp_path}", "data.num_samples=4"]))
    assert (recipe.run(config) / "model.safetensors").is_file()


def test_clips_with_more_tokens_than_frames_are_left_out_and_counted(prepared):
    config, model, tokenizer = tiny_model(prepared)
    examples = recipe.load_training_examples(config)
    wordy = Example(id="wordy", audio=examples[0].audio, text="a far longer transcript than the clip " * 20)
    result = align_projector(model, tokenizer, [*examples, wordy], AlignmentConfig(max_steps=2, batch_size=2),
                             progress=False)
    assert result.clips == len(examples)
    assert result.skipped == {"more transcript tokens than projected frames": 1}


def test_no_usable_clip_is_a_clear_error(prepared):
    config, model, tokenizer = tiny_model(prepared)
    examples = recipe.load_training_examples(config)
    with pytest.raises(ValueError, match="no training example has both audio and text"):
        align_projector(model, tokenizer, [Example(id="t", text="words only")], AlignmentConfig(max_steps=2))
    config_with_long = AlignmentConfig(max_steps=2)
    with pytest.raises(ValueError, match="none of the 12 transcribed clips is usable.*longer than max_audio_seconds"):
        align_projector(model, tokenizer, examples, config_with_long, max_audio_seconds=0.01, progress=False)


@pytest.mark.parametrize("key, value, message", [
    ("max_steps", -1, "max_steps=-1: must be >= 0"),
    ("batch_size", 0, "batch_size=0: must be >= 1"),
    ("max_minutes", 0, "max_minutes=0: must be > 0 or null"),
])
def test_bad_alignment_settings_name_the_field(key, value, message):
    with pytest.raises(ValueError, match=f"invalid alignment:\n  - {message}"):
        AlignmentConfig(**{key: value})


def test_the_summary_says_when_no_step_ran():
    from speechlm.finetune.alignment import AlignmentResult

    ran = AlignmentResult(steps=40, seconds=90.0, clips=12, skipped={}, vocabulary=30, losses=[5.0, 1.0])
    assert ran.summary() == "CTC pre-alignment: 40 steps on 12 clips (softmax over 30 tokens) in 1.5 min, CTC loss 5.000 -> 1.000"
    none = AlignmentResult(steps=0, seconds=240.0, clips=3, skipped={"out of time before it was encoded": 9},
                           vocabulary=7, losses=[])
    assert "no step (out of time); left out: {'out of time before it was encoded': 9}" in none.summary()


def test_ctc_compression_keeps_what_the_alignment_learned_and_needs_it(prepared):
    config, model, tokenizer = tiny_model(prepared, "model.projector.compression=ctc")
    examples = recipe.load_training_examples(config)
    with pytest.raises(ValueError, match="compression='ctc' learns which frames to keep.*alignment.max_steps > 0"):
        recipe.align(config, model, tokenizer, examples)
    config, model, tokenizer = tiny_model(prepared, "model.projector.compression=ctc", "alignment.max_steps=5",
                                          "alignment.batch_size=4")
    assert not any(param.requires_grad for param in model.multi_modal_projector.parameters())
    result = recipe.align(config, model, tokenizer, examples, progress=False)
    assert int(model.audio_compressor.vocabulary_mask.sum()) == result.vocabulary
    assert model.audio_compressor.blank.abs().sum() > 0
    # the alignment trained the projector and left it frozen for the LM stage
    assert not any(param.requires_grad for param in model.multi_modal_projector.parameters())


def test_ctc_over_the_whole_vocabulary_lets_any_token_come_out(prepared):
    config, model, tokenizer = tiny_model(prepared, "model.projector.compression=ctc", "alignment.max_steps=5",
                                          "alignment.batch_size=4", "alignment.vocabulary=all")
    examples = recipe.load_training_examples(config)
    heard = {t for e in examples for t in tokenizer(e.text, add_special_tokens=False)["input_ids"]}
    result = recipe.align(config, model, tokenizer, examples, progress=False)
    assert result.vocabulary == model.config.text_vocab_size > len(heard)
    assert bool(model.audio_compressor.vocabulary_mask.all())
    with pytest.raises(ValueError, match="vocabulary='every'"):
        AlignmentConfig(vocabulary="every")


def test_a_failing_step_gives_the_projector_back_frozen(prepared, monkeypatch):
    from speechlm.finetune.alignment import ProjectorAligner

    config, model, tokenizer = tiny_model(prepared, "model.projector.compression=ctc", "alignment.max_steps=5",
                                          "alignment.batch_size=4")
    examples = recipe.load_training_examples(config)

    def out_of_memory(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ProjectorAligner, "_loss", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        recipe.align(config, model, tokenizer, examples, progress=False)
    assert not any(param.requires_grad for param in model.multi_modal_projector.parameters())
