"""The backbone ranks the reader's beam: texts scored as a user's message under the base weights."""

from __future__ import annotations

import pytest
import torch
from whisper.decoding import MaximumLikelihoodRanker

from speechlm.adapters import readers
from speechlm.adapters.building import build_speechlm
from speechlm.adapters.reading_cache import ReadingCache
from speechlm.adapters.text_scoring import (
    CONTEXT_HEADING,
    SENTINEL,
    UserTextScorer,
    sample_context,
    user_turn_prefix,
)
from speechlm.speech_io.config_errors import ConfigError
from tests.adapters.conftest import audio_inputs
from tests.adapters.test_readers import READER_PROJECTOR, reader_spec

TEXTS = ["feed the cat at half past eight", "feed the cadet half past eight", "", "List three colors."]


def plain_log_likelihood(model, tokenizer, text: str, context: str | None = None) -> float:
    """The backbone alone, one text, every position projected: what the scorer must equal."""
    prefix = user_turn_prefix(tokenizer, context)
    ids = torch.tensor([prefix + tokenizer(text.strip(), add_special_tokens=False).input_ids])
    with torch.no_grad():
        logits = model.text_model(input_ids=ids).logits[0, :, : model.config.text_vocab_size].float()
    log_probs = torch.log_softmax(logits[len(prefix) - 1: -1], dim=-1)
    return float(log_probs.gather(-1, ids[0, len(prefix):, None]).sum())


def test_the_prefix_opens_a_user_turn_in_the_chat_template(reading):
    model, tokenizer = reading
    prefix = tokenizer.decode(user_turn_prefix(tokenizer))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    assert rendered.startswith(prefix) and rendered[len(prefix):].startswith(SENTINEL)


def test_without_a_chat_template_a_text_follows_the_bos_or_eos_token(reading):
    _, tokenizer = reading
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        expected = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        assert user_turn_prefix(tokenizer) == [expected]
    finally:
        tokenizer.chat_template = template


def test_a_context_is_the_system_turn_before_the_user_turn(reading):
    _, tokenizer = reading
    context = "Things users have said:\nPriya painted the door."
    prefix = tokenizer.decode(user_turn_prefix(tokenizer, context))
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": context},
                                              {"role": "user", "content": SENTINEL}], tokenize=False)
    assert rendered.startswith(prefix) and rendered[len(prefix):].startswith(SENTINEL)
    assert context in prefix and prefix != tokenizer.decode(user_turn_prefix(tokenizer))
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:  # no template: the document's first token, then the context on a line of its own
        bare = user_turn_prefix(tokenizer, context)
        assert bare[0] == user_turn_prefix(tokenizer)[0] and tokenizer.decode(bare[1:]) == context + "\n"
    finally:
        tokenizer.chat_template = template


def test_scores_after_a_context_are_the_backbones_log_likelihoods_after_it(reading):
    model, tokenizer = reading
    context = "Things users have said:\nfeed the cat at half past eight"
    scores = UserTextScorer(model, tokenizer, context=context, batch_size=3)(TEXTS)
    expected = [plain_log_likelihood(model, tokenizer, text, context) if text else 0.0 for text in TEXTS]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert scores != pytest.approx(UserTextScorer(model, tokenizer)(TEXTS), abs=1e-4)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_texts_score_as_each_alone_under_either_attention(reading, attention):
    model, tokenizer = reading
    context = "Things users have said:\nList three colors."
    kept = model.text_model.config._attn_implementation
    model.text_model.set_attn_implementation(attention)
    texts = [*TEXTS, "feed the cat", "feed the cat at half past eight o'clock"]  # beginnings of others, and longer
    try:  # one pack: each text sees the opening and its own tokens only, at its own positions
        scores = UserTextScorer(model, tokenizer, context=context, batch_size=len(texts))(texts)
    finally:
        model.text_model.set_attn_implementation(kept)
    expected = [plain_log_likelihood(model, tokenizer, text, context) if text else 0.0 for text in texts]
    assert scores == pytest.approx(expected, abs=1e-4)


