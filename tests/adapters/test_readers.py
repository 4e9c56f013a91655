"""The whisper reader: Whisper's own decoder reads each clip, and its transcript follows the clip's frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from whisper.audio import log_mel_spectrogram
from whisper.decoding import DecodingTask, PyTorchInference

import speechlm  # noqa: F401  (registers the Auto classes)
from speechlm.adapters import readers
from speechlm.adapters.building import build_processor, build_speechlm
from speechlm.adapters.readers import WhisperTranscriptReader, without_loop
from speechlm.adapters.reading_cache import ReadingCache
from speechlm.speech_io.config_errors import ConfigError
from speechlm.speech_io.constants import reader_slot_count
from tests.adapters.conftest import audio_inputs
from tests.conftest import TINY_AUDIO, TINY_PROJECTOR, save_tiny_whisper, tiny_spec

# Whisper's tokenizer has 51865 tokens; a decoder of 16 positions reads at most 8 tokens a clip.
READER_AUDIO = dict(TINY_AUDIO, n_vocab=51865, n_text_ctx=16, n_text_state=32, n_text_head=2, n_text_layer=1)
READER_PROJECTOR = dict(TINY_PROJECTOR, reader="whisper", reader_silence_seconds=1.0)


def reader_spec(**changes):
    return tiny_spec(**{"audio": dict(READER_AUDIO), "projector": dict(READER_PROJECTOR), **changes})


@pytest.fixture(scope="module")
def reading():
    model, tokenizer = build_speechlm(reader_spec())
    return model.eval(), tokenizer


def test_each_clip_gets_its_frames_then_its_transcript_slots(reading):
    model, tokenizer = reading
    lengths = [120, 250]
    inputs = audio_inputs(model, tokenizer, lengths)
    embeddings, kept = model._audio_embeddings(inputs["input_features"], inputs["input_features_mask"])
    counts = [int(model.audio_lengths(torch.tensor(n))) for n in lengths]
    slots = [int(reader_slot_count(torch.tensor(n), 8)) for n in lengths]
    assert embeddings.shape == (sum(counts), model.config.hidden_size)
    assert counts == [stacked + slot for stacked, slot in zip([30, 63], slots, strict=True)]  # stack 2: 50 Hz -> 25
    start = 0
    for count, slot in zip(counts, slots, strict=True):
        clip = kept[start:start + count]
        assert clip[: count - slot].all()  # every projected frame
        filled = int(clip[count - slot:].sum())
        assert clip[count - slot: count - slot + filled].all() and not clip[count - slot + filled:].any()
        assert not embeddings[start + count - slot + filled: start + count].any()  # empty slots are zero
        start += count


def test_transcript_embeddings_are_the_backbone_tokens_of_whisper_text(reading):
    model, tokenizer = reading
    inputs = audio_inputs(model, tokenizer, [180])
    frames, (ids,) = model._encode_and_read(inputs["input_features"], inputs["input_features_mask"].sum(-1))
    embeddings, kept = model._audio_embeddings(inputs["input_features"], inputs["input_features_mask"])
    first = int(model.audio_lengths(torch.tensor(180))) - int(reader_slot_count(torch.tensor(180), 8))
    expected = model.get_input_embeddings()(torch.tensor(ids))
    torch.testing.assert_close(embeddings[first: first + len(ids)], expected)
    assert all(0 <= i < model.config.text_vocab_size for i in ids)  # text only, never a speech token


def test_a_batch_reads_as_each_clip_alone(reading):
    model, tokenizer = reading
    model.reading_cache.clear()
    inputs = audio_inputs(model, tokenizer, [260, 90, 150], seed=4)
    embeddings, kept = model._audio_embeddings(inputs["input_features"], inputs["input_features_mask"])
    start = 0
    for row in range(3):
        model.reading_cache.clear()
        length = int(inputs["input_features_mask"][row].sum())
        alone, alone_kept = model._audio_embeddings(inputs["input_features"][row:row + 1, :, :length], None)
        torch.testing.assert_close(embeddings[start:start + len(alone)], alone, rtol=1e-5, atol=1e-5)
        assert torch.equal(kept[start:start + len(alone)], alone_kept)
        start += len(alone)
    assert start == len(embeddings)


@pytest.mark.parametrize("language", ["en", None])  # None: Whisper detects each clip's language first
def test_a_beam_reads_a_batch_as_each_clip_alone(language):
    projector = dict(READER_PROJECTOR, reader_beam_size=3, reader_language=language)
    model, tokenizer = build_speechlm(reader_spec(projector=projector))
    model.eval()
    inputs = audio_inputs(model, tokenizer, [90, 150, 120], seed=5)  # one 2 s window: they decode together
    lengths = inputs["input_features_mask"].sum(-1)
    _, batch = model._encode_and_read(inputs["input_features"], lengths)
    for row, length in enumerate(lengths.tolist()):
        _, (alone,) = model._encode_and_read(inputs["input_features"][row:row + 1, :, :length], lengths[row:row + 1])
        assert batch[row] == alone


def test_a_random_reader_starts_from_finite_weights(reading):
    model, _ = reading  # openai-whisper's decoder leaves its learned positions to a checkpoint (torch.empty)
    assert all(torch.isfinite(p).all() and p.abs().max() < 10 for p in model.audio_reader.parameters())


@pytest.mark.parametrize("beam_size", [1, 3])
def test_the_prompt_and_frames_read_once_a_clip_decode_as_openai_whisper(monkeypatch, beam_size):
    projector = dict(READER_PROJECTOR, reader_beam_size=beam_size, reader_prompt="Priya, Elena")
    model, tokenizer = build_speechlm(reader_spec(projector=projector))
    model.eval()
    inputs = audio_inputs(model, tokenizer, [90, 150, 120], seed=5)
    reader, lengths = model.audio_reader, inputs["input_features_mask"].sum(-1)
    windows = reader.windows(lengths)
    with torch.no_grad():
        frames = model.audio_tower(reader.pad_with_silence(inputs["input_features"], lengths, windows), windows)
    shared = reader.decoding_task(frames.shape[1]).run(frames)

    class OpenAIWhisperInference(readers.SharedPromptInference):
        def logits(self, tokens, audio_features):  # the prompt for every beam, every position projected
            return PyTorchInference.logits(self, tokens, audio_features)

    monkeypatch.setattr(readers, "SharedPromptInference", OpenAIWhisperInference)
    monkeypatch.setattr(readers.BatchDecodingTask, "_main_loop", DecodingTask._main_loop)
    plain = reader.decoding_task(frames.shape[1]).run(frames)
    assert any(result.tokens for result in plain)  # the tiny decoder writes something to compare
    for ours, theirs in zip(shared, plain, strict=True):
        assert ours.tokens == theirs.tokens
        assert ours.avg_logprob == pytest.approx(theirs.avg_logprob, abs=1e-5, nan_ok=True)
        assert ours.no_speech_prob == pytest.approx(theirs.no_speech_prob, abs=1e-6)


class ScriptedInference:
    """Whisper's decoder as a script: a clip's rows write three words (likeliest first) until the step its frames
    hold (``features[clip, 0, 0]``), then the end of text; records how many rows each step decodes."""

    def __init__(self, tokenizer, vocabulary: int, initial: int):
        self.eot, self.vocabulary, self.initial = tokenizer.eot, vocabulary, initial
        self.words = [tokenizer.encode(word)[0] for word in (" cat", " dog", " bird")]
        self.kv_cache, self.kv_modules, self.rows = {}, [], []

    def logits(self, tokens, audio_features):
        self.rows.append(tokens.shape[0])
        logits = torch.full((tokens.shape[0], 1, self.vocabulary), -10.0)
        logits[:, 0, self.words] = torch.tensor([2.0, 1.0, 0.5])
        ended = tokens.shape[1] - self.initial >= audio_features[:, 0, 0]
        logits[ended, 0, self.eot] = 10.0
        return logits

    def rearrange_kv_cache(self, source_indices):
        pass

    def cleanup_caching(self):
        pass


@pytest.mark.parametrize("patience", [1.0, 0.5, 2.0])  # below 1, `finalize` fills a clip's beam from its live rows
def test_a_clip_whose_beam_is_done_leaves_the_batch_and_reads_as_in_openai_whispers_loop(reading, monkeypatch,
                                                                                          patience):
    model, _ = reading
    reader = model.audio_reader
    frames = torch.zeros(3, 150, model.config.audio_config.n_audio_state)
    frames[:, 0, 0] = torch.tensor([1.0, 3.0, 5.0])  # the steps each clip's words end at

    def read(scripted_rows: list[int]):
        with reader.beam(3):
            task = reader.decoding_task(frames.shape[1])
        task.decoder.max_candidates = round(3 * patience)
        task.inference = task.decoder.inference = ScriptedInference(task.tokenizer, model.config.audio_config.n_vocab,
                                                                    len(task.initial_tokens))
        results = task.run(frames)
        scripted_rows += task.inference.rows
        return results

    leaving_rows, every_rows = [], []
    leaving = read(leaving_rows)
    monkeypatch.setattr(readers.BatchDecodingTask, "_beam_loop", DecodingTask._main_loop)  # every clip to the end
    every = read(every_rows)
    assert every_rows == [9] * len(every_rows) and sorted(leaving_rows, reverse=True) == leaving_rows
    if patience == 1.0:
        assert leaving_rows[0] == 9 and leaving_rows[-1] == 3 and len(set(leaving_rows)) == 3  # 9, then 6, then 3
        assert [len(result.tokens) for result in leaving] == [1, 3, 5]
    if patience < 1:  # the beam's third candidate comes from a live row at the end: nobody leaves
        assert leaving_rows == every_rows
    for ours, theirs in zip(leaving, every, strict=True):
        assert ours.tokens == theirs.tokens and ours.text == theirs.text
        assert ours.avg_logprob == pytest.approx(theirs.avg_logprob, abs=1e-6)
        assert ours.no_speech_prob == pytest.approx(theirs.no_speech_prob, abs=1e-6, nan_ok=True)


def test_clips_that_leave_the_beam_take_their_cached_keys_with_them(reading, monkeypatch):
    model, tokenizer = reading  # Whisper's own (tiny) decoder and caches, each clip told to end at its own step
    inputs = audio_inputs(model, tokenizer, [90, 150, 120], seed=5)
    reader, lengths = model.audio_reader, inputs["input_features_mask"].sum(-1)
    windows = reader.windows(lengths)
    with torch.no_grad():
        frames = model.audio_tower(reader.pad_with_silence(inputs["input_features"], lengths, windows), windows)
    ends = torch.tensor([1.0, 3.0, 5.0])
    rows = []

    class Ending(readers.SharedPromptInference):
        def logits(self, tokens, audio_features):
            logits = super().logits(tokens, audio_features).clone()
            clips = (audio_features[:, :1] == frames[None, :, 0]).all(-1).float().argmax(-1)  # each row's clip
            ended = tokens.shape[1] - self.initial_token_length >= ends[clips]
            logits[ended, -1, task_eot] += 50.0
            rows.append(tokens.shape[0])
            return logits

    monkeypatch.setattr(readers, "SharedPromptInference", Ending)
    task_eot = reader.whisper_tokenizer.eot
    with reader.beam(3):
        leaving = reader.decoding_task(frames.shape[1]).run(frames)
        monkeypatch.setattr(readers.BatchDecodingTask, "_beam_loop", DecodingTask._main_loop)
        left_rows, rows = rows, []
        every = reader.decoding_task(frames.shape[1]).run(frames)
    assert left_rows[-1] < left_rows[0] == 9 and set(rows) == {9}
    for ours, theirs in zip(leaving, every, strict=True):
        assert ours.tokens == theirs.tokens
        assert ours.avg_logprob == pytest.approx(theirs.avg_logprob, abs=1e-5)


def test_generate_batch_equals_one_at_a_time(reading):
    model, tokenizer = reading
    processor = build_processor(tokenizer, model.config)
    rng = np.random.default_rng(1)
    conversations = [[{"role": "user", "content": [
        {"type": "audio", "audio": (rng.standard_normal(samples) * 0.1).astype(np.float32), "sampling_rate": 16000},
        {"type": "text", "text": "What did you hear?"}]}] for samples in (14000, 23000)]
    batch = processor(conversations)  # left-padded for generation
    batched = model.generate(**batch, max_new_tokens=4, do_sample=False)
    for row, conversation in enumerate(conversations):
        alone = processor(conversation)
        out = model.generate(**alone, max_new_tokens=4, do_sample=False)
        assert torch.equal(batched[row, batch["input_ids"].shape[1]:], out[0, alone["input_ids"].shape[1]:])


def test_the_whisper_text_is_retokenized_into_whole_backbone_words(reading):
    model, tokenizer = reading
    reader = model.audio_reader
    text = "Dudley visited Italy yesterday."
    whisper_ids = reader.whisper_tokenizer.encode(" " + text)
    (ids,) = reader.token_ids([text], torch.tensor([3000]))
    assert ids == tokenizer(" " + text, add_special_tokens=False)["input_ids"]
    assert len(ids) != len(whisper_ids)  # the two vocabularies split these words differently
    assert tokenizer.decode(ids) == reader.whisper_tokenizer.decode(whisper_ids)
    short = reader.token_ids([text * 10], torch.tensor([100]))[0]
    assert len(short) == reader_slot_count(100, 8)  # cut to the clip's slots


@pytest.mark.parametrize(("text", "kept"), [
    ("two top teams, Spain vs. Spain vs. Spain vs. Spa", "two top teams, Spain vs."),
    ("Lucy painted the door red. Lucy painted the door red.", "Lucy painted the door red."),
    ("Go home. go home, GO HOME go home", "Go home."),  # case and punctuation do not hide a loop
    ("It was very very good.", "It was very very good."),  # a word said twice is speech
    ("No, no, no, not that.", "No, no, no, not that."),
    ("Spain vs. Spain vs.", "Spain vs. Spain vs."),
    ("", ""),
])
def test_a_transcript_is_cut_where_whisper_loops(text, kept):
    assert without_loop(text) == kept


def test_silence_padding_is_what_whisper_computes_for_appended_silence():
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(16000) * 0.1).astype(np.float32)
    window = 300
    alone = log_mel_spectrogram(torch.from_numpy(audio))[:, :100]
    whisper_padded = log_mel_spectrogram(torch.from_numpy(np.pad(audio, (0, 3 * 16000))))[:, :window]
    ours = WhisperTranscriptReader.pad_with_silence(alone[None], torch.tensor([100]), torch.tensor([window]))[0]
    assert ours.shape == (80, window)
    # away from the clip's edge, where the STFT window straddles both, the padding is what Whisper computes
    torch.testing.assert_close(ours[:, 105:], whisper_padded[:, 105:], rtol=0, atol=1e-4)


def test_the_reader_saves_and_reloads_with_the_model(reading, tmp_path):
    model, tokenizer = reading
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.projector_config.reader == "whisper"
    assert loaded.config.projector_config.reader_silence_seconds == 1.0
    inputs = audio_inputs(model, tokenizer, [150, 90])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
    processor = build_processor(tokenizer, loaded.config)
    assert processor.num_audio_placeholders(16000) == int(loaded.audio_lengths(torch.tensor(100)))


def test_decoder_weights_come_from_the_whisper_checkpoint(tmp_path):
    path = save_tiny_whisper(tmp_path / "w.pt", n_vocab=51865, n_text_ctx=16)
    model, _ = build_speechlm(reader_spec(audio_encoder=path, audio={}))
    full = torch.load(path, weights_only=True)["model_state_dict"]
    assert torch.equal(model.audio_reader.decoder.token_embedding.weight, full["decoder.token_embedding.weight"])
    assert not any(key.startswith("audio_reader.") for key in model.state_dict() if model.is_checkpoint_key(key))


def test_a_checkpoint_with_a_too_small_vocabulary_is_refused(tmp_path):
    path = save_tiny_whisper(tmp_path / "w.pt", n_vocab=64)
    with pytest.raises(ConfigError, match="n_vocab=64.*51864"):
        build_speechlm(reader_spec(audio_encoder=path, audio={}))


def test_reader_settings_are_checked():
    with pytest.raises(ConfigError) as error:
        build_speechlm(tiny_spec(audio=dict(READER_AUDIO), projector=dict(
            READER_PROJECTOR, reader="whisperx", reader_silence_seconds=40, reader_tokens_per_second=0)))
    message = str(error.value)
    assert "reader='whisperx'" in message and "reader_silence_seconds=40" in message
    assert "reader_tokens_per_second=0" in message
    with pytest.raises(ConfigError, match="does not combine with compression='ctc'"):
        build_speechlm(tiny_spec(audio=dict(READER_AUDIO), projector=dict(READER_PROJECTOR, compression="ctc")))
    with pytest.raises(ConfigError, match="n_text_state=48.*n_audio_state=32"):
        build_speechlm(tiny_spec(audio=dict(READER_AUDIO, n_text_state=48, n_text_head=2),
                                 projector=dict(READER_PROJECTOR)))


def test_a_prompt_goes_before_each_clip_in_whispers_decoder():
    model, tokenizer = build_speechlm(reader_spec(projector=dict(READER_PROJECTOR, reader_prompt="Priya, Elena")))
    model.eval()
    reader = model.audio_reader
    seen = []
    reader.decoder.token_embedding.register_forward_pre_hook(lambda _, args: seen.append(args[0][0].tolist()))
    inputs = audio_inputs(model, tokenizer, [120])
    model._audio_embeddings(inputs["input_features"], inputs["input_features_mask"])
    whisper = reader.whisper_tokenizer
    prompt = whisper.encode(" Priya, Elena")[-(reader.dims.n_text_ctx // 2 - 1):]  # Whisper keeps its last half-context
    assert seen[0][: 1 + len(prompt)] == [whisper.sot_prev, *prompt]
    assert seen[0][1 + len(prompt)] == whisper.sot


def test_a_prompt_saves_with_the_model_and_keys_the_cache(tmp_path):
    plain, tokenizer = build_speechlm(reader_spec())
    prompted, _ = build_speechlm(reader_spec(projector=dict(READER_PROJECTOR, reader_prompt="Nora")))
    prompted.load_state_dict(plain.state_dict())  # the same weights: only the prompt differs
    cache = ReadingCache()
    parts = (plain.audio_tower, plain.audio_reader)
    assert (cache.fingerprint(*parts, settings=plain.audio_reader.settings())
            != cache.fingerprint(*parts, settings=prompted.audio_reader.settings()))
    prompted.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).audio_reader.prompt == "Nora"
    with pytest.raises(ConfigError, match="reader_prompt=' '"):
        build_speechlm(reader_spec(projector=dict(READER_PROJECTOR, reader_prompt=" ")))


def test_a_model_without_its_tokenizer_says_so(reading):
    model, tokenizer = reading
    bare = type(model)(model.config).eval()
    inputs = audio_inputs(model, tokenizer, [100])
    with pytest.raises(ValueError, match="set_text_tokenizer"):
        bare(**inputs)


def test_the_cache_is_used_until_the_clip_or_the_encoder_changes(tmp_path):
    model, tokenizer = build_speechlm(reader_spec())
    model.eval()
    assert model.reading_cache.max_bytes == 0  # off unless training turns it on
    model.reading_cache = ReadingCache()
    inputs = audio_inputs(model, tokenizer, [120, 80], seed=2)
    features, mask = inputs["input_features"], inputs["input_features_mask"]
    first, _ = model._audio_embeddings(features, mask)
    cache = model.reading_cache
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2)
    again, _ = model._audio_embeddings(features, mask)
    assert cache.hits == 2 and torch.equal(first, again)
    changed = features.clone()
    changed[1, 0, 0] += 1.0  # one clip changes
    model._audio_embeddings(changed, mask)
    assert (cache.hits, cache.misses) == (3, 3)
    with torch.no_grad():
        model.audio_tower.conv1.weight.mul_(1.5)  # the encoder changes: nothing read before applies
    changed_encoder, _ = model._audio_embeddings(features, mask)
    assert (cache.hits, cache.misses) == (3, 5)
    assert not torch.equal(changed_encoder, first)


def test_a_cache_passes_to_a_reloaded_model_with_the_same_weights(reading, tmp_path):
    model, tokenizer = reading
    model.reading_cache = ReadingCache()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    inputs = audio_inputs(model, tokenizer, [110])
    model._audio_embeddings(inputs["input_features"], inputs["input_features_mask"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded.reading_cache = model.reading_cache
    hits = model.reading_cache.hits
    loaded._audio_embeddings(inputs["input_features"], inputs["input_features_mask"])
    assert model.reading_cache.hits == hits + 1


def test_the_cache_keeps_within_its_bytes():
    cache = ReadingCache(max_bytes=3 * 400)
    for index in range(5):
        cache.put("weights", str(index), (torch.zeros(10, 10), [index]))  # 400 bytes each
    assert len(cache) == 3 and cache.bytes == 1200 and cache.evictions == 2
    assert cache.get("weights", "0") is None and cache.get("weights", "4")[1] == [4]


def test_readings_saved_to_a_file_are_read_by_a_fresh_model_instead_of_the_clips(reading, tmp_path):
    model, tokenizer = reading
    model.reading_cache = ReadingCache()
    inputs = audio_inputs(model, tokenizer, [110, 70], seed=4)
    first, _ = model._audio_embeddings(inputs["input_features"], inputs["input_features_mask"])
    assert model.reading_cache.save(tmp_path / "readings.safetensors") == 2
    assert [path.name for path in tmp_path.iterdir()] == ["readings.safetensors"]  # nothing half-written left
    fresh = ReadingCache()
    assert fresh.load(tmp_path / "readings.safetensors") == 2 and fresh.bytes == model.reading_cache.bytes
    model.reading_cache = fresh
    again, _ = model._audio_embeddings(inputs["input_features"], inputs["input_features_mask"])
    assert (fresh.hits, fresh.misses) == (2, 0) and torch.equal(first, again)


def test_a_readings_file_keeps_empty_transcripts_and_its_bytes_limit(tmp_path):
    cache = ReadingCache()
    cache.put("weights", "silent", (torch.zeros(3, 4), []))
    cache.put("weights", "spoken", (torch.ones(3, 4, dtype=torch.float16), [5, 6]))
    cache.save(tmp_path / "r.safetensors")
    loaded = ReadingCache()
    loaded.load(tmp_path / "r.safetensors")
    frames, ids = loaded.get("weights", "spoken")
    assert ids == [5, 6] and frames.dtype == torch.float16 and torch.equal(frames, torch.ones(3, 4).half())
    assert loaded.get("weights", "silent")[1] == []
    small = ReadingCache(max_bytes=48)  # room for one float32 entry
    assert small.load(tmp_path / "r.safetensors") == 2 and len(small) == 1 and small.evictions == 1


def test_a_readings_file_keeps_which_entries_were_used_last(tmp_path):
    cache = ReadingCache()
    cache.put("weights", "a", (torch.zeros(3, 4), [1]))
    cache.put("weights", "b", (torch.ones(3, 4), [2]))
    cache.get("weights", "a")  # now the most recently used, though first by name
    cache.save(tmp_path / "r.safetensors")
    small = ReadingCache(max_bytes=48)  # room for one entry: the most recent stays
    assert small.load(tmp_path / "r.safetensors") == 2
    assert small.get("weights", "a") is not None and small.get("weights", "b") is None


def test_a_file_that_holds_no_readings_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: not a file of readings"):
        ReadingCache().load(tmp_path / "model.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"broken.safetensors: cannot read the readings"):
        ReadingCache().load(tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=r"missing.safetensors: cannot read the readings"):
        ReadingCache().load(tmp_path / "missing.safetensors")


def _transcription_requests(seed: int, lengths=(14000, 23000)):
    rng = np.random.default_rng(seed)
    return [[{"role": "user", "content": [
        {"type": "audio", "audio": (rng.standard_normal(samples) * 0.1).astype(np.float32), "sampling_rate": 16000},
        {"type": "text", "text": "Transcribe the audio."}]}] for samples in lengths]


def test_a_strong_follow_writes_the_readers_transcript_and_reads_each_clip_once(reading):
    from speechlm.responding import reader_transcripts, respond

    model, tokenizer = reading
    model.reading_cache = ReadingCache(max_bytes=0)  # a loaded model's: it keeps nothing
    processor = build_processor(tokenizer, model.config)
    conversations = _transcription_requests(seed=2)
    transcripts = reader_transcripts(model, processor, processor(conversations))
    assert all(transcripts)  # this seed's random decoder writes something for each clip
    model.audio_reader.transcribe = counting = _Counting(model.audio_reader.transcribe)
    replies = respond(model, processor, conversations, max_new_tokens=24, follow_transcript=1e4)
    assert counting.clips == 2  # read for the transcript; generate's forward found it kept
    del model.audio_reader.transcribe
    for reply, transcript in zip(replies, transcripts, strict=True):
        assert reply.text == tokenizer.decode(transcript)
    assert model.reading_cache.max_bytes == 0 and len(model._call_readings) == 0  # nothing kept after the call
    alone = [respond(model, processor, c, max_new_tokens=24, follow_transcript=1e4).text for c in conversations]
    assert alone == [reply.text for reply in replies]


def test_a_transcription_that_runs_off_falls_back_to_the_transcript(reading):
    from speechlm.responding import reader_transcripts, respond

    model, tokenizer = reading
    processor = build_processor(tokenizer, model.config)
    conversations = _transcription_requests(seed=2)
    heard = [tokenizer.decode(ids) for ids in reader_transcripts(model, processor, processor(conversations))]

    def texts(**settings):
        return [r.text for r in respond(model, processor, conversations, max_new_tokens=24, **settings)]

    loose = texts(follow_transcript=1e-3)  # the random LM writes its own text
    assert loose != heard
    assert texts(follow_transcript=1e-3, transcript_fallback=0.0) == heard  # any departure falls back
    assert texts(follow_transcript=1e-3, transcript_fallback=1e9) == loose  # none is far enough
    assert texts(transcript_fallback=0.0) == texts()  # without following, there is no transcript to fall back to


def test_the_fallback_measures_departure_in_words(reading):
    from speechlm.responding import eos_token_ids, transcripts_where_run_off
    from speechlm.speech_io.processor import padding_token_id

    _, tokenizer = reading
    processor = build_processor(tokenizer, reading[0].config)
    eos, pad = eos_token_ids(reading[0], processor)[0], padding_token_id(processor.tokenizer)

    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    transcripts = [ids("the cat sat on the mat."), ids("can fish swim?"), []]
    written = [ids("The cat sat on a mat") + [eos], ids("Can you write a sentence about being polite?") + [eos],
               ids("something else entirely")]
    width = max(map(len, written))
    new_tokens = torch.tensor([row + [pad] * (width - len(row)) for row in written])
    kept = transcripts_where_run_off(processor, new_tokens, transcripts, 0.5, eos).tolist()
    assert kept[0] == new_tokens[0].tolist()  # one word in six: a correction, kept
    assert kept[1][: len(transcripts[1]) + 1] == [*transcripts[1], eos]  # seven errors on three words: run off
    assert kept[2] == new_tokens[2].tolist()  # Whisper heard no words: nothing to fall back to
    with pytest.raises(ValueError, match="transcript_fallback=-1"):
        transcripts_where_run_off(processor, new_tokens, transcripts, -1, eos)


class _Counting:
    def __init__(self, transcribe):
        self.transcribe, self.clips = transcribe, 0

    def __call__(self, frames, windows):
        self.clips += len(frames)
        return self.transcribe(frames, windows)


def test_follow_transcript_needs_a_reader():
    from speechlm.responding import respond

    model, tokenizer = build_speechlm(tiny_spec())
    processor = build_processor(tokenizer, model.config)
    with pytest.raises(ValueError, match="needs a model with a reader"):
        respond(model.eval(), processor, _transcription_requests(seed=2)[0], max_new_tokens=4, follow_transcript=2.0)
