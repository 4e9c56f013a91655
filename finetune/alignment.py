"""CTC pre-alignment: teach the projector to say each spoken token in the LM's own embedding space, before
the LM-in-the-loop stage.

The projected frames of a clip are scored against the frozen LM's input embeddings (``frames @ E.T``,
plus one learned blank vector), and CTC aligns them to the tokens of the clip's transcript. No LM layer
runs and the frozen encoder's outputs are computed once per clip, so a step of 32 clips costs a fraction
of an LM step of 8, and the LM stage starts from frames the LM already half-reads (figures in
BENCHMARKS.md, "Quick start").

By default the softmax runs over the tokens that occur in the transcripts: rows that no transcript uses
get no signal but a push away, and the full softmax costs ~20x more here. But a word that needs any other
token can then never come out; ``vocabulary: all`` runs it over the backbone's whole text vocabulary.
The model keeps the projector weights; with ``projector_config.compression="ctc"`` its compressor also
keeps the blank vector, the transcript vocabulary and the logit scale (`speechlm.adapters.compression`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from speechlm.finetune.config import AlignmentConfig
from speechlm.finetune.examples import Example
from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.constants import SAMPLE_RATE, audio_placeholder_count, stacked_frames
from speechlm.speech_io.features import log_mel_features

logger = logging.getLogger(__name__)


@dataclass
class AlignmentResult:
    steps: int
    seconds: float
    clips: int  # clips trained on
    skipped: dict[str, int]  # reason -> clips left out
    vocabulary: int  # tokens the softmax ran over
    losses: list[float]  # mean CTC loss per window of min(25, max_steps // 10) steps

    def summary(self) -> str:
        loss = f"CTC loss {self.losses[0]:.3f} -> {self.losses[-1]:.3f}" if self.losses else "no step (out of time)"
        skipped = f"; left out: {self.skipped}" if self.skipped else ""
        return (f"CTC pre-alignment: {self.steps} steps on {self.clips} clips (softmax over {self.vocabulary} tokens) "
                f"in {self.seconds / 60:.1f} min, {loss}{skipped}")


@dataclass
class _Clip:
    frames: torch.Tensor  # T, C encoder outputs (bf16)
    targets: torch.Tensor  # token ids of the transcript


def transcribed(examples: Sequence[Example]) -> list[Example]:
    return [example for example in examples if example.has("audio") and example.has("text")]


class ProjectorAligner:
    """Encodes the clips once, then trains ``model.multi_modal_projector`` with CTC; see the module docstring."""

    def __init__(self, model, tokenizer, config: AlignmentConfig, *, n_mels: int, max_audio_seconds: float,
                 device: torch.device | str = "cpu", bf16: bool = False, progress: bool = True):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.n_mels, self.max_audio_seconds = n_mels, max_audio_seconds
        self.device, self.bf16, self.progress = torch.device(device), bf16, progress
        self.stack_factor = model.config.projector_config.stack_factor
        self.skipped: dict[str, int] = {}
        # after `train`: the transcript tokens the softmax ran over, and the learned blank (read by
        # bench/bench_ctc_reading.py, which feeds the LM the frames CTC does not call blank)
        self.vocabulary: torch.Tensor | None = None
        self.blank: torch.Tensor | None = None
        self.scale = 1.0  # what `_match_embedding_scale` multiplied the frames by: CTC logits are (frames @ E.T) / scale

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def encode(self, examples: Sequence[Example], deadline: float | None = None) -> list[_Clip]:
        tower = self.model.audio_tower
        clips = []
        for example in tqdm(examples, desc="alignment: encoding clips", disable=not self.progress):
            if deadline is not None and time.perf_counter() > deadline:
                self._skip("out of time before it was encoded")
                continue
            audio = load_audio(example.audio)
            if audio.shape[0] > self.max_audio_seconds * SAMPLE_RATE:
                self._skip(f"longer than max_audio_seconds={self.max_audio_seconds}")
                continue
            targets = self.tokenizer(example.text, add_special_tokens=False)["input_ids"]
            features = log_mel_features([audio], n_mels=self.n_mels)
            mel_frames = int(features.input_features_mask.sum())
            if not targets or len(targets) > audio_placeholder_count(mel_frames, self.stack_factor):
                self._skip("more transcript tokens than projected frames" if targets else "empty transcript")
                continue
            with torch.no_grad(), self._autocast():
                mel = features.input_features[:, :, :mel_frames].to(self.device, tower.conv1.weight.dtype)
                frames = tower(mel, torch.tensor([mel_frames], device=self.device))[0]
            clips.append(_Clip(frames.to(torch.bfloat16), torch.tensor(targets)))
        return clips

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def train(self, clips: list[_Clip], deadline: float | None = None) -> tuple[int, list[float], int]:
        config, projector = self.config, self.model.multi_modal_projector
        if config.vocabulary == "all":
            vocabulary = torch.arange(self.model.config.text_vocab_size)
        else:
            vocabulary = torch.unique(torch.cat([clip.targets for clip in clips]))
        index = torch.full((int(vocabulary.max()) + 1,), -1, dtype=torch.long)
        index[vocabulary] = torch.arange(1, len(vocabulary) + 1)  # 0 is the blank
        embeddings = self.model.get_input_embeddings().weight.detach()[vocabulary].to(self.device, torch.float32)
        blank = torch.nn.Parameter(torch.randn(embeddings.shape[1], device=self.device)
                                   * embeddings.norm(dim=1).mean() / math.sqrt(embeddings.shape[1]))
        parameters = [*projector.parameters(), blank]  # trained here even where the LM stage freezes it
        trainable = [p.requires_grad for p in projector.parameters()]
        projector.requires_grad_(True)
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (config.warmup_steps + 1)))
        rng = random.Random(config.seed)
        projector.train()
        losses, window, step = [], [], 0
        every = max(1, min(25, config.max_steps // 10))  # a short run still logs a falling loss
        bar = tqdm(total=config.max_steps, desc="alignment: CTC steps", disable=not self.progress)
        try:
            while step < config.max_steps and (deadline is None or time.perf_counter() < deadline):
                batch = rng.sample(clips, min(config.batch_size, len(clips)))
                loss = self._loss(batch, projector, embeddings, blank, index)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window.append(loss.item())
                bar.update()
                if len(window) == every or step == config.max_steps:
                    losses.append(sum(window) / len(window))
                    bar.set_postfix(ctc_loss=f"{losses[-1]:.3f}")
                    window = []
        finally:  # the LM stage's flags come back even if a step fails
            bar.close()
            for param, flag in zip(projector.parameters(), trainable, strict=True):
                param.requires_grad_(flag)
        if window:
            losses.append(sum(window) / len(window))
        self._match_embedding_scale(clips, projector, embeddings)
        self.vocabulary, self.blank = vocabulary, blank.detach()
        return step, losses, len(vocabulary)

    @torch.no_grad()
    def _match_embedding_scale(self, clips: list[_Clip], projector, embeddings) -> None:
        """Scale the projector's last linear layer so its frames have the mean norm of the LM's embeddings.

        CTC leaves them ~7x longer (a sharper softmax); the LM stage learns faster from frames at the
        scale its layers expect (held-out loss after 150 steps 0.53 vs 0.61)."""
        last = [module for module in projector.modules() if isinstance(module, torch.nn.Linear)][-1]
        norms = []
        for start in range(0, min(len(clips), 256), self.config.batch_size):
            batch = clips[start:start + self.config.batch_size]
            with self._autocast():
                projected = projector(self._padded_frames(batch, projector)).float()
            for row, clip in zip(projected, batch, strict=True):
                norms.append(row[: stacked_frames(clip.frames.shape[0], self.stack_factor)].norm(dim=-1))
        factor = embeddings.norm(dim=1).mean() / torch.cat(norms).mean()
        last.weight.mul_(factor.to(last.weight.dtype))
        if last.bias is not None:
            last.bias.mul_(factor.to(last.bias.dtype))
        self.scale = float(factor)

    def _padded_frames(self, batch: list[_Clip], projector) -> torch.Tensor:
        width = max(clip.frames.shape[0] for clip in batch)
        frames = torch.stack([F.pad(clip.frames, (0, 0, 0, width - clip.frames.shape[0])) for clip in batch])
        return frames.to(self.device, next(projector.parameters()).dtype)

    def _loss(self, batch: list[_Clip], projector, embeddings, blank, index) -> torch.Tensor:
        frames = self._padded_frames(batch, projector)
        lengths = torch.tensor([stacked_frames(clip.frames.shape[0], self.stack_factor) for clip in batch])
        with self._autocast():
            projected = projector(frames)
        projected = projected.float()
        logits = torch.cat([projected @ blank[:, None], projected @ embeddings.T], dim=-1)
        targets = torch.cat([index[clip.targets] for clip in batch])
        return F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), targets.to(self.device), lengths,
                          torch.tensor([len(clip.targets) for clip in batch]), blank=0, zero_infinity=True)


def align_projector(model, tokenizer, examples: Sequence[Example], config: AlignmentConfig, *, n_mels: int = 80,
                    max_audio_seconds: float = 30.0, device: torch.device | str = "cpu", bf16: bool = False,
                    progress: bool = True) -> AlignmentResult:
    """Pre-align ``model``'s projector on the ``examples`` that have audio and text (see the module
    docstring). The audio tower and projector run on ``device`` for the stage and go back where they were."""
    start = time.perf_counter()
    deadline = None if config.max_minutes is None else start + 60 * config.max_minutes
    chosen = transcribed(examples)
    if not chosen:
        raise ValueError("alignment: no training example has both audio and text; CTC pre-alignment needs "
                         "transcribed clips (set alignment.max_steps=0 to skip it)")
    if config.max_clips is not None and len(chosen) > config.max_clips:
        chosen = random.Random(config.seed).sample(chosen, config.max_clips)
    parts = (model.audio_tower, model.multi_modal_projector)
    homes = [next(part.parameters()).device for part in parts]
    for part in parts:
        part.to(device)
    try:
        aligner = ProjectorAligner(model, tokenizer, config, n_mels=n_mels, max_audio_seconds=max_audio_seconds,
                                   device=device, bf16=bf16, progress=progress)
        clips = aligner.encode(chosen, deadline)
        if not clips:
            raise ValueError(f"alignment: none of the {len(chosen)} transcribed clips is usable: {aligner.skipped}")
        steps, losses, vocabulary = aligner.train(clips, deadline)
        if model.audio_compressor is not None:
            model.audio_compressor.set_alignment(aligner.blank, aligner.vocabulary, aligner.scale)
    finally:
        for part, home in zip(parts, homes, strict=True):
            part.to(home)
    result = AlignmentResult(steps=steps, seconds=round(time.perf_counter() - start, 1), clips=len(clips),
                             skipped=aligner.skipped, vocabulary=vocabulary, losses=losses)
    logger.info("%s", result.summary())
    return result