def test_a_backbone_whose_attention_takes_padding_only_scores_in_sdpa(reading):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    model, tokenizer = reading
    calls = []

    def padding_only(module, query, key, value, attention_mask, **kwargs):  # as flash attention: no block mask
        calls.append(attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("padding_only", padding_only)
    ALL_MASK_ATTENTION_FUNCTIONS.register("padding_only", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    kept = model.text_model.config._attn_implementation
    model.text_model.set_attn_implementation("padding_only")
    try:
        scores = UserTextScorer(model, tokenizer, batch_size=len(TEXTS))(TEXTS)
        assert not calls and model.text_model.config._attn_implementation == "padding_only"  # sdpa, then back
        plain_log_likelihood(model, tokenizer, TEXTS[0])
        assert calls  # the backbone's own attention otherwise
        failing = UserTextScorer(model, tokenizer)
        failing._scores = lambda *args: 1 / 0
        with pytest.raises(ZeroDivisionError):
            failing(TEXTS)
        assert model.text_model.config._attn_implementation == "padding_only"  # given back on an error too
    finally:
        model.text_model.set_attn_implementation(kept)
    assert scores == pytest.approx([plain_log_likelihood(model, tokenizer, text) if text else 0.0 for text in TEXTS],
                                   abs=1e-4)


def test_a_context_past_the_backbones_positions_is_refused_by_name(reading):
    model, tokenizer = reading
    positions = model.text_model.config.max_position_embeddings
    with pytest.raises(ValueError, match="reader_lm_context"):
        UserTextScorer(model, tokenizer, context="word " * positions)
    fits = len(user_turn_prefix(tokenizer)) + max(len(tokenizer(t, add_special_tokens=False).input_ids) for t in TEXTS)
    scorer = UserTextScorer(model, tokenizer)
    scorer.positions = fits  # the longest text ends on the last position
    assert scorer(TEXTS)
    scorer.positions = fits - 1
    with pytest.raises(ValueError, match=f"at most {fits - 1} positions"):
        scorer(TEXTS)


def test_the_opening_runs_again_only_when_the_backbone_changed(reading):
    model, tokenizer = reading
    context = "Things users have said:\nList three colors."
    scorer = UserTextScorer(model, tokenizer, context=context, batch_size=2)
    runs = []
    run_opening = scorer._run_opening
    scorer._run_opening = lambda: runs.append(1) or run_opening()
    with torch.inference_mode():  # a response's reading keeps it, a training step's no-grad scoring reuses it
        first = scorer(TEXTS)
    assert scorer(TEXTS) == pytest.approx(first, abs=1e-6) and len(runs) == 1
    weight = model.text_model.get_input_embeddings().weight
    kept = weight.detach().clone()
    try:
        with torch.no_grad():  # trained in place, as an optimizer step does
            weight.mul_(1.5)
        trained = scorer(TEXTS)
        assert len(runs) == 2
        expected = [plain_log_likelihood(model, tokenizer, text, context) if text else 0.0 for text in TEXTS]
        assert trained == pytest.approx(expected, abs=1e-4) and trained != pytest.approx(first, abs=1e-3)
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    assert scorer(TEXTS) == pytest.approx(first, abs=1e-4) and len(runs) == 3


def test_packs_keep_within_their_tokens_and_the_head_runs_in_parts(reading, monkeypatch):
    from speechlm.adapters import text_scoring

    model, tokenizer = reading
    scorer = UserTextScorer(model, tokenizer, batch_size=3)
    monkeypatch.setattr(text_scoring, "PACK_TOKENS", 12)
    assert scorer._packs([5, 5, 5, 20, 1, 1, 1, 1]) == [[0, 1], [2], [3], [4, 5, 6], [7]]  # 3 texts at most
    monkeypatch.setattr(text_scoring, "HEAD_ROWS", 2)
    texts = [*TEXTS, "feed the cat", "feed the cat at half past eight o'clock"]
    expected = [plain_log_likelihood(model, tokenizer, text) if text else 0.0 for text in texts]
    assert scorer(texts) == pytest.approx(expected, abs=1e-4)


def test_a_lora_merge_runs_the_opening_again():
    from speechlm.adapters.modes import merge_lora

    projector = dict(READER_PROJECTOR, reader_beam_size=3, reader_lm_weight=0.5)
    model, tokenizer = build_speechlm(reader_spec(mode="lora", lora_scope="all", projector=projector))
    model.eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    scorer = model.audio_reader.text_scorer
    before = scorer(TEXTS)  # the base weights' opening, kept
    readings = model.reading_cache.fingerprint(model.audio_tower, tensors=scorer.weights())  # and the readings' key
    merged = merge_lora(model)  # peft writes the LoRA into the weights through .data: no version counter moves
    after = merged.audio_reader.text_scorer(TEXTS)
    expected = [plain_log_likelihood(merged, tokenizer, text) if text else 0.0 for text in TEXTS]
    assert after == pytest.approx(expected, abs=1e-4) and after != pytest.approx(before, abs=1e-3)
    assert merged.reading_cache.fingerprint(merged.audio_tower, tensors=scorer.weights()) != readings


def test_a_sampled_context_is_distinct_training_texts_under_a_heading():
    texts = [f"Sentence number {i}." for i in range(50)] + ["Sentence number 3.", " ", ""]
    context = sample_context(texts, 10, seed=0)
    heading, *lines = context.split("\n")
    assert heading == CONTEXT_HEADING and len(lines) == len(set(lines)) == 10 and set(lines) <= set(texts)
    assert sample_context(texts, 10, seed=0) == context and sample_context(texts, 10, seed=1) != context
    assert sample_context(texts[:3], 10).count("\n") == 3  # all there are
    assert sample_context(texts, 0) is None and sample_context([" "], 5) is None
    with pytest.raises(ValueError, match="count=-1"):
        sample_context(texts, -1)


def test_scores_are_the_backbones_log_likelihoods_batched_or_alone(reading):
    model, tokenizer = reading
    scorer = UserTextScorer(model, tokenizer, batch_size=2)  # two packs
    scores = scorer(TEXTS)
    expected = [plain_log_likelihood(model, tokenizer, text) if text else 0.0 for text in TEXTS]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert [scorer([text])[0] for text in TEXTS] == pytest.approx(scores, abs=1e-4)
    assert all(score < 0 for score, text in zip(scores, TEXTS, strict=True) if text)


def test_the_opening_runs_once_and_each_batch_only_its_texts(reading, monkeypatch):
    model, tokenizer = reading
    decoder = model.get_decoder()
    lengths = []
    forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda **kwargs: lengths.append(kwargs["inputs_embeds"].shape[1])
                        or forward(**kwargs))
    scorer = UserTextScorer(model, tokenizer, batch_size=2)
    scorer(TEXTS + TEXTS[:2])  # a text twice is scored once, "" never
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in TEXTS if text]
    shared = next(k for k in range(len(ids[0])) if ids[0][k] != ids[1][k])  # "feed the ca..." once in their pack
    assert shared > 0
    packs = [len(ids[0]) + len(ids[1]) - shared, len(ids[2])]
    assert lengths == [len(user_turn_prefix(tokenizer)), *packs]
    scorer(TEXTS)  # the next call (a reader's next batch) reuses the opening
    assert lengths == [len(user_turn_prefix(tokenizer)), *packs, *packs]


