"""`UserTextScorer`: the backbone's log-likelihood of a text as a user's message.

A reader decoding with a beam hands the backbone its finished transcripts (`readers.BackboneRanker`):
which of them is a likely thing for a user to say is knowledge the backbone was pretrained with, and two
hours of one voice cannot teach it. A text is scored after the chat template's opening of a user turn (its
default system turn included: the backbone was tuned to see it), under the base weights (LoRA switched
off), over the text vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

SENTINEL = "\u2063speechlm-user-text\u2063"  # stands for the message while the template is rendered


def user_turn_prefix(tokenizer) -> list[int]:
    """The token ids before a user message's text: the chat template's opening of the first user turn, or
    without a template the tokenizer's BOS token (else its EOS, which separates documents)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
        ids = tokenizer(rendered.split(SENTINEL)[0], add_special_tokens=False).input_ids
        if ids:
            return ids
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("scoring a text needs a token before it: the tokenizer has no chat template, BOS or EOS "
                         "token")
    return [token]


def base_weights(model):
    """Where ``model``'s backbone runs without its LoRA (peft's ``disable_adapter``; a backbone without
    adapters runs as it is). Disabled LoRA layers skip their ``lora_B``, so a speech gate's hooks stay out."""
    language_model = model.language_model
    return language_model.disable_adapter() if hasattr(type(language_model), "disable_adapter") else nullcontext()


class UserTextScorer:
    """texts -> each one's summed log-probability under ``model``'s backbone, as a user's message."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.prefix = user_turn_prefix(tokenizer)

    def weights(self) -> list[torch.Tensor]:
        """The tensors a score depends on: the backbone's, its LoRA factors left out."""
        return [p for name, p in self.model.text_model.named_parameters() if "lora_" not in name]

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            scores += self._scores(texts[start: start + self.batch_size])
        return scores

    def _scores(self, texts: Sequence[str]) -> list[float]:
        model = self.model
        embeddings = model.get_input_embeddings()
        device = embeddings.weight.device
        own = [self.tokenizer(text.strip(), add_special_tokens=False).input_ids for text in texts]
        width = len(self.prefix) + max(map(len, own))
        ids = torch.zeros(len(own), width, dtype=torch.long, device=device)  # right-padded
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(own):
            ids[row, : len(self.prefix) + len(tokens)] = torch.tensor(self.prefix + tokens, device=device)
            mask[row, : len(self.prefix) + len(tokens)] = 1
        with base_weights(model):
            hidden = model.get_decoder()(inputs_embeds=embeddings(ids), attention_mask=mask).last_hidden_state
        start = len(self.prefix)
        # the positions that predict the text's tokens only: the head over the vocabulary is the big part
        logits = model.get_output_embeddings()(hidden[:, start - 1: -1])[..., : model.config.text_vocab_size]
        picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, start:, None]).squeeze(-1)
        return (picked * mask[:, start:]).sum(-1).tolist()
