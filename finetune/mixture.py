"""A task mixture as a map-style dataset: a seeded plan of (task, example) samples, rendered on access.

The plan draws each sample's task by weight and then an example uniformly from those that task can
use, with ``numpy``'s seeded generator, so every rank of a distributed job builds the same plan. Each
sample's lengths are measured up front (without loading audio: a clip's ``<|audio|>`` count follows
from its sample count) for length-grouped batching and the ``max_length`` filter.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from speechlm.finetune.examples import TASK_NAMES, Example
from speechlm.finetune.tasks import TASKS, Conversation, RenderSettings, eligible, render, render_teacher
from speechlm.speech_io.constants import SAMPLE_RATE
from speechlm.speech_io.processor import is_speech_beside_text
from speechlm.speech_io.units import AUDIO_TOKEN

logger = logging.getLogger(__name__)


class MixtureError(ValueError):
    """A mixture that cannot be built: a task with no usable example, bad weights."""


@dataclass(frozen=True)
class Sample:
    task: str
    example: int  # index into the examples


def plan_samples(examples: Sequence[Example], weights: Mapping[str, float], settings: RenderSettings, *,
                 num_samples: int | None = None, seed: int = 0) -> list[Sample]:
    """``num_samples`` (default: as many as examples usable by some task) seeded draws."""
    problems = [f"tasks.{name}: unknown task; choose from {sorted(TASKS)}" for name in weights if name not in TASKS]
    problems += [f"tasks.{name}={weight!r}: weights must be >= 0" for name, weight in weights.items()
                 if not isinstance(weight, (int, float)) or weight < 0]
    if problems:
        raise MixtureError("; ".join(problems))
    active = {name: float(weight) for name, weight in weights.items() if weight > 0}
    if not active:
        raise MixtureError(f"tasks {dict(weights)}: give at least one task a weight > 0")
    pools = {name: [i for i, example in enumerate(examples) if eligible(name, example, settings)] for name in active}
    empty = [f"{name} (needs {TASKS[name].needs})" for name, pool in pools.items() if not pool]
    if empty:
        raise MixtureError(f"no example can serve the tasks {', '.join(empty)}; add such data or set their weight to 0")
    if num_samples is None:
        num_samples = len(set().union(*pools.values()))
    names = sorted(active)
    probabilities = np.array([active[name] for name in names]) / sum(active.values())
    rng = np.random.default_rng(seed)
    tasks = rng.choice(len(names), size=num_samples, p=probabilities)
    return [Sample(names[t], pools[names[t]][int(rng.integers(len(pools[names[t]])))]) for t in tasks]


class TaskMixtureDataset(torch.utils.data.Dataset):
    """Samples of a task mixture as processor outputs: ``input_ids``, ``attention_mask``, ``labels`` (1-D)
    and, for continuous speech, ``input_features`` / ``input_features_mask`` of the sample's clips; a
    sample's ``task_id`` indexes ``TASK_NAMES``; a distillation task's sample also has ``teacher_input_ids`` / ``teacher_attention_mask`` /
    ``teacher_labels`` (the teacher's text conversation)."""

    def __init__(self, examples: Sequence[Example], processor, weights: Mapping[str, float], *,
                 settings: RenderSettings | None = None, num_samples: int | None = None,
                 max_length: int | None = None, seed: int = 0):
        self.examples = list(examples)
        self.processor = processor
        self.settings = settings or RenderSettings(speech_input=processor.speech_input)
        self.seed = seed
        samples = plan_samples(self.examples, weights, self.settings, num_samples=num_samples, seed=seed)
        lengths = [self._measure(index, sample) for index, sample in enumerate(samples)]
        keep = [i for i, length in enumerate(lengths) if max_length is None or length <= max_length]
        if len(keep) < len(samples):
            logger.warning("dropped %d of %d samples longer than max_length=%s tokens",
                           len(samples) - len(keep), len(samples), max_length)
        if not keep:
            raise MixtureError(f"every sample is longer than max_length={max_length} tokens (shortest: "
                               f"{min(lengths)}); raise data.max_length")
        # The render seed stays the sample's original index, so dropping others never changes a sample.
        self.samples = [(i, samples[i]) for i in keep]
        self.lengths = [lengths[i] for i in keep]

    def __len__(self) -> int:
        return len(self.samples)

    def task_counts(self) -> Counter:
        return Counter(sample.task for _, sample in self.samples)

    def sampled_examples(self) -> list[Example]:
        """The examples the samples draw, each once, in the order first drawn: a plan draws each sample's example
        with replacement, so some examples come many times and others never."""
        return [self.examples[index] for index in dict.fromkeys(sample.example for _, sample in self.samples)]

    def conversation(self, index: int) -> Conversation:
        seed_index, sample = self.samples[index]
        return self._render(seed_index, sample)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.processor([self.conversation(index)], return_labels=True,
                               speech_input=self.settings.speech_input)
        item = {key: batch[key][0] for key in ("input_ids", "attention_mask", "labels")}
        if "input_features" in batch:
            item["input_features"] = batch["input_features"]  # N clips, n_mels, T
            item["input_features_mask"] = batch["input_features_mask"]
        seed_index, sample = self.samples[index]
        item["task_id"] = torch.tensor(TASK_NAMES.index(sample.task))
        teacher = render_teacher(sample.task, self.examples[sample.example], self._rng(seed_index), self.settings)
        if teacher is not None:
            taught = self.processor([teacher], return_labels=True)
            item.update({f"teacher_{key}": taught[key][0] for key in ("input_ids", "attention_mask", "labels")})
        return item

    def _rng(self, seed_index: int) -> random.Random:
        return random.Random(f"{self.seed}:{seed_index}")

    def _render(self, seed_index: int, sample: Sample) -> Conversation:
        return render(sample.task, self.examples[sample.example], self._rng(seed_index), self.settings)

    def _measure(self, seed_index: int, sample: Sample) -> int:
        """Tokens of the rendered sample: each audio part becomes the text the processor would put in
        its place (placeholders, or a span of as many units as the codec would emit)."""
        conversation = [{**message, "content": self._stand_ins(message)
                         if isinstance(message["content"], list) else message["content"]}
                        for message in self._render(seed_index, sample)]
        return int(self.processor([conversation], return_labels=True)["input_ids"].shape[1])

    def _stand_ins(self, message: dict) -> list:
        """The message's parts with each clip in the form `_stand_in` gives it; a clip that stands in as text
        takes the separator the processor would put between it and the text beside it."""
        content, parts = message["content"], []
        kind = [part.get("type") if isinstance(part, dict) else None for part in content]
        for index, part in enumerate(content):
            stand_in = self._stand_in(part)
            if kind[index] == "audio" and stand_in["type"] == "text" and message["role"] != "assistant":
                separator = self.processor.audio_text_separator
                before = separator if index > 0 and is_speech_beside_text(kind[index - 1], "audio") else ""
                after = separator if index + 1 < len(content) and is_speech_beside_text("audio", kind[index + 1]) else ""
                stand_in = {"type": "text", "text": before + stand_in["text"] + after}
            parts.append(stand_in)
        return parts

    def _stand_in(self, part: dict) -> dict:
        if not isinstance(part, dict) or part.get("type") != "audio":
            return part
        samples = part.get("num_samples") or audio_num_samples(part["audio"], part.get("sampling_rate"))
        if self.settings.speech_input == "continuous":
            return {"type": "text", "text": AUDIO_TOKEN * self.processor.num_audio_placeholders(samples)}
        frames = math.ceil(samples / 320)  # the codec's 50 Hz hop
        return {"type": "units", "units": [0] * frames}


def audio_num_samples(source, sampling_rate: int | None = None) -> int:
    """16 kHz samples of an audio source, from the file header where there is one (no decoding)."""
    import io

    import soundfile as sf

    from speechlm.speech_io.audio import load_audio

    if isinstance(source, dict) and source.get("array") is not None:
        return math.ceil(len(source["array"]) * SAMPLE_RATE / source["sampling_rate"])
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    try:
        info = sf.info(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source))
        return math.ceil(info.frames * SAMPLE_RATE / info.samplerate)
    except (RuntimeError, TypeError, sf.LibsndfileError):
        return len(load_audio(source, sampling_rate=sampling_rate))  # raises the usual AudioError if unusable