def test_repeated_texts_get_one_score_in_their_places(reading):
    model, tokenizer = reading
    scorer = UserTextScorer(model, tokenizer, batch_size=2)
    texts = [TEXTS[1], TEXTS[0], " " + TEXTS[1], TEXTS[3], TEXTS[0]]
    once = dict(zip(TEXTS, scorer(TEXTS), strict=True))
    assert scorer(texts) == pytest.approx([once[text.strip()] for text in texts], abs=1e-4)


@pytest.mark.parametrize("lora_scope", ["audio", "all"])
def test_lora_leaves_the_scores_alone(lora_scope):
    model, tokenizer = build_speechlm(reader_spec(mode="lora", lora_scope=lora_scope))
    model.eval()
    scorer = UserTextScorer(model, tokenizer)
    before = scorer(TEXTS)
    lora = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora
    with torch.no_grad():
        for parameter in lora:
            parameter.normal_(std=0.5)  # LoRA now changes what the backbone computes
    assert scorer(TEXTS) == pytest.approx(before, abs=1e-5)
    kept = {id(p) for p in scorer.weights()}
    assert all("lora_" not in name for name, p in model.text_model.named_parameters() if id(p) in kept)


def test_the_ranker_adds_the_weighted_scores_to_whispers():
    class Tokenizer:
        def decode(self, ids):
            return {1: "likely", 2: "unlikely words"}[ids[0]]

    tokens = [[torch.tensor([2, 2]), torch.tensor([1, 1])]]  # Whisper prefers the first (-1.0 / 2 > -1.2 / 2)
    sum_logprobs = [[-1.0, -1.2]]
    def score(texts):
        return [{"likely": -1.0, "unlikely words": -3.0}[text] for text in texts]
    assert readers.BackboneRanker(None, Tokenizer(), score, 0.0).rank(tokens, sum_logprobs) == \
        MaximumLikelihoodRanker(None).rank(tokens, sum_logprobs) == [0]
    assert readers.BackboneRanker(None, Tokenizer(), score, 0.5).rank(tokens, sum_logprobs) == [1]


