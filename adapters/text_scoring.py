"""`UserTextScorer`: the backbone's log-likelihood of a text as a user's message.

A reader decoding with a beam hands the backbone its finished transcripts (`readers.BackboneRanker`):
which of them is a likely thing for a user to say is knowledge the backbone was pretrained with, and two
hours of one voice cannot teach it. A text is scored after the chat template's opening of a user turn (its
default system turn included: the backbone was tuned to see it), under the base weights (LoRA switched
off), over the text vocabulary. The opening is the same for every text (SmolLM2's is 24 tokens, longer than most
transcripts), so it runs once a call and its keys and values are shared by every text.

A context (`projector_config.reader_lm_context`) takes the system turn's place: text of the domain the clips come
from (sentences its users say, its names), so that the backbone prefers the transcripts of that domain among those
Whisper heard (domain-prompted rescoring, as Li et al. prompt an LLM rescorer, arXiv 2306.16007). `sample_context`
makes one of a training split's transcripts.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from transformers import DynamicCache

SENTINEL = "\u2063speechlm-user-text\u2063"  # stands for the message while the template is rendered


CONTEXT_HEADING = "Things users have said:"  # what `sample_context` puts before its sentences


def user_turn_prefix(tokenizer, context: str | None = None) -> list[int]:
    """The token ids before a user message's text: the chat template's opening of the first user turn (after
    ``context`` as the system turn, if given), or without a template the tokenizer's BOS token (else its EOS,
    which separates documents), then ``context`` on a line of its own."""
    if getattr(tokenizer, "chat_template", None):
        system = [{"role": "system", "content": context}] if context is not None else []
        rendered = tokenizer.apply_chat_template([*system, {"role": "user", "content": SENTINEL}], tokenize=False)
        ids = tokenizer(rendered.split(SENTINEL)[0], add_special_tokens=False).input_ids
        if ids:
            return ids
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("scoring a text needs a token before it: the tokenizer has no chat template, BOS or EOS "
                         "token")
    return [token, *(tokenizer(context.strip() + "\n", add_special_tokens=False).input_ids if context else [])]


def sample_context(texts: Sequence[str], count: int, seed: int = 0) -> str | None:
    """``count`` of ``texts`` (a training split's transcripts), drawn with ``seed``, one a line under
    `CONTEXT_HEADING`: a `reader_lm_context` that shows the backbone what the domain's users say. None for
    no texts or a count of 0."""
    if count < 0:
        raise ValueError(f"sample_context(count={count}): expected a number of sentences >= 0")
    distinct = list(dict.fromkeys(text.strip() for text in texts if text.strip()))
    if not distinct or count == 0:
        return None
    return "\n".join([CONTEXT_HEADING, *random.Random(seed).sample(distinct, min(count, len(distinct)))])


def base_weights(model):
    """Where ``model``'s backbone runs without its LoRA (peft's ``disable_adapter``; a backbone without
    adapters runs as it is). Disabled LoRA layers skip their ``lora_B``, so a speech gate's hooks stay out."""
    language_model = model.language_model
    return language_model.disable_adapter() if hasattr(type(language_model), "disable_adapter") else nullcontext()


class UserTextScorer:
    """texts -> each one's summed log-probability under ``model``'s backbone, as a user's message (after
    ``context`` as the system turn, if given)."""

    def __init__(self, model, tokenizer, *, context: str | None = None, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.prefix = user_turn_prefix(tokenizer, context)

    def weights(self) -> list[torch.Tensor]:
        """The tensors a score depends on: the backbone's, its LoRA factors left out."""
        return [p for name, p in self.model.text_model.named_parameters() if "lora_" not in name]

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        # A beam's finished transcripts can repeat one text (the same words from other Whisper tokens): each
        # distinct text is scored once, in batches of similar length so that little of a batch is padding.
        distinct = list(dict.fromkeys(text.strip() for text in texts))
        tokens = self.tokenizer(distinct, add_special_tokens=False).input_ids
        order = sorted(range(len(distinct)), key=lambda index: len(tokens[index]))
        scores: dict[str, float] = {}
        with base_weights(self.model):
            prefix = self._prefix()
            for start in range(0, len(order), self.batch_size):
                batch = order[start: start + self.batch_size]
                for index, score in zip(batch, self._scores([tokens[index] for index in batch], *prefix), strict=True):
                    scores[distinct[index]] = score
        return [scores[text.strip()] for text in texts]

    def _prefix(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """The user turn's opening through the backbone: each layer's keys and values, and the log-probabilities
        of a text's first token. Run once a call: the backbone may have trained since the last one."""
        embeddings = self.model.get_input_embeddings()
        decoder = self.model.get_decoder()
        ids = torch.tensor([self.prefix], device=embeddings.weight.device)
        cache = DynamicCache(config=decoder.config)
        hidden = decoder(inputs_embeds=embeddings(ids), use_cache=True, **{cache_keyword(decoder): cache}).last_hidden_state
        return [(layer.keys, layer.values) for layer in cache.layers], self._log_probs(hidden[:, -1:])

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        # contiguous: on CPU a bfloat16 matmul over a sliced (strided) input takes a path 10-100x slower
        # (`SpeechVocabulary.logits` likewise); the head is most of a score
        logits = self.model.get_output_embeddings()(hidden.contiguous())[..., : self.model.config.text_vocab_size]
        return torch.log_softmax(logits.float(), dim=-1)

    def _scores(self, own: Sequence[list[int]], cached: list[tuple[torch.Tensor, torch.Tensor]],
                first: torch.Tensor) -> list[float]:
        """Each text's (token ids') summed log-probability after the cached opening."""
        model = self.model
        embeddings = model.get_input_embeddings()
        device = embeddings.weight.device
        width = max(map(len, own))
        if width == 0:
            return [0.0] * len(own)
        ids = torch.zeros(len(own), width, dtype=torch.long, device=device)  # right-padded
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(own):
            ids[row, : len(tokens)] = torch.tensor(tokens, device=device)
            mask[row, : len(tokens)] = 1
        rows = len(own)
        decoder = model.get_decoder()
        cache = DynamicCache([(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
                              for keys, values in cached], config=decoder.config)
        opened = torch.cat([torch.ones(rows, len(self.prefix), dtype=mask.dtype, device=device), mask], dim=1)
        hidden = decoder(inputs_embeds=embeddings(ids), attention_mask=opened, use_cache=True,
                         **{cache_keyword(decoder): cache}).last_hidden_state
        # the positions that predict the text's tokens only (the head over the vocabulary is the big part): the
        # opening's last predicts the first, each text position but the last the next
        log_probs = torch.cat([first.expand(rows, -1, -1), self._log_probs(hidden[:, :-1])], dim=1)
        picked = log_probs.gather(-1, ids[:, :, None]).squeeze(-1)
        return (picked * mask).sum(-1).tolist()


def cache_keyword(decoder) -> str:
    """The keyword ``decoder.forward`` takes a key/value cache by: ``cache`` from transformers 5.25 (which
    deprecates ``past_key_values``, the only one before)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
