"""Greedy decoding checked against a draft in one forward pass: a transcription request to a model with a reader
mostly writes the reader's transcript again, token by token (`TranscriptFollowingLogitsProcessor`). Given that
transcript and the end of turn as a draft, one pass over prompt and draft gives every position's next-token
scores at once; where the greedy choice at every position is the draft's own token, greedy decoding would have
written exactly the draft, so the row is done. Only the rows that leave their draft are decoded step by step.
This is speculative decoding (Leviathan et al., arXiv 2211.17192) with the reader as the draft model: the
transcript is already there, so the drafts cost nothing, and a batch of drafts is checked in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList

# What a model's generation config may set and still decode plainly greedy (a field outside these adds HF logits
# processors or stopping rules of its own, which the check below does not run: such a model decodes step by step)
PLAIN_GENERATION_FIELDS = {"bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "temperature", "top_p",
                           "top_k", "transformers_version", "_from_model_config", "use_cache", "max_length",
                           "cache_implementation", "output_attentions", "output_hidden_states", "output_scores",
                           "output_logits", "return_dict_in_generate"}


def drafts_apply(generation_config: GenerationConfig, generate_kwargs: dict) -> bool:
    """Whether greedy decoding with ``generate_kwargs`` (besides ``max_new_tokens`` and ``logits_processor``) and
    ``generation_config`` is what `accepted_drafts` checks: one greedy row per prompt, no processor of HF's own."""
    if generate_kwargs.get("do_sample") or generate_kwargs.get("num_beams", 1) != 1:
        return False
    if set(generate_kwargs) - {"max_new_tokens", "logits_processor", "do_sample"}:
        return False
    defaults = GenerationConfig()
    changed = {key for key, value in generation_config.to_diff_dict().items()
               if key not in PLAIN_GENERATION_FIELDS and value != getattr(defaults, key, None)}
    return not generation_config.do_sample and not changed


def accepted_drafts(model, inputs, drafts: Sequence[Sequence[int]], logits_processor: LogitsProcessorList,
                    pad_token_id: int) -> list[bool]:
    """For each row of ``inputs`` (left-padded processor inputs), whether greedy decoding under
    ``logits_processor`` writes exactly its draft (its tokens, the last one ending the response), up to
    floating-point rounding: one forward pass over the prompts with the drafts after them (right-padded), the head
    only at the draft's positions, where decoding runs a pass a token over cached keys and values (a near-tie
    between two tokens may fall the other way)."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    rows, prompt_length = input_ids.shape
    width = max(map(len, drafts))
    if width == 0:
        raise ValueError("a draft needs at least one token (the end of the response)")
    draft_ids = torch.full((rows, width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    draft_mask = torch.zeros((rows, width), dtype=attention_mask.dtype, device=attention_mask.device)
    for row, draft in enumerate(drafts):
        draft_ids[row, : len(draft)] = torch.tensor(list(draft), dtype=input_ids.dtype)
        draft_mask[row, : len(draft)] = 1
    ids = torch.cat([input_ids, draft_ids], dim=1)
    mask = torch.cat([attention_mask, draft_mask], dim=1)
    audio = {key: inputs[key] for key in ("input_features", "input_features_mask") if key in inputs}
    # generate's position ids (counted over the attention mask, left padding at 0); a model that masks audio
    # positions counts its own over the mask it makes, where there is audio
    own_positions = model.masks_audio_positions and "input_features" in audio
    positions = None if own_positions else (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    keep = torch.arange(prompt_length - 1, prompt_length - 1 + width, device=ids.device)
    with torch.inference_mode():  # B, W, V: each draft position's next-token scores
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep,
                       use_cache=False, **audio).logits.float()
    accepted = [True] * rows
    for step in range(width):
        pending = [row for row, draft in enumerate(drafts) if accepted[row] and step < len(draft)]
        if not pending:
            break
        chosen = logits_processor(ids[:, : prompt_length + step], logits[:, step]).argmax(-1).tolist()
        for row in pending:
            accepted[row] = chosen[row] == drafts[row][step]
    return accepted


__all__ = ["accepted_drafts", "drafts_apply"]