def test_a_beam_ranked_by_the_backbone_reads_a_batch_as_each_clip_alone():
    projector = dict(READER_PROJECTOR, reader_beam_size=3, reader_lm_weight=0.5)
    model, tokenizer = build_speechlm(reader_spec(projector=projector))
    model.eval()
    inputs = audio_inputs(model, tokenizer, [90, 150, 120], seed=5)
    lengths = inputs["input_features_mask"].sum(-1)
    calls = []
    scorer = model.audio_reader.text_scorer
    model.audio_reader.text_scorer = lambda texts: calls.append(list(texts)) or scorer(texts)
    _, batch = model._encode_and_read(inputs["input_features"], lengths)
    assert calls and all(len(texts) <= 3 * 3 for texts in calls)  # the beam's finished transcripts, every clip
    for row, length in enumerate(lengths.tolist()):
        _, (alone,) = model._encode_and_read(inputs["input_features"][row:row + 1, :, :length], lengths[row:row + 1])
        assert batch[row] == alone


def test_the_backbone_keys_the_readings_only_while_it_ranks_a_beam():
    plain, tokenizer = build_speechlm(reader_spec(projector=dict(READER_PROJECTOR, reader_lm_weight=0.5)))
    ranked, _ = build_speechlm(reader_spec(projector=dict(READER_PROJECTOR, reader_lm_weight=0.5,
                                                          reader_beam_size=3)))
    greedy = plain.audio_reader
    assert not greedy.rescores and greedy.settings() == build_speechlm(reader_spec())[0].audio_reader.settings()
    assert ranked.audio_reader.rescores
    ranked.eval()
    ranked.reading_cache = ReadingCache()
    inputs = audio_inputs(ranked, tokenizer, [120], seed=2)
    features, mask = inputs["input_features"], inputs["input_features_mask"]
    ranked._audio_embeddings(features, mask)
    ranked._audio_embeddings(features, mask)
    assert (ranked.reading_cache.hits, ranked.reading_cache.misses) == (1, 1)
    with torch.no_grad():
        ranked.get_input_embeddings().weight.mul_(1.5)  # another backbone ranks the beam: read again
    ranked._audio_embeddings(features, mask)
    assert ranked.reading_cache.misses == 2


def test_lora_training_does_not_invalidate_the_readings():
    projector = dict(READER_PROJECTOR, reader_lm_weight=0.5, reader_beam_size=3)
    model, tokenizer = build_speechlm(reader_spec(projector=projector, mode="lora"))
    model.eval()
    model.reading_cache = ReadingCache()
    inputs = audio_inputs(model, tokenizer, [120], seed=2)
    model._audio_embeddings(inputs["input_features"], inputs["input_features_mask"])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.1)  # a training step on LoRA
    model._audio_embeddings(inputs["input_features"], inputs["input_features_mask"])
    assert (model.reading_cache.hits, model.reading_cache.misses) == (1, 1)


def test_the_weight_is_checked_and_saved_with_the_model(tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ConfigError, match="reader_lm_weight=-1"):
        build_speechlm(reader_spec(projector=dict(READER_PROJECTOR, reader_lm_weight=-1.0)))
    model, tokenizer = build_speechlm(reader_spec(projector=dict(READER_PROJECTOR, reader_lm_weight=0.5,
                                                                 reader_beam_size=3)))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.audio_reader.lm_weight == 0.5 and loaded.audio_reader.rescores


def test_the_context_is_checked_saved_with_the_model_and_keys_the_readings(tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ConfigError, match="reader_lm_context=' '"):
        build_speechlm(reader_spec(projector=dict(READER_PROJECTOR, reader_lm_context=" ")))
    projector = dict(READER_PROJECTOR, reader_lm_weight=0.5, reader_beam_size=3)
    plain, _ = build_speechlm(reader_spec(projector=projector))
    model, tokenizer = build_speechlm(reader_spec(projector=dict(projector, reader_lm_context="Priya, Mei")))
    assert model.audio_reader.text_scorer.prefix == user_turn_prefix(tokenizer, "Priya, Mei")
    assert plain.audio_reader.settings() != model.audio_reader.settings()  # a reading ranked in another context
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.audio_reader.text_scorer.prefix == model.audio_reader.text_scorer.prefix
    assert loaded.audio_reader.settings() == model.audio_reader.settings()


@pytest.fixture(scope="module")
def reading():
    model, tokenizer = build_speechlm(reader_spec())
    return model.eval(), tokenizer
