"""2-process runs on the CPU under each launcher: the world size is asserted (NOTES.md lists the ways a
launch silently runs single-process), ranks must see different data, and the saved model must load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import speechlm  # noqa: F401
from tests.finetune.conftest import TINY_TRAIN_YAML

WORKER = str(Path(__file__).with_name("train_worker.py"))
DEEPSPEED = Path(__file__).parents[2] / "configs" / "deepspeed"
pytestmark = pytest.mark.multiprocess


def launch(launcher: list[str], prepared, out, *extra, env=None) -> None:
    command = [sys.executable, "-m", *launcher, WORKER, str(TINY_TRAIN_YAML), f"data.train=[{prepared}]",
               f"training.output_dir={out}", "data.num_samples=16", "training.per_device_train_batch_size=2",
               "training.max_steps=2", "training.save_steps=2", "training.logging_steps=1", *extra]
    result = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def check_ranks(out, *, deepspeed: bool = False) -> None:
    ranks = [json.loads((Path(out) / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["trainer_world_size"] for r in ranks] == [2, 2]
    assert all(r["deepspeed"] == deepspeed for r in ranks)
    seen = [set(r["seen"]) for r in ranks]
    # 2 steps x 2 samples on each rank (accelerate's loader fetches one batch ahead, so maybe 2 more)
    assert all(len(r["seen"]) in (4, 6) for r in ranks)
    assert not seen[0] & seen[1]  # different data on each rank


def test_accelerate_launch(prepared, tmp_path):
    launch(["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"], prepared, tmp_path, env={"ACCELERATE_USE_CPU": "true"})
    check_ranks(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.mode == "full"


def test_torchrun_with_lora(prepared, llama_dir, tmp_path):
    launch(["torch.distributed.run", "--nproc_per_node", "2"], prepared, tmp_path, f"model.text_model={llama_dir}",
           "model.text=null", "model.mode=lora", "model.lora.r=4")
    check_ranks(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.mode == "lora" and any("lora_" in key for key in load_file(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed(prepared, llama_dir, tmp_path, zero):
    pytest.importorskip("deepspeed", reason="pip install speechlm[deepspeed]")
    # ZeRO-3 gathers the full state dict on every rank; our save keeps the adapters only. ZeRO reduces
    # gradients in arrival order, so ranks whose batches differ (audio or not) must still give every
    # trainable part a gradient: a mixture with text-only replay checks the model does.
    launch(["torch.distributed.run", "--nproc_per_node", "2"], prepared, tmp_path, f"model.text_model={llama_dir}",
           "model.text=null", "model.mode=frozen", "data.tasks={asr: 1, tts: 1, text: 1}",
           f"training.deepspeed={DEEPSPEED / (zero + '.json')}")
    check_ranks(tmp_path, deepspeed=True)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved and not any(key.startswith("language_model.") for key in saved)
    assert "multi_modal_projector.linear_1.weight" in saved
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.mode == "frozen"
