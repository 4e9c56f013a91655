"""Hub repo ids load from a pre-populated Hugging Face cache with ``HF_HUB_OFFLINE=1``: a SpeechLM built from a
backbone and a codec named by repo ids (model, processor, pipeline, a subfolder), and the codec in the published
SpeechTokenizer repository's layout; a repo the cache lacks is an error that names it and the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

import speechlm  # noqa: F401  (registers the Auto classes and the pipeline)
from speechlm.adapters.building import build_speechlm
from speechlm.adapters.modeling import SpeechLMForCausalLM
from speechlm.cli import main
from speechlm.finetune.prepare import codec_hash
from speechlm.speech_io.codec import SpeechTokenizerCodec
from speechlm.speech_io.processor import SpeechLMProcessor
from tests.conftest import PUBLISHED_CODEC, tiny_spec
from tests.hub_cache import cache_repo, offline_cache

TINY_MODEL_YAML = Path(__file__).parents[1] / "configs" / "tiny" / "model.yaml"
SAMPLE = TINY_MODEL_YAML.with_name("sample.flac")
ABSENT = r"the Hub repo owner/absent \(revision main\) is not in the Hugging Face cache"


@pytest.fixture(scope="module")
def speech_repo(hub_cache, tmp_path_factory) -> Path:
    """`speechlm init` of a LoRA model whose backbone and codec are named by repo ids (read from the cache),
    cached as ``owner/speech-llama``, and under ``v1/`` of ``owner/nested``; returns the directory it wrote."""
    out = tmp_path_factory.mktemp("speech-llama")
    with offline_cache(hub_cache):
        assert main(["init", str(TINY_MODEL_YAML), "--out", str(out), "text_model=owner/tiny-llama", "text=null",
                     f"codec={PUBLISHED_CODEC}", "num_speech_units=64", "mode=lora"]) == 0
    cache_repo(hub_cache, "owner/speech-llama", out)
    nested = tmp_path_factory.mktemp("nested")
    shutil.copytree(out, nested / "v1")
    cache_repo(hub_cache, "owner/nested", nested)
    return out


def test_the_cache_is_what_huggingface_hub_reads(offline_hub, speech_repo):
    report = scan_cache_dir(offline_hub)
    assert not report.warnings
    repos = {repo.repo_id: repo for repo in report.repos}
    assert {"owner/tiny-llama", "fnlp/SpeechTokenizer", "owner/speech-llama", "owner/nested"} <= repos.keys()
    assert all(set(repo.refs) == {"main"} for repo in repos.values())
    published = {file.file_path.relative_to(next(iter(repos["fnlp/SpeechTokenizer"].revisions)).snapshot_path)
                 .as_posix() for file in next(iter(repos["fnlp/SpeechTokenizer"].revisions)).files}
    assert published == {"README.md", ".gitattributes", "speechtokenizer_hubert_avg/config.json",
                         "speechtokenizer_hubert_avg/SpeechTokenizer.pt"}
    weights = try_to_load_from_cache("fnlp/SpeechTokenizer", "speechtokenizer_hubert_avg/SpeechTokenizer.pt")
    assert Path(weights).is_symlink() and Path(weights).resolve().parent.name == "blobs"
    # offline, snapshot_download checks a snapshot against the cached tree listing, which this one passes
    assert Path(snapshot_download("owner/speech-llama")) == Path(try_to_load_from_cache(
        "owner/speech-llama", "config.json")).parent


def test_the_published_speechtokenizer_layout_loads_by_repo_id(offline_hub, published_codec):
    by_path = SpeechTokenizerCodec.from_pretrained(PUBLISHED_CODEC)
    by_subfolder = SpeechTokenizerCodec.from_pretrained("fnlp/SpeechTokenizer", subfolder="speechtokenizer_hubert_avg")
    assert codec_hash(by_path) == codec_hash(by_subfolder) == codec_hash(published_codec)
    with pytest.raises(FileNotFoundError, match="the Hub repo fnlp/SpeechTokenizer has no folder 'nowhere'"):
        SpeechTokenizerCodec.from_pretrained("fnlp/SpeechTokenizer/nowhere")


def test_a_speechlm_repo_id_loads_model_processor_and_pipeline_offline(offline_hub, speech_repo, published_codec):
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        expected = SpeechLMForCausalLM.from_pretrained(speech_repo)(input_ids=ids).logits
        for model in (SpeechLMForCausalLM.from_pretrained("owner/speech-llama"),
                      AutoModelForCausalLM.from_pretrained("owner/speech-llama"),
                      AutoModelForCausalLM.from_pretrained("owner/nested", subfolder="v1"),
                      SpeechLMForCausalLM.from_pretrained("owner/nested/v1")):
            assert model.config.text_model_name_or_path == "owner/tiny-llama"  # the base came from the cache too
            assert offline_hub in model.checkpoint_dir.parents
            assert torch.equal(model(input_ids=ids).logits, expected)
    for processor in (AutoProcessor.from_pretrained("owner/speech-llama"),
                      AutoProcessor.from_pretrained("owner/nested", subfolder="v1")):
        assert codec_hash(processor.codec) == codec_hash(published_codec)  # from the repo's codec/ folder
    reply = pipeline("speechlm", model="owner/speech-llama")(str(SAMPLE), output="speech", max_speech_units=8)
    assert reply["audio"]["sampling_rate"] == 16000 and reply["audio"]["array"].size > 0


@pytest.mark.parametrize("load", [
    SpeechLMForCausalLM.from_pretrained,
    SpeechLMProcessor.from_pretrained,
    lambda name: SpeechTokenizerCodec.from_pretrained(f"{name}/speechtokenizer_hubert_avg"),
    lambda name: build_speechlm(tiny_spec(text_model=name, text=None)),
], ids=["from_pretrained", "processor", "codec", "text_model"])
def test_a_repo_the_cache_lacks_is_named_with_the_cache(offline_hub, load):
    with pytest.raises(FileNotFoundError, match=f"'owner/absent.*: no such local path, and {ABSENT} {offline_hub}"):
        load("owner/absent")


def test_a_revision_the_cache_lacks_and_the_cli_say_so(offline_hub, speech_repo, capsys):
    with pytest.raises(FileNotFoundError, match=r"owner/speech-llama \(revision v2\) is not in the Hugging Face"):
        SpeechLMForCausalLM.from_pretrained("owner/speech-llama", revision="v2")
    # transformers' Auto classes would say only that they could not connect
    assert main(["generate", "--model", "owner/absent", "--text", "hi", "--output", "text"]) == 2
    assert capsys.readouterr().err.startswith("speechlm generate: error: --model 'owner/absent': no such local "
                                              "path, and the Hub repo owner/absent (revision main) is not in")


def test_a_codec_and_a_processor_bring_their_vocoders_from_the_hub(offline_hub, speech_repo, tmp_path):
    from speechlm.speech_io.codec import CodecConfig
    from speechlm.speech_io.vocoder import UnitVocoder, VocoderConfig

    codec = SpeechTokenizerCodec.from_config(CodecConfig(n_filters=8, dimension=32, semantic_dimension=32,
                                                         codebook_size=64, n_q=2, lstm_layers=1), seed=0)
    codec.fill_codebooks(None)
    codec.add_vocoder(UnitVocoder(VocoderConfig(num_layers=1, codebook_size=64, codebook_dimension=32, hidden_size=8,
                                                num_blocks=1), codec.codebook_vectors(1)))
    codec.save_pretrained(tmp_path / "voiced" / "codec")
    cache_repo(offline_hub, "owner/voiced-codec", tmp_path / "voiced")
    loaded = SpeechTokenizerCodec.from_pretrained("owner/voiced-codec/codec")
    assert list(loaded.vocoders) == [1] and loaded.decodes_with(1) == "vocoder"

    model = tmp_path / "model"
    shutil.copytree(speech_repo, model)
    shutil.rmtree(model / "codec")
    shutil.copytree(tmp_path / "voiced" / "codec", model / "codec")
    cache_repo(offline_hub, "owner/voiced-llama", model)
    processor = AutoProcessor.from_pretrained("owner/voiced-llama")
    assert processor.codec.decodes_with(1) == "vocoder"
    assert processor.codec.decode([1, 2, 3]).shape == (3 * 320,)
