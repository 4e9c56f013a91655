"""Behaviour alignment (task s2t_kl): KL to the frozen backbone's distributions given the prompt as text."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from speechlm.configfile import apply_overrides, build_dataclass, read_yaml
from speechlm.finetune import recipe
from speechlm.finetune.behaviour import (
    behaviour_alignment_loss,
    kl_per_position,
    position_losses,
    teacher_context,
)
from speechlm.finetune.collator import SpeechLMCollator
from speechlm.finetune.config import TrainConfig
from speechlm.finetune.mixture import TaskMixtureDataset
from tests.finetune.conftest import TINY_TRAIN_YAML


def tiny(prepared, out, *extra):
    config = build_dataclass(TrainConfig, apply_overrides(read_yaml(TINY_TRAIN_YAML), [
        f"data.train=[{prepared}]", f"training.output_dir={out}", "data.num_samples=8",
        "training.per_device_train_batch_size=4", "training.logging_steps=1", *extra]))
    model, tokenizer = recipe.build_model(config)
    processor = recipe.build_processor(config, model, tokenizer)
    return config, model.train(), processor


def kl_batch(model, processor, prepared, weights):
    dataset = TaskMixtureDataset(recipe.load_training_examples(build_dataclass(TrainConfig, apply_overrides(
        read_yaml(TINY_TRAIN_YAML), [f"data.train=[{prepared}]"]))), processor, weights, num_samples=4, seed=1)
    return dataset, SpeechLMCollator.from_processor(processor)([dataset[i] for i in range(len(dataset))])


def split(batch):
    batch = dict(batch)
    batch.pop("task_ids")
    rows = batch.pop("distilled_rows")
    teacher = {key.removeprefix("teacher_"): batch.pop(key) for key in list(batch) if key.startswith("teacher_")}
    return batch, teacher, rows


def test_the_teacher_sees_the_transcript_as_text_and_the_same_answer(prepared, tmp_path):
    _, model, processor = tiny(prepared, tmp_path, "model.mode=frozen")
    dataset, batch = kl_batch(model, processor, prepared, {"s2t_kl": 1})
    item = dataset[0]
    example = dataset.examples[dataset.samples[0][1].example]
    teacher_text = processor.tokenizer.decode(item["teacher_input_ids"])
    assert example.text in teacher_text and processor.audio_token_id not in item["teacher_input_ids"].tolist()
    assert processor.audio_token_id in item["input_ids"].tolist()
    student_answer = item["labels"][item["labels"] != -100]
    assert torch.equal(student_answer, item["teacher_labels"][item["teacher_labels"] != -100])
    assert batch["distilled_rows"].all() and batch["teacher_input_ids"].shape[0] == 4


def test_the_loss_is_zero_when_speech_and_text_give_the_same_distributions(prepared, tmp_path):
    _, model, processor = tiny(prepared, tmp_path, "model.mode=frozen")
    _, batch = kl_batch(model, processor, prepared, {"s2t_kl": 1})
    inputs, teacher, rows = split(batch)
    # the "spoken" rows are the teacher's own text rows: every distribution is the same
    loss, _ = behaviour_alignment_loss(model, {**teacher}, teacher, rows)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss, _ = behaviour_alignment_loss(model, inputs, teacher, rows)
    assert float(loss) > 1e-4  # a random tiny backbone is near-uniform: small, but not zero
    loss.backward()
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0  # speech learns to match text


def test_rows_of_other_tasks_keep_their_cross_entropy(prepared, tmp_path):
    _, model, processor = tiny(prepared, tmp_path, "model.mode=frozen")
    _, batch = kl_batch(model, processor, prepared, {"asr": 1, "s2t_kl": 1})
    inputs, teacher, rows = split(batch)
    assert 0 < int(rows.sum()) < len(rows)  # a mixed batch
    loss, outputs = behaviour_alignment_loss(model, inputs, teacher, rows)
    counts = (inputs["labels"][:, 1:] != -100).sum(-1)
    per_position_rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
    with torch.no_grad():
        teacher_logits = model(**teacher).logits[:, : model.config.text_vocab_size]
    targets = inputs["labels"][:, 1:][inputs["labels"][:, 1:] != -100]
    logits = outputs.logits.detach().float()
    asr = ~rows[per_position_rows]
    expected = (torch.nn.functional.cross_entropy(logits[asr], targets[asr], reduction="sum")
                + kl_per_position(logits[~asr][:, : model.config.text_vocab_size], teacher_logits).sum()) / len(logits)
    torch.testing.assert_close(loss.detach(), expected)


def test_kl_is_zero_only_for_equal_distributions():
    logits = torch.randn(3, 10)
    assert torch.allclose(kl_per_position(logits, logits), torch.zeros(3), atol=1e-6)
    assert (kl_per_position(logits, logits.flip(-1)) > 0).all()


def test_the_teacher_is_the_base_backbone_whatever_the_lora_scope(prepared, tmp_path):
    _, model, processor = tiny(prepared, tmp_path, "model.mode=lora", "model.lora_scope=all")
    with torch.no_grad():
        for name, param in model.language_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)  # LoRA that changes every output
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with teacher_context(model):
            base = model(input_ids=ids).logits
        with model.language_model.disable_adapter():
            expected = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(base, expected)


def test_a_fully_tuned_backbone_has_no_teacher(prepared, tmp_path):
    _, model, _ = tiny(prepared, tmp_path, "model.mode=full")
    with pytest.raises(ValueError, match="s2t_kl distils the frozen backbone, but mode=full"):
        teacher_context(model)


def test_a_recipe_mixes_the_kl_task_with_the_others(prepared, tmp_path):
    config, model, processor = tiny(prepared, tmp_path / "run", "model.mode=lora", "model.lora_scope=audio",
                                    "data.tasks={asr: 1, s2t_kl: 1}", "training.max_steps=2")
    dataset = recipe.build_datasets(config, processor)
    trainer = recipe.build_trainer(config, model, processor, dataset)
    result = recipe.train(config, trainer)
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_the_recipe_can_distil_only_the_answered_clips(prepared, tmp_path):
    config, _, processor = tiny(prepared, tmp_path, "model.mode=frozen", "data.tasks={s2t_kl: 1}",
                                "data.num_samples=16", "data.s2t_kl_rows=answered")
    dataset = recipe.build_datasets(config, processor)
    answered = [dataset.examples[sample.example].answer for _, sample in dataset.samples]
    assert dataset.task_counts()["s2t_kl"] == 16 and all(answered)
    every_clip = recipe.build_datasets(replace(config, data=replace(config.data, s2t_kl_rows="all")), processor)
    assert not all(every_clip.examples[sample.example].answer for _, sample in every_clip.samples)


def test_each_task_logs_its_own_loss(prepared, tmp_path):
    config, model, processor = tiny(prepared, tmp_path / "run", "model.mode=lora", "model.lora_scope=audio",
                                    "data.tasks={asr: 1, tts: 1, s2t_kl: 1}", "data.num_samples=12",
                                    "training.max_steps=3")
    trainer = recipe.build_trainer(config, model, processor, recipe.build_datasets(config, processor))
    recipe.train(config, trainer)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    tasks = {key for entry in logged for key in entry if key.startswith("loss_")}
    assert tasks and tasks <= {"loss_asr", "loss_tts", "loss_s2t_kl"}
    assert all(value >= 0 for entry in logged for key, value in entry.items() if key.startswith("loss_"))


def test_position_losses_are_the_model_cross_entropy(prepared, tmp_path):
    _, model, processor = tiny(prepared, tmp_path, "model.mode=frozen")
    _, batch = kl_batch(model, processor, prepared, {"asr": 1})
    inputs = {key: value for key, value in batch.items() if key != "task_ids"}
    outputs = model(**inputs)
    losses, rows = position_losses(outputs.logits, inputs["labels"])
    torch.testing.assert_close(losses.mean(), outputs.loss)
    assert rows.tolist() == sorted(rows.tolist()) and len(set(rows.tolist())) == len(inputs["labels"])
