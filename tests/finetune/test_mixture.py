from __future__ import annotations

from collections import Counter

import pytest
import torch

from speechlm.finetune.collator import SpeechLMCollator
from speechlm.finetune.mixture import MixtureError, TaskMixtureDataset, plan_samples
from speechlm.finetune.sampler import LengthGroupedSampler, padding_fraction
from speechlm.finetune.tasks import RenderSettings
from speechlm.speech_io.constants import IGNORE_INDEX


def test_mixture_follows_the_weights_and_the_seed(prepared_examples):
    weights = {"asr": 3, "tts": 1, "s2s_chain": 1}
    plan = plan_samples(prepared_examples, weights, RenderSettings(), num_samples=2000, seed=0)
    counts = Counter(sample.task for sample in plan)
    for task, weight in weights.items():
        assert abs(counts[task] / 2000 - weight / 5) < 0.03
    assert all(prepared_examples[s.example].answer_units for s in plan if s.task == "s2s_chain")
    assert plan == plan_samples(prepared_examples, weights, RenderSettings(), num_samples=2000, seed=0)
    assert plan != plan_samples(prepared_examples, weights, RenderSettings(), num_samples=2000, seed=1)


def test_a_task_without_usable_examples_is_named(prepared_examples):
    text_only = [e for e in prepared_examples if e.answer is None]
    with pytest.raises(MixtureError, match=r"s2s_chain \(needs audio \+ answer \+ answer_audio units"):
        plan_samples(text_only, {"asr": 1, "s2s_chain": 1}, RenderSettings())
    with pytest.raises(MixtureError, match="at least one task a weight > 0"):
        plan_samples(text_only, {"asr": 0}, RenderSettings())


@pytest.mark.parametrize("separator", ["", "\n"])
@pytest.mark.parametrize("speech_input", ["continuous", "discrete"])
def test_measured_lengths_are_the_rendered_lengths(prepared_examples, processor, speech_input, separator,
                                                   monkeypatch):
    monkeypatch.setattr(processor, "audio_text_separator", separator)
    dataset = TaskMixtureDataset(prepared_examples, processor, {name: 1 for name in (
        "asr", "tts", "continuation", "s2t_instruct", "s2s_chain", "interleaved", "text")},
        settings=RenderSettings(speech_input=speech_input), num_samples=24, seed=3)
    assert len(set(dataset.task_counts())) >= 5
    for index in range(len(dataset)):
        item = dataset[index]
        assert len(item["input_ids"]) == dataset.lengths[index]
        assert ("input_features" in item) == bool((item["input_ids"] == processor.audio_token_id).any())
        assert (item["labels"] != IGNORE_INDEX).any()


def test_max_length_drops_long_samples_without_changing_the_others(prepared_examples, processor):
    full = TaskMixtureDataset(prepared_examples, processor, {"asr": 1, "tts": 1}, num_samples=20)
    limit = sorted(full.lengths)[10]
    short = TaskMixtureDataset(prepared_examples, processor, {"asr": 1, "tts": 1}, num_samples=20, max_length=limit)
    assert max(short.lengths) <= limit and len(short) == sum(length <= limit for length in full.lengths)
    kept = [i for i, length in enumerate(full.lengths) if length <= limit]
    assert [full.conversation(i) for i in kept] == [short.conversation(i) for i in range(len(short))]
    with pytest.raises(MixtureError, match="raise data.max_length"):
        TaskMixtureDataset(prepared_examples, processor, {"asr": 1}, num_samples=4, max_length=8)


def test_collator_pads_like_the_processor(prepared_examples, processor):
    dataset = TaskMixtureDataset(prepared_examples, processor, {"asr": 1, "tts": 1}, num_samples=8, seed=1)
    items = [dataset[i] for i in range(4)]
    collator = SpeechLMCollator.from_processor(processor)
    batch = collator(items)
    width = max(len(item["input_ids"]) for item in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, width)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and batch["attention_mask"][row].sum() == n
    clips = [item for item in items if "input_features" in item]
    assert batch["input_features"].shape[0] == sum(item["input_features"].shape[0] for item in clips)
    assert batch["input_features_mask"].sum() == sum(int(item["input_features_mask"].sum()) for item in clips)
    # the same clips, batched by the processor itself, give the same features
    reference = processor([dataset.conversation(i) for i in range(4)], return_labels=True)
    assert torch.equal(reference["input_features"], batch["input_features"])
    assert torch.equal(reference["labels"], batch["labels"]) and torch.equal(reference["input_ids"], batch["input_ids"])


def test_length_grouping_cuts_padding_and_is_seeded():
    import numpy as np

    # Utterance-like spread: log-normal, median ~150 tokens, a long tail.
    lengths = np.random.default_rng(0).lognormal(5.0, 0.6, 4000).astype(int).clip(16).tolist()
    sampler = LengthGroupedSampler(lengths, 8, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))  # a permutation: nothing lost or repeated
    assert order == list(LengthGroupedSampler(lengths, 8, seed=0))
    sampler.set_epoch(1)
    assert list(sampler) != order
    random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    grouped, shuffled = padding_fraction(lengths, order, 8), padding_fraction(lengths, random_order, 8)
    assert grouped < 0.1 < 0.2 < shuffled
    assert lengths[order[0]] == max(lengths)  # the longest batch comes first: out-of-memory shows at once
