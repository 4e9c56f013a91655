"""The HF Trainer as speechlm trains: length-grouped batches, the padding fraction in the logs, and
checkpoints that are marked complete only once everything in them is written."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from speechlm.finetune.behaviour import behaviour_alignment_loss
from speechlm.finetune.collator import SpeechLMCollator
from speechlm.finetune.sampler import LengthGroupedSampler

# Written after the Trainer has saved weights, optimizer, scheduler, RNG and trainer_state.json.
COMPLETE_MARKER = "speechlm_checkpoint_complete"
TRAINER_STATE = "trainer_state.json"


class SpeechLMTrainer(Trainer):
    """``Trainer`` plus: batches of similar length (``length_grouping``), ``padding_fraction`` logged."""

    def __init__(self, *args, length_grouping: bool = True, **kwargs):
        self.length_grouping = length_grouping
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.length_grouping and hasattr(dataset, "lengths"):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(dataset.lengths, self.args.per_device_train_batch_size, seed=seed)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """A batch with rows of a distillation task (``s2t_kl``) takes its loss from
        `behaviour_alignment_loss`; any other batch is the Trainer's as usual."""
        distilled_rows = inputs.pop("distilled_rows", None)
        teacher = {key.removeprefix("teacher_"): inputs.pop(key) for key in list(inputs) if key.startswith("teacher_")}
        if distilled_rows is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = behaviour_alignment_loss(model, inputs, teacher, distilled_rows,
                                                 speechlm=self.accelerator.unwrap_model(model))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs carry "loss"; the collator counted tokens since the last one (on this rank).
        if "loss" in logs and isinstance(self.data_collator, SpeechLMCollator):
            fraction = self.data_collator.take_padding_fraction()
            if fraction is not None:
                logs["padding_fraction"] = round(fraction, 4)
        super().log(logs, start_time)


class MarkCompleteCheckpoints(TrainerCallback):
    """Drop a marker into each checkpoint once every rank has finished writing it."""

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # ZeRO-3 ranks write their own optimizer shards
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                (folder / COMPLETE_MARKER).write_text(f"{state.global_step}\n")
        return control


def newest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The ``checkpoint-N`` with the largest N that has the completion marker and a trainer state.
    A checkpoint a killed run left half-written has neither and is passed over."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    complete = [(int(match.group(1)), path) for path in folder.iterdir()
                if (match := pattern.match(path.name)) and path.is_dir()
                and (path / COMPLETE_MARKER).is_file() and (path / TRAINER_STATE).is_file()]
    return max(complete)[1] if complete else None
