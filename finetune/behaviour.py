"""Behaviour alignment: a spoken prompt should get what its text gets from the frozen backbone.

For the ``s2t_kl`` task's rows the loss is not the cross-entropy of labels but the KL divergence from the
frozen backbone's next-token distributions, given the prompt as text, to the SpeechLM's, given it as
speech, at every position of the assistant turn (Ultravox's response KL, DiVA arXiv 2410.02678, BLSP).
Any text instruction set becomes speech training data with no labelled answers, and the model learns to
follow a spoken instruction rather than transcribe it. The other rows of the batch keep their
cross-entropy; the batch's loss is the mean over all labelled positions of either.

The teacher is the same model on text rows with its adapters out of the way: a frozen backbone, LoRA
gated to speech (``lora_scope`` audio/speech: text rows run the base weights exactly), or LoRA switched
off with peft's ``disable_adapter``. Distributions are compared over the text vocabulary only: the added
speech rows train, and the backbone never had them.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from speechlm.speech_io.constants import IGNORE_INDEX


def teacher_context(model):
    """Where ``model`` computes the frozen backbone's distributions for text rows."""
    config = model.config
    if config.mode == "full":
        raise ValueError("task s2t_kl distils the frozen backbone, but mode=full trains it: use mode frozen, "
                         "lora or qlora")
    if config.mode in ("lora", "qlora") and config.lora_scope == "all":
        return model.language_model.disable_adapter()
    return nullcontext()  # frozen, or LoRA gated off for text rows


def labelled_counts(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the positions with a (shifted) label: where the head runs in training."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def kl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` at each of ``N, V`` positions."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1)


def position_losses(logits: torch.Tensor, labels: torch.Tensor, *, distilled_rows: torch.Tensor | None = None,
                    teacher_logits: torch.Tensor | None = None, text_vocab: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss at each labelled position (``logits`` ``N_labelled, V``, row by row, as the model's training
    forward returns them): cross-entropy to the label, or on ``distilled_rows`` the KL divergence from
    ``teacher_logits`` over the text vocabulary; and the batch row of each position."""
    counts = labelled_counts(labels)
    rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    if distilled_rows is not None and bool(distilled_rows.any()):
        distilled = distilled_rows.to(rows.device)[rows]
        kl = kl_per_position(logits[distilled][:, :text_vocab], teacher_logits)
        losses = torch.where(distilled, torch.zeros_like(losses).masked_scatter(distilled, kl), losses)
    return losses, rows


def behaviour_alignment_loss(model, inputs: dict, teacher: dict, distilled_rows: torch.Tensor, *,
                             speechlm=None) -> tuple[torch.Tensor, object]:
    """The batch's loss: cross-entropy on the rows of other tasks, KL to the teacher on ``distilled_rows``;
    the outputs carry ``position_losses`` and ``position_rows`` (detached). ``model`` may be wrapped for
    distributed training; ``speechlm`` is then the model inside."""
    speechlm = model if speechlm is None else speechlm
    outputs = model(**inputs)
    labels = inputs["labels"]
    text_vocab = speechlm.config.text_vocab_size
    if not distilled_rows.any():
        return outputs.loss, outputs
    with torch.no_grad(), teacher_context(speechlm):
        teacher_logits = model(**teacher).logits[:, :text_vocab]
    counts, teacher_counts = labelled_counts(labels), labelled_counts(teacher["labels"])
    if not torch.equal(counts[distilled_rows.to(counts.device)], teacher_counts):
        raise ValueError(f"s2t_kl: the spoken and the text prompt's assistant turns have {counts[distilled_rows].tolist()} "
                         f"and {teacher_counts.tolist()} labelled tokens; they must render the same answer")
    losses, rows = position_losses(outputs.logits, labels, distilled_rows=distilled_rows,
                                   teacher_logits=teacher_logits, text_vocab=text_vocab)
    loss = losses.sum() / max(len(losses), 1)
    outputs.loss = loss
    outputs.position_losses, outputs.position_rows = losses.detach(), rows
    return loss, outputs
