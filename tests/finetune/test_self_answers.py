from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from speechlm.cli import main
from speechlm.finetune.examples import ManifestError, read_manifest
from speechlm.finetune.self_answers import (
    AnswerSettings,
    answer_manifest,
    complete_sentences,
    greedy_answers,
    load_backbone,
    prompt_ids,
    turn_end_token_id,
)


@pytest.fixture(scope="module")
def backbone(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval(), AutoTokenizer.from_pretrained(llama_dir)


def write_manifest(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def answers_of(model, tokenizer, prompts, **settings) -> dict[str, tuple[str, bool]]:
    batches = list(greedy_answers(model, tokenizer, prompts, AnswerSettings(**settings)))
    return {prompt: (answer, complete) for batch in batches for prompt, answer, complete in batch}


def test_a_cut_answer_keeps_its_complete_sentences():
    assert complete_sentences("Paris is the capital. It is also a big cit", complete=False) == "Paris is the capital."
    assert complete_sentences(" Paris. ", complete=True) == "Paris."
    assert complete_sentences("no sentence ends here", complete=False) == "no sentence ends here"


def test_answers_in_batches_are_the_answers_one_at_a_time(backbone):
    model, tokenizer = backbone
    prompts = ["abcd", "wxyz", "hello there", "hi"]  # two of one token length, two of others
    together = answers_of(model, tokenizer, prompts, max_new_tokens=6, batch_size=8)
    alone = {p: answers_of(model, tokenizer, [p], max_new_tokens=6)[p] for p in prompts}
    assert together == alone and set(together) == set(prompts)
    batches = list(greedy_answers(model, tokenizer, prompts, AnswerSettings(max_new_tokens=6)))
    assert sorted(len(batch) for batch in batches) == [1, 1, 2]  # one token length a batch
    # the system turn is part of the prompt: "" and the template's default are two prompts
    assert prompt_ids(tokenizer, "hi", "") != prompt_ids(tokenizer, "hi", None)


def test_an_answer_ends_at_any_end_token_and_says_whether_it_did(backbone, monkeypatch):
    model, tokenizer = backbone
    ids = prompt_ids(tokenizer, "abcd", None)
    import torch

    greedy = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    # the generation config's end token (Llama 3's <|eot_id|> beside the tokenizer's <|end_of_text|>) ends it
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, greedy[3]])
    if greedy[3] in greedy[:3]:
        pytest.skip("the tiny model repeats its 4th token earlier")
    answer, complete = answers_of(model, tokenizer, ["abcd"], max_new_tokens=6)["abcd"]
    assert complete and answer == tokenizer.decode(greedy[:3], skip_special_tokens=True).strip()
    answer, complete = answers_of(model, tokenizer, ["abcd"], max_new_tokens=3)["abcd"]
    assert not complete


def test_an_answer_also_ends_where_the_template_ends_a_turn(backbone):
    _, tokenizer = backbone
    assert tokenizer.convert_ids_to_tokens(turn_end_token_id(tokenizer)) == "<|im_end|>"  # ChatML's


def test_paths_keep_the_folder_names_they_were_given(tmp_path):
    from speechlm.finetune.self_answers import _moved

    (tmp_path / "real").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "real")  # a linked folder is not replaced by its target
    row = {"id": "a", "audio": "data/a.wav"}
    assert _moved(row, tmp_path, tmp_path / "out")["audio"] == "../data/a.wav"
    assert _moved(row, tmp_path / "out", tmp_path)["audio"] == "out/data/a.wav"


def test_a_manifest_gets_the_backbones_answers_and_keeps_the_rest(llama_dir, backbone, tmp_path):
    model, tokenizer = backbone
    (tmp_path / "data").mkdir()
    manifest = write_manifest(tmp_path / "data" / "m.jsonl", [
        {"id": "q1", "audio": "wavs/q1.wav", "text": "abcd"},
        {"id": "q2", "audio": "wavs/q2.wav", "text": "hello there", "answer": "labelled"},
        {"id": "c1", "messages": [{"role": "user", "content": [{"type": "audio", "audio": "wavs/c.wav"}]},
                                  {"role": "assistant", "content": "yes"}]},
        {"id": "q3", "audio": "/abs/q3.wav", "text": "abcd", "answer_truncated": True},
        {"id": "c2", "text": "hi", "messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "its own"}]},
    ])
    settings = AnswerSettings(max_new_tokens=4)
    report = answer_manifest(manifest, tmp_path / "out" / "answered.jsonl", llama_dir, settings,
                             progress=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "out" / "answered.jsonl").read_text().splitlines()]
    expected, complete = answers_of(model, tokenizer, ["abcd"], max_new_tokens=4)["abcd"]
    assert [row["id"] for row in rows] == ["q1", "q2", "c1", "q3", "c2"]
    assert "answer" not in rows[4]  # a conversation of its own is learnt as it is
    assert rows[0]["answer"] == expected == rows[3]["answer"] and rows[0].get("answer_truncated") is (
        None if complete else True)
    assert rows[1]["answer"] == "labelled"  # a row's own answer is kept
    assert (report.rows, report.answered, report.kept, report.unanswered) == (5, 2, 1, 2)
    # paths still name the same files from the new folder; absolute ones are left as they are
    assert rows[0]["audio"] == "../data/wavs/q1.wav" and rows[3]["audio"] == "/abs/q3.wav"
    assert rows[2]["messages"][0]["content"][0]["audio"] == "../data/wavs/c.wav"
    assert read_manifest(report.out)[0].audio == str(tmp_path / "data" / "wavs" / "q1.wav")
    assert not (tmp_path / "out" / "answered.jsonl.partial.jsonl").exists()  # done: nothing left to resume

    overwritten = answer_manifest(manifest, tmp_path / "out" / "all.jsonl", llama_dir, settings, overwrite=True,
                                  progress=lambda _: None)
    assert overwritten.answered == 3 and json.loads(
        (tmp_path / "out" / "all.jsonl").read_text().splitlines()[1])["answer"] != "labelled"


