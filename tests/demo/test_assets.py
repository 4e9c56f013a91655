"""Building the real assets (skipped without the demo packages; CI installs them)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.demo.conftest import needs_demo_packages

pytestmark = needs_demo_packages


def test_backbone_is_a_llama_that_answers_and_is_reused(backbone_dir, demo_cache):
    from transformers import AutoConfig

    from speechlm.demo.assets import STAMP, build_backbone

    config = AutoConfig.from_pretrained(backbone_dir)
    assert config.architectures == ["LlamaForCausalLM"] and config.num_hidden_layers == 30
    assert not hasattr(config, "quantization_config")
    stamp = json.loads((backbone_dir / STAMP).read_text())
    assert "paris" in stamp["check"]["answer"].lower()
    start = time.perf_counter()
    assert build_backbone(demo_cache) == backbone_dir
    assert time.perf_counter() - start < 1.0  # reused, not rebuilt


def test_whisper_base_transcribes_a_sentence_it_never_saw(demo_cache, voice):
    import whisper
    from whisper.normalizers import EnglishTextNormalizer

    from speechlm.adapters.audio_encoder import load_whisper_encoder
    from speechlm.demo.assets import build_whisper
    from speechlm.demo.corpus_audio import PiperSynthesizer

    path = build_whisper(demo_cache)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["dims"] == dict(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
                                      n_vocab=51865, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6)
    sentence = "The orchestra rehearsed the second movement until nearly midnight."
    # Piper's noise is drawn unseeded inside its ONNX graph: at zero it speaks the same audio every run (with
    # its default noise, Whisper base once heard "rehearse")
    audio = PiperSynthesizer(voice)(sentence, length_scale=1.0, noise_scale=0.0, noise_w_scale=0.0, snr_db=None)
    model = whisper.load_model(str(path), device="cpu")
    # transcribe pads to 30 s itself (un-padded short mel makes the decoder repeat itself)
    result = model.transcribe(audio, language="en", fp16=False, temperature=0.0)
    normalize = EnglishTextNormalizer()
    assert normalize(result["text"]) == normalize(sentence), result["text"]
    assert load_whisper_encoder(path).conv1.weight.shape == (512, 80, 3)


def test_piper_says_how_long_each_phoneme_lasts(voice):
    from speechlm.demo.corpus_audio import PiperSynthesizer
    from speechlm.speech_io.speech_decoder import text_sentences

    text = "Good morning. The orchestra rehearsed until midnight!"
    audio, alignment = PiperSynthesizer(voice).synthesize(text, length_scale=1.1, noise_scale=0.0, noise_w_scale=0.0,
                                                          snr_db=None)
    # the speech decoder's symbols, sentence by sentence, each with its seconds; together the clip's length
    assert [[symbol for symbol, _ in sentence] for sentence in alignment] == text_sentences(text, "phonemes")
    seconds = [seconds for sentence in alignment for _, seconds in sentence]
    assert min(seconds) >= 0 and sum(seconds) == pytest.approx(len(audio) / 16000, abs=0.02)
    assert alignment[0][-1][1] > 0.25  # the pause between the sentences counts to the first one's end


def test_clips_spoken_in_worker_processes_are_the_clips_spoken_in_one(tmp_path, voice):
    from speechlm.demo.corpus_audio import ClipToSpeak, alignment_path, speak_clips
    from speechlm.speech_io.audio import load_audio

    # at zero noise Piper speaks the same audio every time, on one thread or two
    texts = ["Good morning.", "The orchestra rehearsed until midnight!", "Seven apples, please.", "Thank you."]
    settings = dict(length_scale=1.0, noise_scale=0.0, noise_w_scale=0.0, snr_db=None)
    runs = {}
    for workers in (1, 2):
        clips = [ClipToSpeak(text, settings, tmp_path / f"{workers}-{index}.flac") for index, text in enumerate(texts)]
        done = []
        runs[workers] = list(speak_clips(voice, clips, workers=workers, progress=done.append)), clips
        assert done == [1, 2, 3, 4]
        for clip, alignment in zip(clips, runs[workers][0], strict=True):
            assert json.loads(alignment_path(clip.path).read_text()) == alignment
    (one, one_clips), (two, two_clips) = runs[1], runs[2]
    assert [[symbol for symbol, _ in sentence] for alignment in one for sentence in alignment] == \
        [[symbol for symbol, _ in sentence] for alignment in two for sentence in alignment]
    for a, b in zip(one_clips, two_clips, strict=True):
        first, second = load_audio(a.path), load_audio(b.path)
        assert first.shape == second.shape and np.abs(first - second).max() < 1e-2
    with pytest.raises(ValueError, match="workers=0: expected at least 1 process"):
        next(speak_clips(voice, two_clips, workers=0))


def test_a_tiny_corpus_builds_with_every_split_and_is_reused(tmp_path, backbone_dir, voice, demo_cache):
    from speechlm.demo import texts
    from speechlm.demo.corpus import CorpusSize, build_corpus
    from speechlm.demo.corpus_texts import SPLITS
    from speechlm.speech_io.audio import load_audio

    size = CorpusSize(templates=3, backbone=2, questions=3, docs=2, stdlib=2, words=2, common_words=12,
                      heldout_fraction=0.34)
    corpus = build_corpus(tmp_path / "corpus", backbone_dir, voice, size=size,
                          text_cache=demo_cache / "texts.json", progress=lambda _: None)
    rows = {split: [json.loads(line) for line in corpus.manifests[split].read_text().splitlines()]
            for split in SPLITS}
    assert sum(map(len, rows.values())) == corpus.build["clips"] == 3 + 2 + 3 + 2 + 2 + 2
    assert {row["source"] for row in rows["ood"]} <= {"docs", "questions"}
    assert all(row["source"] == "docs" or row["kind"] in ("yes_no", "compare") for row in rows["ood"])
    assert not any(row["source"] == "docs" for row in rows["train"] + rows["heldout"])
    assert {"templates", "backbone", "stdlib", "questions", "words"} <= {row["source"] for row in rows["train"]}
    common = set(texts.common_words(12))
    assert all(common & set(texts.spoken_words(row["text"])) for row in rows["train"] if row["source"] == "words")
    heard = corpus.build["vocabulary_heard"]
    assert set(heard) == {"heldout", "ood"} and all(0.0 <= share <= 1.0 for split in heard.values()
                                                    for share in split.values())
    assert rows["heldout"], "the random held-out split is not empty"
    for row in rows["train"] + rows["heldout"] + rows["ood"]:
        audio = load_audio(tmp_path / "corpus" / row["audio"])
        assert audio.size > 16000 * 0.5 and row["text"]
        if row["source"] == "questions":
            assert row["answer"].strip()
    card = corpus.card.read_text()
    assert "generated by our code or written by us" in card and "self-distillation" in card
    assert "| split | templates | backbone | words | stdlib | questions | docs |" in card and "Words heard" in card
    assert "12 most common English words" in card
    again = build_corpus(tmp_path / "corpus", backbone_dir, voice, size=size,
                         text_cache=demo_cache / "texts.json", progress=lambda _: None)
    assert again.build["this_run"]["clips_synthesized"] == 0
    assert again.build["first_build"] == corpus.build["first_build"]
    assert again.manifests["train"].read_text() == corpus.manifests["train"].read_text()
    assert rows["decoder"] == [] and "| decoder | 0 | 0 | 0 | 0 | 0 | 0 |" in card

    # the same word sentences for the speech decoder only: the LM's splits lose them and keep everything else
    for_decoder = build_corpus(tmp_path / "corpus", backbone_dir, voice, text_cache=demo_cache / "texts.json",
                               size=dataclasses.replace(size, words=0, decoder_words=2), progress=lambda _: None)
    moved = {split: [json.loads(line) for line in for_decoder.manifests[split].read_text().splitlines()]
             for split in SPLITS}
    assert [row["text"] for row in moved["decoder"]] == [row["text"] for row in rows["train"] + rows["heldout"]
                                                         if row["source"] == "words"]
    for split in ("train", "heldout", "ood"):
        assert moved[split] == [row for row in rows[split] if row["source"] != "words"]
    assert for_decoder.build["this_run"]["clips_synthesized"] == 0  # the same ids, the same clips
    assert "Heard only by the speech decoder" in for_decoder.card.read_text()

    # the decoder's texts without their clips (the shipped codec's decoder heard them), spoken by a later build
    decoder_size = dataclasses.replace(size, words=0, decoder_words=2)
    texts_only = build_corpus(tmp_path / "texts-only", backbone_dir, voice, text_cache=demo_cache / "texts.json",
                              size=decoder_size, unspoken_splits=("decoder",), progress=lambda _: None)
    unspoken = [json.loads(line) for line in texts_only.manifests["decoder"].read_text().splitlines()]
    assert [row["text"] for row in unspoken] == [row["text"] for row in moved["decoder"]]
    assert not any("audio" in row for row in unspoken)
    assert texts_only.build["clips"] == for_decoder.build["clips"] - 2
    assert len(list((tmp_path / "texts-only" / "audio").glob("*.flac"))) == texts_only.build["clips"]
    assert "Not spoken in this build: `decoder`" in texts_only.card.read_text()
    spoken = build_corpus(tmp_path / "texts-only", backbone_dir, voice, text_cache=demo_cache / "texts.json",
                          size=decoder_size, progress=lambda _: None)
    assert spoken.build["this_run"]["clips_synthesized"] == 2 and spoken.build["clips"] == for_decoder.build["clips"]
    decoder_rows = [json.loads(line) for line in spoken.manifests["decoder"].read_text().splitlines()]
    assert [row["text"] for row in decoder_rows] == [row["text"] for row in unspoken]
    assert all((tmp_path / "texts-only" / row["audio"]).is_file() and row["alignment"] for row in decoder_rows)
    with pytest.raises(ValueError, match=r"unspoken_splits=\['dev'\]: \['dev'\] are not splits"):
        build_corpus(tmp_path / "texts-only", backbone_dir, voice, size=decoder_size, unspoken_splits=("dev",))

    # a few of the training clips spoken (what a job's training can draw): every question, then seeded others;
    # the rest of the split kept as texts, the held-out splits whole
    train_count = len(rows["train"])
    questions = sum(row["source"] == "questions" for row in rows["train"])
    partial = build_corpus(tmp_path / "partial", backbone_dir, voice, size=size, spoken_train=questions + 1,
                           text_cache=demo_cache / "texts.json", progress=lambda _: None)
    assert partial.build["this_run"]["clips_synthesized"] == corpus.build["clips"] - (train_count - questions - 1)
    assert partial.build["spoken_train"] == {"clips": questions + 1, "of": train_count}
    partial_rows = {split: [json.loads(line) for line in partial.manifests[split].read_text().splitlines()]
                    for split in SPLITS}
    assert [row["text"] for row in partial_rows["train"]] == [row["text"] for row in rows["train"]]
    assert all("audio" in row for row in partial_rows["train"] if row["source"] == "questions")
    assert sum("audio" in row for row in partial_rows["train"]) == questions + 1
    assert all("audio" in row for row in partial_rows["heldout"] + partial_rows["ood"])
    assert len(list((tmp_path / "partial" / "audio").glob("*.flac"))) == partial.build["clips"]
    assert f"Of `train`'s {train_count} texts, {questions + 1} are spoken" in partial.card.read_text()
    heard = partial.build["vocabulary_heard"]["heldout"]["all"]  # words of unspoken texts are not heard
    assert heard <= corpus.build["vocabulary_heard"]["heldout"]["all"]
    more = build_corpus(tmp_path / "partial", backbone_dir, voice, size=size, spoken_train=train_count,
                        text_cache=demo_cache / "texts.json", progress=lambda _: None)
    assert more.build["this_run"]["clips_synthesized"] == train_count - questions - 1  # the new ones only
    spoken_again = [json.loads(line) for line in more.manifests["train"].read_text().splitlines()]
    assert [row["audio"] for row in spoken_again] == [row["audio"] for row in rows["train"]]  # the same clips
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"spoken_train={bad!r}: expected a number of training clips >= 0"):
            build_corpus(tmp_path / "partial", backbone_dir, voice, size=size, spoken_train=bad)
    with pytest.raises(ValueError, match="words=1 and decoder_words=1"):
        dataclasses.replace(size, words=1, decoder_words=1)


def test_codec_is_whisper_units_with_their_vocoder_and_is_reused(tmp_path, demo_cache, voice, monkeypatch):
    import soundfile as sf

    from speechlm.demo.assets import UNIT_CODES, build_codec, build_whisper
    from speechlm.demo.corpus_audio import PiperSynthesizer
    from speechlm.finetune.vocoder_training import VocoderTraining
    from speechlm.speech_io.codec_loading import load_codec
    from speechlm.speech_io.whisper_units import WhisperUnitCodec

    synthesize = PiperSynthesizer(voice)
    (tmp_path / "audio").mkdir()
    lines = []
    texts = ["A short sentence for the codebook, spoken slowly enough to fill it.",
             "Another one, a little longer, with more words and more sounds in it than the first.",
             "The third clip: numbers like seventeen and names like Priya, so the units vary."]
    for index, text in enumerate(texts * 3):
        audio, alignment = synthesize.synthesize(text, length_scale=1.0, noise_scale=0.5, noise_w_scale=0.6,
                                                 snr_db=None)
        sf.write(tmp_path / "audio" / f"{index}.flac", audio, 16000)
        lines.append(json.dumps({"id": str(index), "audio": f"audio/{index}.flac", "text": text,
                                 "alignment": alignment}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    whisper = build_whisper(demo_cache)
    training = VocoderTraining(max_steps=2, max_clips=2, batch_size=2)
    directory = build_codec(tmp_path / "train.jsonl", whisper, demo_cache, vocoder=training, progress=lambda _: None)
    assert "Whisper units" in (directory / "README.md").read_text()
    codec = load_codec(directory)
    assert isinstance(codec, WhisperUnitCodec) and codec.codebooks_filled
    assert (codec.codebook_size, codec.n_q, codec.hop_length, codec.config.encoder_blocks) == (UNIT_CODES, 1, 320, 4)
    units = codec.encode([audio])[0]
    assert len(set(units[0].tolist())) > 10  # different frames get different codes
    assert codec.decodes_with(1) == "vocoder" and codec.decode(units).shape == (units.shape[1] * 320,)
    start = time.perf_counter()
    assert build_codec(tmp_path / "train.jsonl", whisper, demo_cache, vocoder=training) == directory
    assert time.perf_counter() - start < 5.0  # reused, not rebuilt

    # the speech decoder joins the codec's folder, and is reused while codec, corpus and settings stay
    from speechlm.demo import assets
    from speechlm.finetune.speech_decoder_training import SpeechDecoderTraining

    settings = SpeechDecoderTraining(max_steps=2, batch_size=2)
    speech_decoder = assets.build_speech_decoder(directory, [tmp_path / "train.jsonl"], training=settings,
                                                 progress=lambda _: None)
    speaking = load_codec(directory).speech_decoder
    assert speech_decoder == directory / "speech-decoder" and speaking.config.symbols == "phonemes"
    assert speaking.config.duration_predictor  # learnt from the corpus's alignments
    assert len(speaking.speak("A short sentence.")) > 5
    assert codec.decode(np.array([speaking.speak("A short sentence.")])).shape[0] > 0
    monkeypatch.setattr("speechlm.finetune.speech_decoder_training.train_codec_speech_decoder",
                        lambda *a, **k: pytest.fail("rebuilt"))
    assert assets.build_speech_decoder(directory, [tmp_path / "train.jsonl"], training=settings) == speech_decoder

    # clips only the decoder hears (the corpus's `decoder` split) are new sources: it trains again, on both
    (tmp_path / "decoder.jsonl").write_text(lines[0] + "\n")
    trained_on = []

    def record(codec_dir, manifests, *args, **kwargs):
        trained_on.append(manifests)
        raise RuntimeError("recorded")

    monkeypatch.setattr("speechlm.finetune.speech_decoder_training.train_codec_speech_decoder", record)
    with pytest.raises(RuntimeError, match="recorded"):
        assets.build_speech_decoder(directory, [tmp_path / "train.jsonl", tmp_path / "decoder.jsonl"],
                                    training=settings)
    assert trained_on == [[tmp_path / "train.jsonl", tmp_path / "decoder.jsonl"]]
    with pytest.raises(ValueError, match="no corpus manifest"):
        assets.build_speech_decoder(directory, [], training=settings)


def test_a_shipped_codec_installs_as_the_codec_it_was_shipped_from(tmp_path, demo_cache, voice):
    import soundfile as sf
    from safetensors import safe_open

    from speechlm.demo.assets import DemoAssetError, build_codec, build_speech_decoder, build_whisper
    from speechlm.demo.corpus_audio import PiperSynthesizer
    from speechlm.demo.shipped_codec import install_shipped_codec, ship_codec, shipped_codec_fits
    from speechlm.finetune.speech_decoder_training import SpeechDecoderTraining
    from speechlm.finetune.vocoder_training import VocoderTraining
    from speechlm.speech_io.codec_loading import load_codec

    synthesize, lines, clips = PiperSynthesizer(voice), [], []
    (tmp_path / "audio").mkdir()
    for index, text in enumerate(["Seventeen green boats sailed past the harbour wall at noon.",
                                  "Priya counted the apples twice before she sold them."] * 5):
        audio, alignment = synthesize.synthesize(text, length_scale=1.0, noise_scale=0.5, noise_w_scale=0.6,
                                                 snr_db=None)
        sf.write(tmp_path / "audio" / f"{index}.flac", audio, 16000)
        clips.append(audio)
        lines.append(json.dumps({"id": str(index), "audio": f"audio/{index}.flac", "text": text,
                                 "alignment": alignment}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "other.jsonl").write_text(lines[0] + "\n")
    whisper = build_whisper(demo_cache)
    built = build_codec(tmp_path / "train.jsonl", whisper, tmp_path / "built", progress=lambda _: None,
                        vocoder=VocoderTraining(max_steps=2, max_clips=2, batch_size=2))
    build_speech_decoder(built, [tmp_path / "train.jsonl"], training=SpeechDecoderTraining(max_steps=2, batch_size=2),
                         progress=lambda _: None)

    shipped = ship_codec(built, tmp_path / "shipped", heard=[tmp_path / "train.jsonl"])
    assert shipped_codec_fits([tmp_path / "train.jsonl"], shipped)
    assert not shipped_codec_fits([tmp_path / "train.jsonl", tmp_path / "other.jsonl"], shipped)  # other texts
    with safe_open(str(shipped / "speech-decoder" / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"F16"}
    installed = install_shipped_codec(whisper, tmp_path / "cache", shipped=shipped)
    original, codec = load_codec(built), load_codec(installed)
    units = codec.encode(clips[:2])
    assert all(np.array_equal(a, b) for a, b in zip(units, original.encode(clips[:2]), strict=True))
    with torch.no_grad():  # the same log-mel to a float16 rounding (Griffin-Lim's phase then wanders further)
        unit_tensor = torch.from_numpy(units[0])[None]
        assert torch.allclose(codec.vocoders[1](unit_tensor), original.vocoders[1](unit_tensor), atol=0.05)
    assert codec.decode(units[0]).shape == original.decode(units[0]).shape
    spoken, spoken_before = codec.speech_decoder.speak("Green apples."), original.speech_decoder.speak("Green apples.")
    assert len(spoken) == len(spoken_before) and np.mean(np.array(spoken) == np.array(spoken_before)) > 0.9
    assert install_shipped_codec(whisper, tmp_path / "cache", shipped=shipped) == installed  # reused

    (shipped / "vocoder-rvq1" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(DemoAssetError, match="vocoder-rvq1/model.safetensors: missing or not the shipped bytes"):
        install_shipped_codec(whisper, tmp_path / "damaged", shipped=shipped)
    (tmp_path / "other-whisper.pt").write_bytes(b"another checkpoint")
    with pytest.raises(DemoAssetError, match="other-whisper.pt: SHA-256 .*the shipped codec's units are codes of"):
        install_shipped_codec(tmp_path / "other-whisper.pt", tmp_path / "other", shipped=shipped)
    (shipped / "shipped.json").write_text("{}")
    with pytest.raises(DemoAssetError, match="shipped.json: a shipped codec's provenance without"):
        install_shipped_codec(whisper, tmp_path / "other", shipped=shipped)


def test_spoken_training_ids_put_questions_first_and_grow_as_supersets():
    from speechlm.demo.corpus import spoken_training_ids

    rows = [{"id": f"templates-{i:03d}", "source": "templates"} for i in range(40)] + \
        [{"id": f"questions-{i:03d}", "source": "questions"} for i in range(5)]
    questions = [f"questions-{i:03d}" for i in range(5)]
    assert spoken_training_ids(rows, 3) == questions[:3]
    ten, twenty = spoken_training_ids(rows, 10), spoken_training_ids(rows, 20)
    assert ten[:5] == questions and twenty[:10] == ten and len(set(twenty)) == 20
    assert ten[5:] != [f"templates-{i:03d}" for i in range(5)]  # seeded, not the manifest's first
    assert spoken_training_ids(rows, 10, seed=1)[5:] != ten[5:]
    assert sorted(spoken_training_ids(rows, 100)) == sorted(row["id"] for row in rows)


def test_the_corpus_its_helpers_heard_gets_the_shipped_codec_and_others_train_their_own(demo_cache, monkeypatch):
    from speechlm.demo import build

    calls, said = [], []
    monkeypatch.setattr(build, "install_shipped_codec", lambda whisper, root: calls.append("install") or root / "c")
    monkeypatch.setattr(build, "build_codec", lambda *args, **kwargs: calls.append("codec") or demo_cache / "c")
    monkeypatch.setattr(build, "build_speech_decoder", lambda *args, **kwargs: calls.append("decoder"))
    monkeypatch.setattr(build, "shipped_codec_fits", lambda manifests: True)  # as for the quick start's corpus
    assets = build.build_demo_assets("ci", demo_cache, progress=said.append)
    assert calls == ["install"] and "codec (shipped)" in assets.seconds and "speech decoder" not in assets.seconds
    calls.clear()
    build.build_demo_assets("ci", demo_cache, train_codec=True, progress=said.append)
    assert calls == ["codec", "decoder"]
    calls.clear()
    monkeypatch.undo()  # the ci corpus's texts are not those the shipped helpers heard
    monkeypatch.setattr(build, "build_codec", lambda *args, **kwargs: calls.append("codec") or demo_cache / "c")
    monkeypatch.setattr(build, "build_speech_decoder", lambda *args, **kwargs: calls.append("decoder"))
    build.build_demo_assets("ci", demo_cache, progress=said.append)
    assert calls == ["codec", "decoder"]
    assert "[demo] the shipped codec's helpers heard other texts than corpus-ci's: training its own" in said

    # a job speaks the training clips it draws from; a codec trained here hears every clip (the ci corpus's clips
    # are cached by now: nothing is synthesized, and the last build leaves every clip in the manifest)
    spoken, build_corpus = [], build.build_corpus
    monkeypatch.setattr(build, "build_corpus", lambda *args, **kwargs: spoken.append(kwargs["spoken_train"])
                        or build_corpus(*args, **kwargs))

    def codec_of_every_clip(manifest, *args, **kwargs):
        rows = [json.loads(line) for line in Path(manifest).read_text().splitlines()]
        assert rows and all("audio" in row for row in rows)
        return demo_cache / "c"

    monkeypatch.setattr(build, "build_codec", codec_of_every_clip)
    monkeypatch.setattr(build, "install_shipped_codec", lambda whisper, root: root / "c")
    monkeypatch.setattr(build, "shipped_codec_fits", lambda manifests: True)
    partial = build.build_demo_assets("ci", demo_cache, spoken_train=5, progress=said.append)
    assert sum("audio" in json.loads(line) for line in Path(partial.train).read_text().splitlines()) == 5
    build.build_demo_assets("ci", demo_cache, spoken_train=5, train_codec=True, progress=said.append)
    monkeypatch.setattr(build, "shipped_codec_fits", lambda manifests: False)
    build.build_demo_assets("ci", demo_cache, spoken_train=5, progress=said.append)
    assert spoken == [5, None, 5, None]


def test_the_packages_codec_speaks_what_whisper_base_hears(demo_cache):
    from speechlm.demo.assets import build_whisper
    from speechlm.demo.shipped_codec import install_shipped_codec
    from speechlm.evaluation import load_judge, transcribe_batch
    from speechlm.finetune.metrics import word_errors
    from speechlm.speech_io.codec_loading import load_codec

    codec = load_codec(install_shipped_codec(build_whisper(demo_cache), demo_cache))
    text = "The weather is warm today, and the children are playing in the park."
    audio = codec.decode(np.array([codec.speech_decoder.speak(text)]))
    (heard,) = transcribe_batch(load_judge(str(build_whisper(demo_cache))), [audio])
    assert word_errors([text], [heard]).rate <= 0.35, heard


@pytest.mark.parametrize("size", ["nope"])
def test_unknown_corpus_size_is_refused(size):
    from speechlm.demo.corpus import corpus_size

    with pytest.raises(ValueError, match="corpus size 'nope': choose one of \\['ci', 'full', 'full-words'\\]"):
        corpus_size(size)
