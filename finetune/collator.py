"""Batches of `TaskMixtureDataset` items, padded as the processor pads for training.

Rows are right-padded (pad token, attention 0, labels -100); clips are concatenated in row order (the
order in which the model fills ``<|audio|>`` spans) and their mel frames zero-padded with mask 0. The
teacher rows of a distillation task's samples come as ``teacher_*``, with ``distilled_rows`` marking
which rows of the batch they belong to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from speechlm.speech_io.constants import IGNORE_INDEX
from speechlm.speech_io.processor import padding_token_id


@dataclass
class SpeechLMCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_processor(cls, processor, **kwargs) -> SpeechLMCollator:
        return cls(pad_token_id=padding_token_id(processor.tokenizer), **kwargs)

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _stack([item["input_ids"] for item in items], width, self.pad_token_id),
            "attention_mask": _stack([item["attention_mask"] for item in items], width, 0),
            "labels": _stack([item["labels"] for item in items], width, IGNORE_INDEX),
        }
        clips = [item for item in items if "input_features" in item]
        if clips:
            frames = max(item["input_features"].shape[-1] for item in clips)
            batch["input_features"] = torch.cat(
                [torch.nn.functional.pad(item["input_features"], (0, frames - item["input_features"].shape[-1]))
                 for item in clips])  # N clips, n_mels, T_max
            batch["input_features_mask"] = torch.cat(
                [torch.nn.functional.pad(item["input_features_mask"], (0, frames - item["input_features_mask"].shape[-1]))
                 for item in clips])  # N clips, T_max
        if all("task_id" in item for item in items):
            batch["task_ids"] = torch.stack([item["task_id"] for item in items])  # B: each row's task
        taught = [item for item in items if "teacher_input_ids" in item]
        if taught:  # a distillation task's rows: the teacher's text rows, in the order of `distilled_rows`
            width = max(len(item["teacher_input_ids"]) for item in taught)
            batch["distilled_rows"] = torch.tensor(["teacher_input_ids" in item for item in items])
            for key, value in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
                batch[f"teacher_{key}"] = _stack([item[f"teacher_{key}"] for item in taught], width, value)
        return batch


def _stack(rows: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(row, (0, width - len(row)), value=value) for row in rows])  # B, L
