"""Readers: what the LM gets of a clip beside its projected frames.

`WhisperTranscriptReader` lets openai-whisper's own decoder read the clip from the SpeechLM's encoder pass
(greedy or beam search, batched, with Whisper's suppression rules and no-speech test: its ``DecodingTask``),
re-tokenizes the transcript into the backbone's vocabulary, and hands the LM those tokens' embeddings
after the clip's projected frames, as DeSTA2 (arXiv 2409.20007) feeds Whisper's transcript beside speech
features to a frozen LLM. The knowledge of 680k hours of Whisper training reaches the LM as text it
already reads; the frames stay for what text does not carry (speaker, tone, noise).

With a beam, ``reader_lm_weight`` lets the backbone choose among the beam's finished transcripts as well
(N-best rescoring, shallow fusion's cheap form): each one's log-likelihood as a user's message, under the
backbone's base weights, is added to Whisper's own with that weight before openai-whisper's length-normalized
ranking. Whisper hears; the backbone knows which of the sentences it might have heard is English ("feed the
cadet half past eight" or "feed the cat at half past eight"). With ``reader_lm_context`` it reads a domain's
text first (its users' sentences, its names), and knows which of them a user of that domain says.

Each clip is followed by ``silence_seconds`` of Whisper's silence, its window rounded up to whole 2 s and
at most 30 s (30: every clip gets exactly openai-whisper's input; less costs less, but Whisper's decoder
stops where the speech ends only if it hears enough silence after it: BENCHMARKS.md), and encoded once; the projector takes the frames of the clip itself, the decoder all of them. The
transcript gets a fixed number of LM positions per second of audio (``tokens_per_second``, so the processor
can lay out the prompt before anything is decoded); the ones it does not fill are masked out, as the
frames CTC compression drops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Iterator

import torch
from torch import nn
from whisper.decoding import (
    BeamSearchDecoder,
    DecodingOptions,
    DecodingTask,
    MaximumLikelihoodRanker,
    PyTorchInference,
)
from whisper.model import ModelDimensions, MultiHeadAttention, TextDecoder, Whisper
from whisper.tokenizer import get_tokenizer

from speechlm.adapters.audio_encoder import use_float_layer_norms
from speechlm.adapters.configuration import SpeechLMAudioConfig, SpeechLMProjectorConfig
from speechlm.speech_io.constants import MAX_MEL_FRAMES, reader_slot_count

WINDOW_STEP = 200  # mel frames (2 s): windows are whole multiples of it
# openai-whisper's rule in `transcribe`: a segment is silence when both hold
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
# A transcript that writes one span again and again for this many words is Whisper looping, not speech
REPEATED_WORDS_LIMIT = 4


def silence_windows(mel_lengths: torch.Tensor, silence_frames: int) -> torch.Tensor:
    """Mel frames each clip is heard in: its own and ``silence_frames`` of silence after it, rounded up to whole
    ``WINDOW_STEP`` (clips of similar length share a window, so they decode together), at most 30 s."""
    padded = -(-(mel_lengths + silence_frames) // WINDOW_STEP) * WINDOW_STEP
    return torch.maximum(padded.clamp(max=MAX_MEL_FRAMES), mel_lengths)


class WhisperView(Whisper):
    """openai-whisper's model interface over a decoder owned elsewhere, for its ``DecodingTask``; no weights
    of its own. ``n_audio_ctx`` is the length of the encoded frames it will be handed."""

    def __init__(self, dims: ModelDimensions, decoder: TextDecoder):
        nn.Module.__init__(self)  # Whisper.__init__ would allocate a whole new encoder and decoder
        self.dims = dims
        self.decoder = decoder


class BatchDecodingTask(DecodingTask):
    """openai-whisper's ``DecodingTask`` that also runs a beam over a batch of clips: it repeats each clip's
    tokens by the beam but not the clip's frames (one clip broadcasts, a batch fails), so the frames are
    repeated here; the language is detected once a clip. Its first step (the prompt) runs once a clip, not
    once a beam (`SharedPromptInference`), and a clip leaves the batch once its beam is done (`_beam_loop`)."""

    def _get_audio_features(self, mel: torch.Tensor) -> torch.Tensor:
        features = super()._get_audio_features(mel)
        return features if self.n_group == 1 else features.repeat_interleave(self.n_group, dim=0)  # greedy: no copy

    def _detect_language(self, audio_features: torch.Tensor, tokens: torch.Tensor):
        return super()._detect_language(audio_features[:: self.n_group], tokens)

    def __init__(self, model: Whisper, options: DecodingOptions):
        super().__init__(model, options)
        self.inference = SharedPromptInference(model, len(self.initial_tokens), self.n_group, self.sot_index)
        if hasattr(self.decoder, "inference"):  # the beam search rearranges the caches through its own reference
            self.decoder.inference = self.inference

    def _main_loop(self, audio_features: torch.Tensor, tokens: torch.Tensor):
        # The first step's logits come back at (start of transcript, last prompt token) only, so the loop
        # reads the start-of-transcript position (the no-speech probability) at index 0.
        sot_index, self.sot_index = self.sot_index, 0
        try:
            if isinstance(self.decoder, BeamSearchDecoder):
                return self._beam_loop(audio_features, tokens)
            return super()._main_loop(audio_features, tokens)
        finally:
            self.sot_index = sot_index

    def _beam_loop(self, audio_features: torch.Tensor, tokens: torch.Tensor):
        """openai-whisper's ``_main_loop`` for a beam, where a clip leaves the batch once its beam has finished
        its candidates: openai-whisper decodes every clip's beams until the last clip's are done, a quarter of a
        reading's rows after their clip's (the quick start's evaluation). Its rows, caches and frames are
        dropped; its finished candidates stay with the decoder, which `finalize` reads (a clip's live rows only
        matter while it has too few)."""
        decoder, group = self.decoder, self.n_group
        rows, length = tokens.shape
        sum_logprobs = torch.zeros(rows, device=audio_features.device)
        no_speech_probs = [float("nan")] * rows
        decoder.finished_sequences = finished = [{} for _ in range(rows // group)]  # every clip's, in order
        active = list(range(rows // group))  # the clips still in the batch, in order
        # `finalize` fills a clip's candidates up to the beam from its live rows (patience < 1): it stays till then
        enough = max(decoder.max_candidates, decoder.beam_size)
        try:
            for step in range(self.sample_len):
                logits = self.inference.logits(tokens, audio_features)
                if step == 0 and self.tokenizer.no_speech is not None:  # before any clip leaves: every row
                    no_speech_probs = logits[:, self.sot_index].float().softmax(dim=-1)[:, self.tokenizer.no_speech].tolist()
                logits = logits[:, -1]
                for logit_filter in self.logit_filters:
                    logit_filter.apply(logits, tokens)
                tokens, completed = decoder.update(tokens, logits, sum_logprobs)
                length = tokens.shape[-1]
                if completed or length > self.n_ctx:
                    break
                staying = [place for place, clip in enumerate(active) if len(finished[clip]) < enough]
                if len(staying) < len(active):
                    kept_rows = [place * group + beam for place in staying for beam in range(group)]
                    tokens, sum_logprobs, audio_features = tokens[kept_rows], sum_logprobs[kept_rows], audio_features[kept_rows]
                    self._keep_in_caches(kept_rows, staying, len(active))
                    active = [active[place] for place in staying]
                    decoder.finished_sequences = [finished[clip] for clip in active]
        finally:
            self.inference.cleanup_caching()
            decoder.finished_sequences = finished
        # every clip's rows back in place for `run`; a clip that left has its candidates, so its rows are not read
        all_tokens = torch.full((rows, length), self.tokenizer.eot, dtype=tokens.dtype, device=tokens.device)
        all_logprobs = torch.zeros(rows, device=sum_logprobs.device)
        active_rows = [clip * group + beam for clip in active for beam in range(group)]
        all_tokens[active_rows], all_logprobs[active_rows] = tokens, sum_logprobs
        return all_tokens, all_logprobs, no_speech_probs

    def _keep_in_caches(self, kept_rows: list[int], kept_clips: list[int], clips: int) -> None:
        """Drop the rows that left from the self-attention caches, and from the cross-attention's, which hold one
        copy a clip (`SharedPromptInference`) or, as openai-whisper's own first step makes them, one a row."""
        cache = self.inference.kv_cache
        for module in self.inference.kv_modules:
            cache[module] = cache[module][kept_rows]
        for block in self.model.decoder.blocks:
            for module in (block.cross_attn.key, block.cross_attn.value):
                if module in cache:
                    cache[module] = cache[module][kept_clips if cache[module].shape[0] == clips else kept_rows]


class SharedPromptInference(PyTorchInference):
    """openai-whisper's inference with a cheaper first step and cross-attention. That step reads the whole
    prompt (the reader's prompt, ~45 tokens, and the start of transcript) for every beam of every clip and
    projects every position onto the 51,865-token vocabulary, where the loop needs two positions: ~half of
    a beam-5 reading. Here it runs once a clip (a clip's beams begin equal; their self-attention caches are
    copied after it) and projects the start-of-transcript and last positions only. The cross-attention's
    keys and values (the clip's frames) stay one copy a clip, which its beams attend to together
    (`beams_attend_together`), where openai-whisper keeps one a beam and reads each at every step."""

    def __init__(self, model: Whisper, initial_token_length: int, n_group: int, sot_index: int):
        super().__init__(model, initial_token_length)
        self.n_group, self.sot_index = n_group, sot_index

    def logits(self, tokens: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        if self.kv_cache:
            return super().logits(tokens, audio_features)
        self.kv_cache, self.hooks = self.model.install_kv_cache_hooks()
        decoder = self.model.decoder
        for block in decoder.blocks:
            block.cross_attn.qkv_attention = functools.partial(beams_attend_together, block.cross_attn)
        x = decoder.token_embedding(tokens[:: self.n_group]) + decoder.positional_embedding[: tokens.shape[-1]]
        audio = audio_features[:: self.n_group]
        x = x.to(audio.dtype)
        for block in decoder.blocks:  # as TextDecoder.forward, without its projection of every position
            x = block(x, audio, mask=decoder.mask, kv_cache=self.kv_cache)
        x = decoder.ln(x[:, [self.sot_index, -1]])
        logits = (x @ decoder.token_embedding.weight.to(x.dtype).T).float()
        for module in self.kv_modules:  # self-attention's: the beams part from here
            self.kv_cache[module] = self.kv_cache[module].repeat_interleave(self.n_group, dim=0)
        return logits.repeat_interleave(self.n_group, dim=0)

    def cleanup_caching(self):
        super().cleanup_caching()
        for block in self.model.decoder.blocks:
            block.cross_attn.__dict__.pop("qkv_attention", None)


def beams_attend_together(attention: MultiHeadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
    """Cross-attention of ``N * G, L, C`` queries (``G`` beams a clip, one after another) over one ``N, T, C``
    copy of each clip's keys and values: each clip's ``G * L`` queries attend as one sequence (cross-attention
    has no mask, so each query's weights are its own). openai-whisper's ``qkv_attention`` otherwise."""
    groups = q.shape[0] // k.shape[0]
    if groups == 1:
        return MultiHeadAttention.qkv_attention(attention, q, k, v, mask)
    clips, length = k.shape[0], q.shape[1]
    out, _ = MultiHeadAttention.qkv_attention(attention, q.reshape(clips, groups * length, -1), k, v, None)
    return out.reshape(clips * groups, length, -1), None


class BackboneRanker(MaximumLikelihoodRanker):
    """openai-whisper's ranking of a beam's finished transcripts (summed log-probability over length) with
    ``weight`` times the backbone's log-likelihood of each (``score``: texts -> log-likelihoods) added to
    the sum first."""

    def __init__(self, length_penalty: float | None, tokenizer, score, weight: float):
        super().__init__(length_penalty)
        self.tokenizer, self.score, self.weight = tokenizer, score, weight

    def rank(self, tokens: list[list[torch.Tensor]], sum_logprobs: list[list[float]]):
        texts = [self.tokenizer.decode(candidate.tolist()).strip() for group in tokens for candidate in group]
        backbone = iter(self.score(texts))
        fused = [[logprob + self.weight * next(backbone) for logprob in group] for group in sum_logprobs]
        return super().rank(tokens, fused)


class WhisperTranscriptReader(nn.Module):
    """``N, T', C`` Whisper encoder frames (each clip padded to its window) -> the backbone's token ids of
    each clip's transcript, at most ``reader_slot_count`` a clip."""

    def __init__(self, audio_config: SpeechLMAudioConfig, projector_config: SpeechLMProjectorConfig):
        super().__init__()
        self.dims = ModelDimensions(
            n_mels=audio_config.n_mels, n_audio_ctx=audio_config.n_audio_ctx,
            n_audio_state=audio_config.n_audio_state, n_audio_head=audio_config.n_audio_head,
            n_audio_layer=audio_config.n_audio_layer, n_vocab=audio_config.n_vocab,
            n_text_ctx=audio_config.n_text_ctx, n_text_state=audio_config.n_text_state,
            n_text_head=audio_config.n_text_head, n_text_layer=audio_config.n_text_layer)
        self.decoder = TextDecoder(self.dims.n_vocab, self.dims.n_text_ctx, self.dims.n_text_state,
                                   self.dims.n_text_head, self.dims.n_text_layer)
        # openai-whisper leaves the learned positions uninitialized (torch.empty: a checkpoint fills them); a
        # random reader (the tiny default, tests) would read with whatever memory held
        nn.init.normal_(self.decoder.positional_embedding, std=0.02)
        use_float_layer_norms(self.decoder)
        self.tokens_per_second = projector_config.reader_tokens_per_second
        self.silence_frames = round(projector_config.reader_silence_seconds * 100)
        self.beam_size = projector_config.reader_beam_size
        self.language = projector_config.reader_language
        self.prompt = projector_config.reader_prompt
        self.lm_weight = projector_config.reader_lm_weight
        self.lm_context = projector_config.reader_lm_context
        self.whisper_tokenizer = get_tokenizer(self.dims.n_vocab >= 51865, num_languages=self._num_languages(),
                                               language=self.language, task="transcribe")
        self.text_tokenizer = None  # the backbone's tokenizer: `set_text_tokenizer`
        self.text_scorer = None  # texts -> the backbone's log-likelihoods: `set_text_tokenizer`

    def _num_languages(self) -> int:
        return WhisperView(self.dims, self.decoder).num_languages

    @property
    def rescores(self) -> bool:
        """Whether the backbone chooses among the beam's transcripts too (greedy decoding has one)."""
        return self.lm_weight > 0 and self.beam_size > 1

    def settings(self) -> tuple:
        """What besides the weights decides a transcript (a reading cache's fingerprint includes it; while
        `rescores`, the backbone's weights decide too)."""
        return (self.tokens_per_second, self.silence_frames, self.beam_size, self.language, self.prompt,
                *((self.lm_weight, self.lm_context) if self.rescores else ()))

    @contextlib.contextmanager
    def beam(self, beam_size: int) -> Iterator[None]:
        """Decode with ``beam_size`` (1: greedy) inside the block, then with the model's own beam again: a
        recipe can read its training clips more cheaply than what a user hears. The reading cache's
        fingerprint (`settings`) follows, so the two readings of a clip never mix."""
        kept, self.beam_size = self.beam_size, beam_size
        try:
            yield
        finally:
            self.beam_size = kept

    def set_text_tokenizer(self, tokenizer, scorer=None) -> None:
        """The backbone's tokenizer, which the transcripts are re-tokenized with (its added speech tokens
        are never produced: a transcript is plain text), and ``scorer`` (texts -> the backbone's
        log-likelihood of each), which ranks the beam's transcripts with ``lm_weight``."""
        self.text_tokenizer, self.text_scorer = tokenizer, scorer

    # -- the encoder pass -----------------------------------------------------------------------------
    def windows(self, mel_lengths: torch.Tensor) -> torch.Tensor:
        """Mel frames each clip is encoded with (`silence_windows`)."""
        return silence_windows(mel_lengths, self.silence_frames)

    @staticmethod
    def pad_with_silence(features: torch.Tensor, mel_lengths: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """``N, n_mels, T`` log-mel (real up to ``mel_lengths``) -> ``N, n_mels, max(windows)``, each clip
        followed by what openai-whisper computes for appended silence up to its window: its log-mel is
        clamped at 8 (log10) below the clip's maximum and normalized by ``(x + 4) / 4``, so silence is the
        clip's maximum minus 2."""
        width = int(windows.max())
        frames = torch.arange(width, device=features.device)
        real = frames[None, :] < mel_lengths[:, None]  # N, W
        features = nn.functional.pad(features[..., :width], (0, max(width - features.shape[-1], 0)))
        peak = features.masked_fill(~real[:, None, :], float("-inf")).amax(dim=(1, 2))  # N
        silence = (frames[None, :] < windows[:, None]) & ~real
        return torch.where(silence[:, None, :], (peak - 2.0)[:, None, None].to(features.dtype), features)

    # -- reading ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def transcribe(self, frames: torch.Tensor, windows: torch.Tensor) -> list[str]:
        """``N, T', C`` encoder frames of clips encoded with ``windows`` mel frames each -> their transcripts.
        Clips that share a window decode together (Whisper's cross-attention takes no mask, so a clip never
        sees another's frames); a clip Whisper judges silent reads as ``""``."""
        texts = [""] * frames.shape[0]
        encoded = (windows + 1) // 2
        for length in torch.unique(encoded).tolist():
            rows = (encoded == length).nonzero().squeeze(-1)
            for row, text in zip(rows.tolist(), self._decode(frames[rows, :length]), strict=True):
                texts[row] = text
        return texts

    def decoding_task(self, encoded_frames: int) -> BatchDecodingTask:
        """Whisper's decoding of clips encoded into ``encoded_frames`` frames, with this reader's settings."""
        view = WhisperView(dataclasses.replace(self.dims, n_audio_ctx=encoded_frames), self.decoder)
        slots = reader_slot_count(2 * encoded_frames, self.tokens_per_second)
        options = DecodingOptions(task="transcribe", language=self.language, without_timestamps=True, fp16=False,
                                  beam_size=self.beam_size if self.beam_size > 1 else None, prompt=self.prompt,
                                  sample_len=min(int(slots), self.dims.n_text_ctx // 2))
        task = BatchDecodingTask(view, options)
        if self.rescores:
            if self.text_scorer is None:
                raise ValueError("reader_lm_weight ranks Whisper's transcripts with the backbone: call "
                                 "model.set_text_tokenizer(tokenizer) (load_speechlm and build_speechlm do)")
            task.sequence_ranker = BackboneRanker(options.length_penalty, self.whisper_tokenizer, self.text_scorer,
                                                  self.lm_weight)
        return task

    def _decode(self, frames: torch.Tensor) -> list[str]:
        with torch.autocast(frames.device.type, enabled=False):
            results = self.decoding_task(frames.shape[1]).run(frames.float())
        return ["" if result.no_speech_prob > NO_SPEECH_THRESHOLD and result.avg_logprob < LOGPROB_THRESHOLD
                else without_loop(result.text) for result in results]

    def token_ids(self, texts: list[str], mel_lengths: torch.Tensor) -> list[list[int]]:
        """Each transcript in the backbone's vocabulary (whole words re-tokenized, as the backbone would
        tokenize the text), cut to the clip's slots."""
        if self.text_tokenizer is None:
            raise ValueError("reader 'whisper' re-tokenizes Whisper's transcript with the backbone's tokenizer: "
                             "call model.set_text_tokenizer(tokenizer) (load_speechlm and build_speechlm do)")
        slots = reader_slot_count(mel_lengths, self.tokens_per_second).tolist()
        encoded = self.text_tokenizer([" " + text.strip() if text.strip() else "" for text in texts],
                                      add_special_tokens=False)["input_ids"]
        return [ids[:count] for ids, count in zip(encoded, slots, strict=True)]


def without_loop(text: str, limit: int = REPEATED_WORDS_LIMIT) -> str:
    """``text`` cut where Whisper's decoder starts looping: the first place a span of words follows itself
    and its copies (a last partial one included) come to ``limit`` words or more ("two top teams, Spain vs.
    Spain vs. Spain vs. Spa" -> "two top teams, Spain vs."). openai-whisper's ``transcribe`` catches loops by
    the text's gzip ratio and decodes again at a temperature; a reader reads a clip the same way every time
    (in training and after), so it cuts instead. A word said twice ("very very") stays."""
    words = text.split()
    keys = [re.sub(r"\W", "", word.lower()) for word in words]
    for start in range(1, len(words)):  # where a copy would begin
        for span in range(1, min(start, len(words) - start) + 1):  # a whole copy must fit after start
            unit = keys[start - span: start]
            end = start
            while keys[end: end + span] == unit:
                end += span
            if end == start:
                continue
            partial = 0
            while end + partial < len(keys) and partial < span and keys[end + partial] == unit[partial]:
                partial += 1
            if end - start + partial >= limit:
                return " ".join(words[:start])
    return text
