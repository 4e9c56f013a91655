"""Speech vocabulary expansion: added-token rows fused onto the backbone's frozen embedding and head.

Like torchtune's ``FusionEmbedding``, the backbone's own embedding matrix and LM head stay untouched
(same tensors, same shapes) and the added tokens get rows of their own. So text-only input yields
logits over the original vocabulary that are bit-identical to the base model's, and only the new rows
(a few MB) need saving while the backbone is frozen.
"""

from __future__ import annotations

import torch
from torch import nn


class SpeechVocabulary(nn.Module):
    """Embedding rows and output rows for ids ``text_vocab_size .. text_vocab_size + num_added - 1``."""

    def __init__(self, text_vocab_size: int, num_added: int, hidden_size: int):
        super().__init__()
        self.text_vocab_size = text_vocab_size
        self.embed_tokens = nn.Embedding(num_added, hidden_size)
        self.lm_head = nn.Linear(hidden_size, num_added, bias=False)

    @torch.no_grad()
    def initialize_from(self, text_embeddings: torch.Tensor, text_head: torch.Tensor, *,
                        generator: torch.Generator | None = None) -> None:
        """Start new rows near the mean of the backbone's rows (as HF's mean resizing), plus small noise
        so that units are distinguishable from the first step."""
        for new, old in ((self.embed_tokens.weight, text_embeddings), (self.lm_head.weight, text_head)):
            old = old[: self.text_vocab_size].float()
            # the statistics on the CPU, where the generator draws: the same rows whatever device the backbone is on
            mean, std = old.mean(dim=0, keepdim=True).cpu(), old.std(dim=0, keepdim=True).cpu()
            new.copy_(mean + torch.randn(new.shape, generator=generator) * std * 0.1)

    def embed(self, input_ids: torch.Tensor, text_embedding: nn.Module, *, always: bool = False) -> torch.Tensor:
        """``B, L`` ids -> ``B, L, D``: text ids through the backbone's embedding, added ids through ours.
        ``always`` runs our rows even when no added id is present, so that they always get a gradient."""
        is_added = input_ids >= self.text_vocab_size
        embeds = text_embedding(input_ids.masked_fill(is_added, 0))
        if always or bool(is_added.any()):
            added = self.embed_tokens((input_ids - self.text_vocab_size).clamp(min=0))
            embeds = torch.where(is_added.unsqueeze(-1), added.to(embeds.dtype), embeds)
        return embeds

    def logits(self, hidden_states: torch.Tensor, text_head: nn.Module) -> torch.Tensor:
        """``B, L, D -> B, L, text_vocab_size + num_added``. Columns a padded backbone head has beyond the
        tokenizer's vocabulary are dropped, so that column index == token id."""
        # A slice (generation's last position, logits_to_keep) is strided: on CPU a bfloat16 matmul over a
        # strided input takes a path 10-100x slower than over a contiguous copy (40 rows x 49k: 1.9 s vs 9 ms)
        hidden_states = hidden_states.contiguous()
        text_logits = text_head(hidden_states)
        if text_logits.shape[-1] != self.text_vocab_size:
            text_logits = text_logits[..., : self.text_vocab_size]
        added_logits = self.lm_head(hidden_states)
        if added_logits.dtype != text_logits.dtype:
            added_logits = added_logits.to(text_logits.dtype)
        return torch.cat([text_logits, added_logits], dim=-1)
