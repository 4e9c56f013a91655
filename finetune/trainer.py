"""The HF Trainer as speechlm trains: length-grouped batches, the padding fraction in the logs, a budget
in minutes with a learning-rate schedule that ends with it, and checkpoints that are marked complete only
once everything in them is written."""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from speechlm.finetune.behaviour import behaviour_alignment_loss, position_losses
from speechlm.finetune.examples import TASK_NAMES
from speechlm.finetune.sampler import LengthGroupedSampler

# Written after the Trainer has saved weights, optimizer, scheduler, RNG and trainer_state.json.
COMPLETE_MARKER = "speechlm_checkpoint_complete"
TRAINER_STATE = "trainer_state.json"


class TrainingClock:
    """Minutes of training: it runs from `start` and stands still inside `paused` (an evaluation a callback
    runs between steps) and before `start` (time spent elsewhere can be counted in with `add`)."""

    def __init__(self):
        self.seconds = 0.0
        self._since: float | None = None

    def start(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def add(self, seconds: float) -> None:
        self.seconds += seconds

    @property
    def minutes(self) -> float:
        running = 0.0 if self._since is None else time.perf_counter() - self._since
        return (self.seconds + running) / 60

    @contextmanager
    def paused(self):
        running = self._since is not None
        if running:
            self.seconds += time.perf_counter() - self._since
            self._since = None
        try:
            yield
        finally:
            if running:
                self._since = time.perf_counter()


def minute_schedule(kind: str, warmup_steps: int, max_steps: int, clock: TrainingClock, max_minutes: float):
    """``step -> learning-rate factor``: linear warm-up, then ``kind`` (cosine, linear or constant) over the
    progress ``max(step / max_steps, minutes / max_minutes)``, the minutes counted from now: minutes spent
    before the Trainer (a CTC pre-alignment on the same clock) shorten the schedule, not start it late."""
    start = clock.minutes
    remaining = max(max_minutes - start, 1e-9)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, max(step / max(max_steps, 1), (clock.minutes - start) / remaining))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return factor


class RunTheClock(TrainerCallback):
    """Starts the clock with training, and stops training after ``max_minutes`` of it (None: never)."""

    def __init__(self, clock: TrainingClock, max_minutes: float | None):
        self.clock, self.max_minutes = clock, max_minutes

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.max_minutes is not None and self.clock.minutes >= self.max_minutes:
            control.should_training_stop = True


class SpeechLMTrainer(Trainer):
    """``Trainer`` plus: batches of similar length (``length_grouping``), ``padding_fraction`` and each task's
    loss (``loss_<task>``: its mean over its labelled positions since the last log) logged, the ``s2t_kl``
    loss, and with ``max_minutes`` a stop and a learning-rate schedule by the minutes of ``clock``."""

    def __init__(self, *args, length_grouping: bool = True, max_minutes: float | None = None,
                 clock: TrainingClock | None = None, **kwargs):
        self.length_grouping = length_grouping
        self.max_minutes = max_minutes
        self.clock = clock or TrainingClock()
        # since the last log, on this rank: real and padded tokens, then each task's loss sum and positions
        self.log_counts = torch.zeros(2 + 2 * len(TASK_NAMES), dtype=torch.float64)
        super().__init__(*args, **kwargs)
        self.add_callback(RunTheClock(self.clock, max_minutes))

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.max_minutes is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            args = self.args
            schedule = minute_schedule(args.lr_scheduler_type.value if hasattr(args.lr_scheduler_type, "value")
                                       else str(args.lr_scheduler_type), args.get_warmup_steps(num_training_steps),
                                       num_training_steps, self.clock, self.max_minutes)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, schedule)
        return self.lr_scheduler

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
        task_ids = inputs.pop("task_ids", None)
        teacher = {key.removeprefix("teacher_"): inputs.pop(key) for key in list(inputs) if key.startswith("teacher_")}
        if distilled_rows is None:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        else:
            loss, outputs = behaviour_alignment_loss(model, inputs, teacher, distilled_rows,
                                                     speechlm=self.accelerator.unwrap_model(model))
        if model.training:
            self._count(inputs, outputs, task_ids)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _count(self, inputs: dict, outputs, task_ids: torch.Tensor | None) -> None:
        """The batch the step trains on: its real and padded tokens, and each task's loss positions."""
        mask = inputs["attention_mask"]
        real = float(mask.sum())
        self.log_counts[:2] += torch.tensor([real, mask.numel() - real], dtype=torch.float64)
        if task_ids is None or outputs.logits is None:
            return
        if hasattr(outputs, "position_losses"):
            losses, rows = outputs.position_losses, outputs.position_rows
        else:
            losses, rows = position_losses(outputs.logits.detach(), inputs["labels"])
        tasks = task_ids.to(rows.device)[rows]
        count = len(TASK_NAMES)
        self.log_counts[2:2 + count] += torch.zeros(count, dtype=torch.float64).index_add_(
            0, tasks.cpu(), losses.detach().double().cpu())
        self.log_counts[2 + count:] += torch.bincount(tasks.cpu(), minlength=count).double()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The Trainer logs training (logs with "loss") on every rank, after gathering the loss: the counts
        # are summed over ranks the same way, so the figures are the whole batch's.
        if "loss" in logs:
            counts, self.log_counts = self.log_counts, torch.zeros_like(self.log_counts)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                counts = counts.to(self.accelerator.device)
                torch.distributed.all_reduce(counts)
                counts = counts.cpu()
            real, padded = counts[:2].tolist()
            if real + padded:
                logs["padding_fraction"] = round(padded / (real + padded), 4)
            count = len(TASK_NAMES)
            for task, total, positions in zip(TASK_NAMES, counts[2:2 + count].tolist(), counts[2 + count:].tolist(),
                                              strict=True):
                if positions:
                    logs[f"loss_{task}"] = round(total / positions, 4)
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
