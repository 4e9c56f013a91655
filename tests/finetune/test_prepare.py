from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from speechlm.finetune.examples import ManifestError
from speechlm.finetune.prepare import PrepareError, prepare
from speechlm.finetune.prepared import load_prepared, prepared_dataset


class CountingCodec:
    """The demo codec, counting encode calls; raises KeyboardInterrupt (a kill) after ``die_after`` calls."""

    def __init__(self, codec, die_after: int | None = None):
        self.codec, self.die_after, self.calls = codec, die_after, 0

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def encode(self, *args, **kwargs):
        if self.die_after is not None and self.calls >= self.die_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.codec.encode(*args, **kwargs)


def rows(directory) -> list[tuple]:
    return [(row["id"], tuple(row["units"]), row["num_samples"]) for row in prepared_dataset(directory)]


def test_prepare_writes_units_for_every_audio(prepared, prepared_examples, demo_codec):
    report = json.loads((prepared / "report.json").read_text())
    assert report["total"] == report["prepared"] == 12 and report["passed"] and not report["bad"]
    assert [e.id for e in prepared_examples] == [f"utt{i:03d}" for i in range(12)]
    first = prepared_examples[0]
    assert len(first.units) == demo_codec.num_frames(first.num_samples) and first.unit_rate == 50
    assert len(set(first.units)) > 3  # filled codebooks: different sounds get different units
    qa = prepared_examples[2]
    assert qa.answer and qa.answer_units and qa.answer_num_samples and qa.words is None
    assert prepared_examples[0].words[0].text in prepared_examples[0].text


def test_rerun_skips_done_work(prepared, demo_corpus, demo_codec):
    counting = CountingCodec(demo_codec)
    prepare(demo_corpus, counting, prepared, chunk_size=5, progress=False)
    assert counting.calls == 0


def test_killed_run_resumes_without_duplicates_or_losses(demo_corpus, demo_codec, prepared, tmp_path):
    dying = CountingCodec(demo_codec, die_after=2)  # batch 8 > chunk 3: one encode per chunk
    with pytest.raises(KeyboardInterrupt):
        prepare(demo_corpus, dying, tmp_path, chunk_size=3, progress=False)
    assert sorted(p.name for p in (tmp_path / "chunks").glob("*.json")) == ["chunk-00000.json", "chunk-00001.json"]
    # A shard the kill left half-written under its temp name is not a shard.
    (tmp_path / "chunks" / "chunk-00002.parquet.tmp999").write_bytes(b"PAR1 half")
    resumed = CountingCodec(demo_codec)
    prepare(demo_corpus, resumed, tmp_path, chunk_size=3, progress=False)
    assert resumed.calls == 2  # chunks 2 and 3 only
    assert rows(tmp_path) == rows(prepared)
    assert not list((tmp_path / "chunks").glob("*.tmp*"))


@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_point_then_a_rerun_gives_the_uninterrupted_result(seed, demo_corpus, prepared, tmp_path):
    rng = random.Random(seed)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "speechlm.cli", "prepare", str(demo_corpus), "--codec",
               str(demo_corpus.parent / "codec"), "--out", str(out), "--chunk-size", "1"]  # 12 chunks
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    written_before_kill = rng.randrange(2, 11)  # chunk files on disk, then a random part of one chunk's time
    deadline = time.monotonic() + 300
    first_chunk_at = None
    while process.poll() is None and time.monotonic() < deadline:
        written = len(list((out / "chunks").glob("*.json")))
        if written and first_chunk_at is None:
            first_chunk_at = time.monotonic()
        if written >= written_before_kill:
            break
        time.sleep(0.005)
    assert written >= written_before_kill, f"prepare ended or stalled with {written} chunks written"
    # A fixed pause could outlast every remaining chunk on a fast machine; a fraction of the pace cannot.
    seconds_per_chunk = (time.monotonic() - first_chunk_at) / (written - 1)
    time.sleep(rng.uniform(0.0, 1.0) * seconds_per_chunk)
    assert process.poll() is None, "prepare ended before the kill: the kill point proves nothing"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (out / "report.json").exists()  # the run was cut before it finished
    subprocess.run(command, check=True, capture_output=True)
    assert rows(out) == rows(prepared)
    assert not list((out / "chunks").glob("*.tmp*"))


def test_bad_files_are_skipped_and_reported(demo_corpus, demo_codec, tmp_path):
    lines = demo_corpus.read_text().splitlines()[:6]
    shutil.copytree(demo_corpus.parent / "wavs", tmp_path / "wavs")
    (tmp_path / "wavs" / "empty.wav").write_bytes(b"")
    cut = (tmp_path / "wavs" / "utt000.wav").read_bytes()
    (tmp_path / "wavs" / "cut.wav").write_bytes(cut[: len(cut) // 2])
    lines += [json.dumps({"id": "gone", "audio": "wavs/missing.wav", "text": "x"}),
              json.dumps({"id": "empty", "audio": "wavs/empty.wav", "text": "x"}),
              json.dumps({"id": "cut", "audio": "wavs/cut.wav", "text": "x"})]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")

    with pytest.raises(PrepareError, match=r"3 of 9 examples are bad \(33.3% > max_bad_fraction=5.0%\)"):
        prepare(manifest, demo_codec, tmp_path / "strict", progress=False)
    report = json.loads((tmp_path / "strict" / "report.json").read_text())
    reasons = {item["id"]: item["reason"] for item in report["bad"]}
    assert set(reasons) == {"gone", "empty", "cut"} and not report["passed"]
    assert "audio file not found" in reasons["gone"] and "empty" in reasons["empty"]
    assert "truncated wav" in reasons["cut"] and f"{manifest} line 9" in reasons["cut"]

    report = prepare(manifest, demo_codec, tmp_path / "lenient", max_bad_fraction=0.5, progress=False)
    assert report.prepared == 6 and len(report.bad) == 3
    assert [e.id for e in load_prepared(tmp_path / "lenient")] == [f"utt{i:03d}" for i in range(6)]


def test_an_output_dir_belongs_to_one_source(prepared, demo_codec, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "x", "text": "just text"}) + "\n")
    with pytest.raises(PrepareError, match="was prepared with other source_hash"):
        prepare(other, demo_codec, prepared, chunk_size=5, progress=False)


