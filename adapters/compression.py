"""CTC compression of the projected audio: one LM position per spoken token instead of ten a second.

After the CTC pre-alignment (`speechlm.finetune.alignment`) each projected frame scores the LM's token
embeddings and a learned blank (``frames @ [blank; E].T``). A frame is kept where its best label is a
token that differs from the previous frame's best label (CTC's collapse rule), and it enters the LM as
the probability-weighted mix of the token embeddings it scores, so the frozen LM reads what is close to
text; the other ``<|audio|>`` positions are masked out of attention and skipped by the position ids. The
sequence keeps its length, so the processor, the labels and ``generate``'s bookkeeping stay as they are.
As in Speech-LLaMA's CTC compressor and LegoSLM. On the quick start, the untouched SmolLM2-135M reads the
compressed speech of a held-out clip (`bench/bench_ctc_reading.py`).

The alignment is stored as buffers: the blank, which text tokens the CTC softmax runs over (those of the
pre-alignment's transcripts) and the logit scale. What the LM stage trains is added to the mix of each
kept frame, both zero at first: ``residual``, a linear map of the frame itself, and ``end_marker``, a
vector on each clip's last kept frame. The untouched LM reads the mix as text but does not know where
the speech ends (it copies a transcript, then goes on) and cannot mend what CTC misheard; these two
learn that. The projector stays as the pre-alignment left it (`speechlm.adapters.modes`): LM-stage
gradients through the mix move the frames that the keep rule reads, and at the recipe's learning rate
they undid it. Measured in BENCHMARKS.md ("CTC compression").
"""

from __future__ import annotations

import torch
from torch import nn


class CTCCompressor(nn.Module):
    """``N, L, D`` projected frames (+ ``N, L`` validity) -> the same shape, and which frames to keep."""

    def __init__(self, hidden_size: int, text_vocab_size: int):
        super().__init__()
        self.register_buffer("blank", torch.zeros(hidden_size))
        self.register_buffer("vocabulary_mask", torch.zeros(text_vocab_size, dtype=torch.bool))
        self.register_buffer("logit_scale", torch.ones(()))
        self.end_marker = nn.Parameter(torch.zeros(hidden_size))
        # skip_init: no draw from the RNG, so the model's other random parts are as without compression
        self.residual = nn.utils.skip_init(nn.Linear, hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.residual.weight)

    @property
    def is_aligned(self) -> bool:
        return bool(self.vocabulary_mask.any())

    @torch.no_grad()
    def set_alignment(self, blank: torch.Tensor, vocabulary: torch.Tensor, scale: float) -> None:
        """Keep what the CTC pre-alignment learned: its blank vector, the token ids its softmax ran over,
        and ``scale`` (its logits are ``frames @ E.T / scale``)."""
        if int(vocabulary.max()) >= self.vocabulary_mask.numel():
            raise ValueError(f"CTC vocabulary has token id {int(vocabulary.max())}, outside the text vocabulary "
                             f"of {self.vocabulary_mask.numel()}")
        self.blank.copy_(blank)
        self.vocabulary_mask.zero_()
        self.vocabulary_mask[vocabulary.to(self.vocabulary_mask.device)] = True
        self.logit_scale.fill_(1.0 / scale)

    def forward(self, frames: torch.Tensor, valid: torch.Tensor,
                embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``frames`` ``N, L, D``, ``valid`` ``N, L`` (real frames of each clip), ``embeddings`` the LM's input
        embedding matrix -> (``N, L, D`` mixes of token embeddings, zero where dropped; ``N, L`` kept).

        Before the pre-alignment there is nothing to compress by: every frame passes as it is, as without
        compression (a new model's held-out figures are taken so; the recipe refuses to train one this way)."""
        if not self.is_aligned:
            return frames, valid
        vocabulary = self.vocabulary_mask.nonzero().squeeze(-1)
        tokens = embeddings[vocabulary].to(frames.dtype)  # V, D
        scores = frames @ tokens.T * self.logit_scale.to(frames.dtype)  # N, L, V
        blank_scores = frames @ self.blank.to(frames.dtype) * self.logit_scale.to(frames.dtype)  # N, L
        best_score, best = scores.max(-1)
        best = torch.where(best_score > blank_scores, best, -1)  # -1: blank
        repeated = torch.zeros_like(valid)
        repeated[:, 1:] = best[:, 1:] == best[:, :-1]
        kept = valid & (best >= 0) & ~repeated
        mixed = scores.float().softmax(-1).to(tokens.dtype) @ tokens
        last = kept & (kept.cumsum(-1) == kept.sum(-1, keepdim=True))  # each clip's last kept frame
        mixed = mixed + last.unsqueeze(-1).to(mixed.dtype) * self.end_marker.to(mixed.dtype) + self.residual(frames)
        return mixed * kept.unsqueeze(-1).to(mixed.dtype), kept
