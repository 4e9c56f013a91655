"""`UserTextScorer`: the backbone's log-likelihood of a text as a user's message.

A reader decoding with a beam hands the backbone its finished transcripts (`readers.BackboneRanker`):
which of them is a likely thing for a user to say is knowledge the backbone was pretrained with, and two
hours of one voice cannot teach it. A text is scored after the chat template's opening of a user turn (its
default system turn included: the backbone was tuned to see it), under the base weights (LoRA switched
off), over the text vocabulary. The opening is the same for every text (SmolLM2's is 24 tokens, longer than most
transcripts; with a context ~1,400), so it runs once while the backbone's weights stay as they are, and its keys and
values are shared by every text: the texts are packed into one row, a tree of their tokens (each distinct beginning
once), that attends to a single copy of them.

A context (`projector_config.reader_lm_context`) takes the system turn's place: text of the domain the clips come
from (sentences its users say, its names), so that the backbone prefers the transcripts of that domain among those
Whisper heard (domain-prompted rescoring, as Li et al. prompt an LLM rescorer, arXiv 2306.16007). `sample_context`
makes one of a training split's transcripts.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch
from transformers import DynamicCache

from speechlm.adapters.reading_cache import tensors_state

SENTINEL = "\u2063speechlm-user-text\u2063"  # stands for the message while the template is rendered


CONTEXT_HEADING = "Things users have said:"  # what `sample_context` puts before its sentences
# The attention implementations that read a 4D mask as given (flex as a bias on the scores): the texts are packed
# under one. Flash attention takes padding only, so a backbone loaded with it scores in sdpa (`packable_attention`).
PACKABLE_ATTENTION = ("sdpa", "eager", "flex_attention")
MIN_TRANSCRIPT_TOKENS = 32  # what the opening must leave for a transcript, checked when a scorer is built
PACK_TOKENS = 2048  # a pack's texts' tokens at most (its mask and attention grow with their square; a text over it alone)
HEAD_ROWS = 256  # the head's log-probabilities over the vocabulary for this many positions at a time


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


@contextmanager
def packable_attention(text_model):
    """Where ``text_model`` attends with an implementation that reads `UserTextScorer`'s block mask: its own if
    it is one of `PACKABLE_ATTENTION`, else sdpa (eager where sdpa cannot be set) until the block ends. The
    setting is the backbone's, read by every forward: the model's calls are one at a time (a pipeline's lock)."""
    kept = text_model.config._attn_implementation
    if kept in PACKABLE_ATTENTION:
        yield
        return
    for packable in ("sdpa", "eager"):
        try:
            text_model.set_attn_implementation(packable)
        except (ValueError, ImportError):
            continue
        if text_model.config._attn_implementation == packable:  # refused with a warning only, otherwise
            break
    else:
        raise RuntimeError(f"scoring texts packed needs sdpa or eager attention; the backbone ({kept}) takes neither")
    try:
        yield
    finally:  # `kept` was set before: a kernel from outside kernels-community needs leave again
        text_model.set_attn_implementation(kept, allow_all_kernels=True)


class UserTextScorer:
    """texts -> each one's summed log-probability under ``model``'s backbone, as a user's message (after
    ``context`` as the system turn, if given). ``batch_size`` texts a pack: 64 scored a reader's beams after a
    1,400-token context in 0.64x the time of 16 (each pack attends to the whole opening in every layer, and a
    clip's ten transcripts are split less), with ~300 positions a pack; fewer where their tokens pass `PACK_TOKENS`
    (long transcripts)."""

    def __init__(self, model, tokenizer, *, context: str | None = None, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.prefix = user_turn_prefix(tokenizer, context)
        self.positions = getattr(model.text_model.config, "max_position_embeddings", None)
        self._check_fits(MIN_TRANSCRIPT_TOKENS)
        self._opening: tuple[tuple, tuple] | None = None  # (the state it was run in, `_run_opening`'s result)

    def _check_fits(self, longest: int) -> None:
        # past its positions a backbone's scores are noise (rotary embeddings it never trained on), not an error
        if self.positions is None or len(self.prefix) + longest <= self.positions:
            return
        opening = (f"the ranking's opening ({len(self.prefix)} tokens, most of them reader_lm_context: give a "
                   "shorter one)" if len(self.prefix) > self.positions // 2 else
                   f"the ranking's opening ({len(self.prefix)} tokens)")
        raise ValueError(f"the backbone reads at most {self.positions} positions: {opening} and a transcript of "
                         f"{longest} tokens do not fit")

    def weights_changed(self) -> None:
        """Run the opening again at the next call: for a change of the weights torch's version counter does not see
        (a write through ``.data``, as peft's LoRA merge makes)."""
        self._opening = None

    def weights(self) -> list[torch.Tensor]:
        """The tensors a score depends on: the backbone's, its LoRA factors left out."""
        return [p for name, p in self.model.text_model.named_parameters() if "lora_" not in name]

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        # A beam's finished transcripts can repeat one text (the same words from other Whisper tokens): each
        # distinct text is scored once.
        distinct = list(dict.fromkeys(text.strip() for text in texts))
        scores = dict(zip(distinct, self.score_token_ids(self.tokenizer(distinct, add_special_tokens=False).input_ids),
                          strict=True))
        return [scores[text.strip()] for text in texts]

    @torch.no_grad()
    def score_token_ids(self, tokens: Sequence[list[int]]) -> list[float]:
        """Each text's (token ids') summed log-probability, 0 for an empty one, `batch_size` texts a pack."""
        scores = [0.0] * len(tokens)
        scored = [index for index, ids in enumerate(tokens) if ids]
        if not scored:
            return scores
        self._check_fits(max(len(tokens[index]) for index in scored))
        with base_weights(self.model), packable_attention(self.model.text_model):
            prefix = self._prefix()
            for pack in self._packs([len(tokens[index]) for index in scored]):
                batch = [scored[place] for place in pack]
                for index, score in zip(batch, self._scores([tokens[index] for index in batch], *prefix), strict=True):
                    scores[index] = score
        return scores

    def _packs(self, lengths: Sequence[int]) -> list[list[int]]:
        """The texts of ``lengths`` tokens in packs, in order: `batch_size` texts a pack, or fewer where their tokens
        would pass `PACK_TOKENS`."""
        packs, pack, tokens = [], [], 0
        for place, length in enumerate(lengths):
            if pack and (len(pack) == self.batch_size or tokens + length > PACK_TOKENS):
                packs.append(pack)
                pack, tokens = [], 0
            pack.append(place)
            tokens += length
        return [*packs, pack] if pack else packs

    def _prefix(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """`_run_opening`, run again only when the backbone changed since: a weight trained or loaded in place
        (torch's version counter), replaced or cast (its storage), or another attention or autocast. A reader calls
        the scorer once a decoding batch, and a context's opening costs a pass over ~1,400 tokens (~4.5 s on 2
        cores): more than the batch's transcripts."""
        device = self.model.get_input_embeddings().weight.device
        state = (self.model.text_model.config._attn_implementation, torch.is_autocast_enabled(device.type),
                 torch.get_autocast_dtype(device.type),
                 *tensors_state(self.weights()))
        if self._opening is None or self._opening[0] != state:
            self._opening = (state, self._run_opening())
        return self._opening[1]

    def _run_opening(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """The user turn's opening through the backbone: each layer's keys and values, and the log-probabilities
        of a text's first token."""
        embeddings = self.model.get_input_embeddings()
        decoder = self.model.get_decoder()
        ids = torch.tensor([self.prefix], device=embeddings.weight.device)
        cache = DynamicCache(config=decoder.config)
        hidden = decoder(inputs_embeds=embeddings(ids), use_cache=True, **{cache_keyword(decoder): cache}).last_hidden_state
        return [(layer.keys, layer.values) for layer in cache.layers], self._log_probs(hidden[0, -1])

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        # contiguous: on CPU a bfloat16 matmul over a sliced (strided) input takes a path 10-100x slower
        # (`SpeechVocabulary.logits` likewise); the head is most of a score
        logits = self.model.get_output_embeddings()(hidden.contiguous())[..., : self.model.config.text_vocab_size]
        return torch.log_softmax(logits.float(), dim=-1)

    def _scores(self, own: Sequence[list[int]], cached: list[tuple[torch.Tensor, torch.Tensor]],
                first: torch.Tensor) -> list[float]:
        """Each text's (token ids', none empty) summed log-probability after the cached opening.

        The texts are packed into one row as a token tree: each distinct beginning once (a beam's transcripts
        grew from common beginnings: half the tokens of a clip's ten), each token attending to the opening and its
        own ancestors (tree attention) at the position it has in its texts. The opening's keys and values are held
        once: batched rows would each attend to a copy of them (the cache concatenates them with each row's own,
        in every layer), which made a long context cost 4x its short one. A pack is what each text alone would be
        for a backbone that attends in full (the Llama family); the mask takes the place of a sliding window
        (Mistral's: a difference only past it), and longrope (Phi-3) picks its frequencies by a pack's furthest
        position (past its original length only)."""
        embeddings = self.model.get_input_embeddings()
        decoder = self.model.get_decoder()
        device = embeddings.weight.device
        node_of: dict[tuple[int, int], int] = {}  # (parent node or -1, token) -> node
        parents, tokens, paths = [], [], []
        for text in own:
            node, path = -1, []
            for token in text:
                if (node, token) not in node_of:
                    node_of[node, token] = len(tokens)
                    parents.append(node)
                    tokens.append(token)
                node = node_of[node, token]
                path.append(node)
            paths.append(path)
        ancestry = torch.zeros(len(tokens), len(tokens), dtype=torch.bool)  # a node sees itself and its ancestors
        depth = [0] * len(tokens)
        for node, parent in enumerate(parents):  # parents come before their children
            if parent >= 0:
                ancestry[node] = ancestry[parent]
                depth[node] = depth[parent] + 1
            ancestry[node, node] = True
        ids = torch.tensor(tokens, dtype=torch.long, device=device)
        inputs = embeddings(ids[None])
        opening = len(self.prefix)
        visible = torch.cat([torch.ones(len(tokens), opening, dtype=torch.bool), ancestry], dim=1).to(device)
        mask = torch.zeros(visible.shape, dtype=inputs.dtype, device=device).masked_fill(
            ~visible, torch.finfo(inputs.dtype).min)
        positions = opening + torch.tensor(depth, device=device)
        cache = DynamicCache(list(cached), config=decoder.config)
        hidden = decoder(inputs_embeds=inputs, attention_mask=mask[None, None], position_ids=positions[None],
                         use_cache=True, **{cache_keyword(decoder): cache}).last_hidden_state[0]
        # a text's first token is predicted by the opening's last position, each later one by its parent's (the
        # head over the vocabulary, the big part, runs once a parent)
        picked = first[ids]
        parent = torch.tensor(parents, device=device)
        later = torch.nonzero(parent >= 0).squeeze(-1)
        if len(later):
            predictors, row = torch.unique(parent[later], return_inverse=True)
            for start in range(0, len(predictors), HEAD_ROWS):  # a pack's parents times the vocabulary, in parts
                inside = (row >= start) & (row < start + HEAD_ROWS)
                log_probs = self._log_probs(hidden[predictors[start: start + HEAD_ROWS]])
                picked[later[inside]] = log_probs[row[inside] - start, ids[later[inside]]]
        text = torch.repeat_interleave(torch.arange(len(own), device=device),
                                       torch.tensor([len(path) for path in paths], device=device))
        path_nodes = torch.tensor([node for path in paths for node in path], dtype=torch.long, device=device)
        return torch.zeros(len(own), device=device).index_add_(0, text, picked[path_nodes]).tolist()


def cache_keyword(decoder) -> str:
    """The keyword ``decoder.forward`` takes a key/value cache by: ``cache`` from transformers 5.25 (which
    deprecates ``past_key_values``, the only one before)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
