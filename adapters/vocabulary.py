"""Speech vocabulary expansion: added-token rows fused onto the backbone's frozen embedding and head.

Like torchtune's ``FusionEmbedding``, the backbone's own embedding matrix and LM head stay untouched
(same tensors, same shapes) and the added tokens get rows of their own. So text-only input yields
logits over the original vocabulary that are bit-identical to the base model's, and only the new rows
(a few MB) need saving while the backbone is frozen.
"""

from __future__ import annotations

import torch
from speechlm.speech_io.units import added_speech_tokens
from torch import nn
from transformers import PreTrainedTokenizerBase


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
            noise = torch.randn(new.shape, generator=generator) * old.std(dim=0, keepdim=True) * 0.1
            new.copy_((old.mean(dim=0, keepdim=True) + noise).to(new.dtype))

    def embed(self, input_ids: torch.Tensor, text_embedding: nn.Module) -> torch.Tensor:
        """``B, L`` ids -> ``B, L, D``: text ids through the backbone's embedding, added ids through ours."""
        is_added = input_ids >= self.text_vocab_size
        embeds = text_embedding(input_ids.masked_fill(is_added, 0))
        if bool(is_added.any()):
            added = self.embed_tokens((input_ids - self.text_vocab_size).clamp(min=0))
            embeds = torch.where(is_added.unsqueeze(-1), added.to(embeds.dtype), embeds)
        return embeds

    def logits(self, hidden_states: torch.Tensor, text_head: nn.Module) -> torch.Tensor:
        """``B, L, D -> B, L, text_vocab_size + num_added``. Columns a padded backbone head has beyond the
        tokenizer's vocabulary are dropped, so that column index == token id."""
        text_logits = text_head(hidden_states)[..., : self.text_vocab_size]
        return torch.cat([text_logits, self.lm_head(hidden_states).to(text_logits.dtype)], dim=-1)


def expand_tokenizer(tokenizer: PreTrainedTokenizerBase, num_speech_units: int) -> int:
    """Add ``<|audio|>``, ``<|speech_start|>``, ``<|speech_end|>`` and the unit tokens to ``tokenizer``.

    Returns ``text_vocab_size``, the id of the first added token. A tokenizer that already has them
    (a reloaded SpeechLM tokenizer) is left as it is, after checking their ids are contiguous.
    """
    tokens = added_speech_tokens(num_speech_units)
    vocab = tokenizer.get_vocab()
    if tokens[0] in vocab:
        first = vocab[tokens[0]]
        check_tokenizer_layout(tokenizer, first, num_speech_units, source="tokenizer")
        return first
    first = len(tokenizer)
    tokenizer.add_tokens(tokens[:3], special_tokens=True)
    # Unit tokens are ordinary added tokens: special ones would be dropped by skip_special_tokens.
    tokenizer.add_tokens(tokens[3:])
    check_tokenizer_layout(tokenizer, first, num_speech_units, source="tokenizer")
    return first


def check_tokenizer_layout(tokenizer: PreTrainedTokenizerBase, text_vocab_size: int, num_speech_units: int,
                           *, source: str) -> None:
    """Raise if the tokenizer's added speech tokens are not at ``text_vocab_size ..`` in order."""
    tokens = added_speech_tokens(num_speech_units)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    expected = list(range(text_vocab_size, text_vocab_size + len(tokens)))
    if ids != expected:
        bad = next(i for i, (a, b) in enumerate(zip(ids, expected, strict=True)) if a != b)
        raise ValueError(f"{source}: token {tokens[bad]!r} has id {ids[bad]} but the model config puts it at "
                         f"{expected[bad]} (text_vocab_size={text_vocab_size}, num_speech_units="
                         f"{num_speech_units}); the tokenizer and the model come from different checkpoints")
    extra = len(tokenizer) - expected[-1] - 1
    if extra:
        raise ValueError(f"{source}: has {len(tokenizer)} tokens but the model config expects "
                         f"{expected[-1] + 1} ({text_vocab_size} text + {len(tokens)} speech tokens)")