def test_a_truncated_answer_survives_preparation(demo_corpus, demo_codec, tmp_path):
    rows = [json.loads(line) for line in demo_corpus.read_text().splitlines()][:3]
    rows[2] = {**rows[2], "answer": "It is a long", "answer_truncated": True}
    manifest = tmp_path / "m.jsonl"
    for row in rows:  # paths from the new manifest's folder
        row.update({name: str(demo_corpus.parent / row[name]) for name in ("audio", "answer_audio") if name in row})
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prepare(manifest, demo_codec, tmp_path / "out", chunk_size=5, progress=False)
    assert [e.answer_truncated for e in load_prepared(tmp_path / "out")] == [False, False, True]


def test_a_folder_in_an_older_format_is_named_not_misread(prepared, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    record = json.loads((old / "prepare.json").read_text())
    (old / "prepare.json").write_text(json.dumps({**record, "format": 1}))
    with pytest.raises(ManifestError, match=rf"{old}: prepared in format 1, this speechlm reads format 2"):
        load_prepared(old)


def test_all_layers(demo_corpus, demo_codec, tmp_path):
    prepare(demo_corpus, demo_codec, tmp_path, layers="all", progress=False)
    example = load_prepared(tmp_path)[0]
    assert len(example.units_all) == demo_codec.n_q and example.units_all[0] == example.units


@pytest.mark.multiprocess
def test_prepare_under_accelerate_launch_shards_by_rank(demo_corpus, prepared, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(Path(__file__).with_name("prepare_worker.py")), str(demo_corpus),
               str(demo_corpus.parent / "codec"), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["chunks"] == [0, 2] and ranks[1]["chunks"] == [1]
    # The union is complete, in order, without duplicates. (Units themselves may differ in a few frames:
    # launchers run ranks with one thread each, and another summation order can flip a nearest code.)
    assert [(i, len(u), n) for i, u, n in rows(tmp_path / "out")] == [(i, len(u), n) for i, u, n in rows(prepared)]


def test_cli_prepare(prepared, demo_corpus, tmp_path, capsys):
    from speechlm.cli import main

    codec = str(demo_corpus.parent / "codec")
    assert main(["prepare", str(demo_corpus), "--codec", codec, "--out", str(prepared), "--chunk-size", "5"]) == 0
    assert "12 of 12 examples prepared" in capsys.readouterr().out
    assert main(["prepare", str(tmp_path / "none.jsonl"), "--codec", codec, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"speechlm prepare: error: {tmp_path / 'none.jsonl'}: no such manifest "
                                               f"file or dataset directory")


def test_prepare_and_processor_with_a_whisper_units_codec(demo_corpus, tmp_path):
    from speechlm.adapters.building import build_whisper_unit_codec
    from speechlm.adapters.tiny import build_byte_tokenizer
    from speechlm.finetune.vocoder_training import manifest_clips
    from speechlm.speech_io.audio import load_audio
    from speechlm.speech_io.processor import SpeechLMProcessor
    from speechlm.speech_io.units import expand_tokenizer
    from speechlm.speech_io.whisper_units import WhisperUnitCodec
    from tests.conftest import save_tiny_whisper

    clips = [load_audio(clip) for clip in manifest_clips([demo_corpus], 4)]
    codec = build_whisper_unit_codec(save_tiny_whisper(tmp_path / "tiny.pt"), clips, encoder_blocks=1,
                                     codebook_size=32)
    codec.save_pretrained(tmp_path / "units")
    prepare(demo_corpus, tmp_path / "units", tmp_path / "prepared", progress=False)
    example = load_prepared(tmp_path / "prepared")[0]
    audio = demo_corpus.parent / json.loads(demo_corpus.read_text().splitlines()[0])["audio"]
    assert example.units == codec.encode([load_audio(audio)])[0][0].tolist()
    # A processor saved with the codec beside it loads it back as the same kind, with the same units.
    tokenizer = build_byte_tokenizer()
    expand_tokenizer(tokenizer, 32)
    processor = SpeechLMProcessor(tokenizer, num_speech_units=32, codec=codec)
    processor.save_pretrained(tmp_path / "model")
    loaded = SpeechLMProcessor.from_pretrained(tmp_path / "model")
    assert isinstance(loaded.codec, WhisperUnitCodec)
    assert np.array_equal(loaded.codec.encode(clips[:1])[0], codec.encode(clips[:1])[0])
