from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf

from speechlm.finetune.examples import ManifestError, read_jsonl, read_manifest
from speechlm.finetune.sources import load_examples


def write_manifest(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def test_manifest_rows_resolve_paths_relative_to_the_manifest(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = write_manifest(tmp_path / "sub" / "m.jsonl", [
        {"id": "a", "audio": "wavs/a.wav", "text": "hi there", "words": [{"text": "hi", "start": 0, "end": 0.2},
                                                                         {"word": "there", "start": 0.3, "end": 0.6}]},
        {"id": 7, "text": "text only"},
        {"id": "c", "messages": [{"role": "user", "content": [{"type": "audio", "audio": "q.wav"}]},
                                 {"role": "assistant", "content": "yes"}]},
    ])
    a, b, c = read_manifest(manifest)
    assert a.audio == str(tmp_path / "sub" / "wavs" / "a.wav")
    assert [w.text for w in a.words] == ["hi", "there"] and a.words[1].end == 0.6
    assert b.id == "7" and b.audio is None
    assert c.messages[0]["content"][0]["audio"] == str(tmp_path / "sub" / "q.wav")


def test_bad_rows_are_reported_together_with_file_line_and_field(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"id": "ok", "audio": "a.wav", "text": "fine"},
        "{not json",
        {"id": "", "text": "no id"},
        {"id": "t", "text": 5, "task": "dance"},
        {"id": "w", "audio": "a.wav", "words": [{"text": "x", "start": 0.5, "end": 0.1}]},
        {"id": "ok", "text": "again"},
        {"id": "m", "messages": [{"role": "user", "content": "hi"}]},
    ])
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    message = str(info.value)
    assert f"{manifest}: 7 problems" in message
    assert f"{manifest} line 2: not valid JSON" in message
    assert f"{manifest} line 3, field 'id': expected a non-empty string" in message
    assert f"{manifest} line 4, field 'text': expected a string, got int" in message
    assert f"{manifest} line 4, field 'task': 'dance' is not a task; choose one of ['asr'" in message
    assert f"{manifest} line 5, field 'words': item 0: start=0.5 end=0.1" in message
    assert f"{manifest} line 6, field 'id': 'ok' repeats line 1" in message
    assert f"{manifest} line 7, field 'messages': has no assistant message" in message


def test_a_truncated_answer_is_a_flag_on_the_row_or_on_an_assistant_message(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"id": "a", "audio": "a.wav", "answer": "It is a long", "answer_truncated": True},
        {"id": "b", "audio": "a.wav", "answer": "Yes."},
        {"id": "c", "messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "Hello, I", "truncated": True}]},
    ])
    a, b, c = read_manifest(manifest)
    assert a.answer_truncated and not b.answer_truncated
    assert c.messages[1]["truncated"] is True and "truncated" not in c.messages[0]
    bad = write_manifest(tmp_path / "bad.jsonl", [
        {"id": "a", "audio": "a.wav", "answer": "x", "answer_truncated": "yes"},
        {"id": "b", "messages": [{"role": "user", "content": "hi", "truncated": True},
                                 {"role": "assistant", "content": "x"}]},
    ])
    with pytest.raises(ManifestError) as info:
        read_manifest(bad)
    assert "line 1, field 'answer_truncated': expected true or false, got 'yes'" in str(info.value)
    assert "line 2, field 'messages': message 0: 'truncated' is true or false, on an assistant message" in str(info.value)


def test_an_unknown_field_names_the_closest_known_one_unless_extras_are_allowed(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"id": "a", "audio": "a.wav", "text": "fine"},
        {"id": "b", "audio": "b.wav", "txt": "a typo"},
        {"id": "c", "text": "ok", "speaker": "lessac"},
    ])
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    message = str(info.value)
    assert f"{manifest}: 2 problems" in message
    assert f"{manifest} line 2, field 'txt': not a manifest field (did you mean 'text'?)" in message
    assert f"{manifest} line 3, field 'speaker': not a manifest field;" in message and "--allow-extra-fields" in message
    examples = read_manifest(manifest, allow_extra_fields=True)
    assert [e.id for e in examples] == ["a", "b", "c"] and examples[1].text is None


def test_missing_and_empty_manifests(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest file"):
        read_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="holds no examples"):
        read_manifest(tmp_path / "empty.jsonl")


def wav_bytes(seconds=0.5) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(16000 * seconds), np.float32), 16000, format="WAV")
    return buffer.getvalue()


def test_saved_dataset_with_an_audio_column(tmp_path):
    import datasets

    dataset = datasets.Dataset.from_dict({"id": ["a", "b"], "text": ["one", "two"],
                                          "audio": [{"bytes": wav_bytes(), "path": "a.wav"},
                                                    {"bytes": wav_bytes(0.3), "path": "b.wav"}]})
    dataset.cast_column("audio", datasets.Audio()).save_to_disk(str(tmp_path / "saved"))
    examples = load_examples(tmp_path / "saved")
    assert [e.id for e in examples] == ["a", "b"] and examples[1].audio["bytes"] == wav_bytes(0.3)
    from speechlm.speech_io.audio import load_audio

    assert load_audio(examples[1].audio).shape == (4800,)


def test_json_dataset_object(tmp_path):
    import datasets

    manifest = write_manifest(tmp_path / "m.jsonl", [{"id": "a", "text": "hello world"}, {"text": "no id"}])
    examples = load_examples(datasets.load_dataset("json", data_files=manifest, split="train"))
    assert [e.id for e in examples] == ["a", "1"]


def test_read_jsonl_names_every_line_that_is_not_json(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": \nnot json\n')
    with pytest.raises(ManifestError, match=r"(?s)2 problems.*rows.jsonl line 3: not valid JSON.*line 4"):
        read_jsonl(path)
    path.write_text('{"id": "a"}\n\n{"id": "b"}\n')
    assert read_jsonl(path) == [{"id": "a"}, {"id": "b"}]


def test_audiofolder_with_jsonl_or_csv_metadata(tmp_path):
    from speechlm.speech_io.audio import load_audio

    top = tmp_path / "top"
    (top / "clips").mkdir(parents=True)
    (top / "clips" / "a.wav").write_bytes(wav_bytes(0.3))
    write_manifest(top / "metadata.jsonl", [{"file_name": "clips/a.wav", "text": "one"}])
    (example,) = load_examples(top)
    assert (example.id, example.text, example.audio) == ("0", "one", str(top / "clips" / "a.wav"))
    assert load_audio(example.audio).shape == (4800,)

    split = tmp_path / "split"
    (split / "train").mkdir(parents=True)
    (split / "train" / "b.wav").write_bytes(wav_bytes())
    (split / "train" / "metadata.csv").write_text('file_name,text,answer\nb.wav,"two, three",\n')
    (example,) = load_examples(split)
    assert (example.text, example.answer, example.audio) == ("two, three", None, str(split / "train" / "b.wav"))


def test_a_folder_that_is_no_dataset_or_has_rows_without_audio_is_named(tmp_path):
    with pytest.raises(ManifestError, match=r"not a manifest, saved dataset or audiofolder .*metadata.jsonl"):
        load_examples(tmp_path)
    write_manifest(tmp_path / "metadata.jsonl", [{"file_name": "a.wav", "text": "one"}, {"text": "two"}])
    with pytest.raises(ManifestError, match=r"metadata.jsonl row 2: no 'file_name'"):
        load_examples(tmp_path)