def test_an_interrupted_run_resumes_from_the_answers_kept(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"id": "a", "text": "Why?"}, {"id": "b", "text": "How?"}])
    out, backbone = tmp_path / "answered.jsonl", tmp_path / "no-backbone"

    def kept(text, answer, complete, backbone=backbone) -> str:
        key = json.dumps([str(backbone), None, None, 64, text])
        return json.dumps({"key": key, "answer": answer, "complete": complete}) + "\n"

    # both answers kept (one cut at the bound), and a line cut off mid-write: no backbone is needed (none exists)
    partial = tmp_path / "answered.jsonl.partial.jsonl"
    partial.write_text(kept("Why?", "Because.", True) + kept("How?", "Slowly.", False) + '{"key": "[')
    report = answer_manifest(manifest, out, backbone, AnswerSettings(), progress=lambda _: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"id": "a", "text": "Why?", "answer": "Because."},
                    {"id": "b", "text": "How?", "answer": "Slowly.", "answer_truncated": True}]
    assert report.truncated == 1 and not partial.exists()
    # answers another backbone kept are not this one's: it loads (and here, is missing)
    partial.write_text(kept("Why?", "Because.", True, backbone="other") + kept("How?", "Slowly.", False))
    with pytest.raises(OSError):
        answer_manifest(manifest, out, backbone, AnswerSettings(), progress=lambda _: None)
    partial.write_text("not json\n" + kept("How?", "Slowly.", False))
    with pytest.raises(ValueError, match=r"partial.jsonl line 1: not an answer kept by speechlm answer"):
        answer_manifest(manifest, out, backbone, AnswerSettings(), progress=lambda _: None)


def test_bad_manifests_and_settings_are_named_before_the_backbone_loads(tmp_path):
    bad = write_manifest(tmp_path / "bad.jsonl", [{"id": "a", "text": 5}])
    with pytest.raises(ManifestError, match=r"bad.jsonl: 1 problems:\n  - .*bad.jsonl line 1, field 'text'"):
        answer_manifest(bad, tmp_path / "out.jsonl", tmp_path / "no-backbone", AnswerSettings())
    good = write_manifest(tmp_path / "good.jsonl", [{"id": "a", "text": "hi"}])
    with pytest.raises(ValueError, match="the manifest itself"):
        answer_manifest(good, good, tmp_path / "no-backbone", AnswerSettings())
    with pytest.raises(ValueError, match=r"(?s)max_new_tokens=0 .*batch_size=-1"):
        AnswerSettings(max_new_tokens=0, batch_size=-1)
    with pytest.raises(ValueError, match=r"dtype='float33': expected a torch dtype such as float32"):
        load_backbone(tmp_path / "no-backbone", dtype="float33")


def test_the_cli_writes_an_answered_manifest(llama_dir, backbone, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"id": "a", "text": "abcd"}])
    out = tmp_path / "answered.jsonl"
    assert main(["answer", manifest, "--backbone", llama_dir, "--out", str(out), "--max-new-tokens", "3",
                 "--system-prompt", ""]) == 0
    assert "rows answered (1 cut at the token bound), 0 kept their own answer" in capsys.readouterr().out
    expected, _ = answers_of(*backbone, ["abcd"], max_new_tokens=3, system_prompt="")["abcd"]
    assert json.loads(out.read_text()) == {"id": "a", "text": "abcd", "answer": expected, "answer_truncated": True}
    assert main(["answer", manifest, "--backbone", llama_dir, "--out", str(out), "--batch-size", "0"]) == 2
    assert "batch_size=0" in capsys.readouterr().err
