"""2-process runs on the CPU under each launcher: the world size is asserted (a launch can silently run
single-process: `accelerate launch --cpu` starts one process, the Trainer under torchrun without use_cpu
trains unparallel), ranks must see different data, and the saved model must load."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import speechlm  # noqa: F401
from tests.finetune.conftest import TINY_TRAIN_YAML

WORKER = str(Path(__file__).with_name("train_worker.py"))
DEEPSPEED = Path(__file__).parents[2] / "configs" / "deepspeed"
pytestmark = pytest.mark.multiprocess


def worker(prepared, out, *extra) -> list[str]:
    """The worker and its recipe: 2 steps of 2 samples a rank, logged and saved at step 2."""
    return [WORKER, str(TINY_TRAIN_YAML), f"data.train=[{prepared}]", f"training.output_dir={out}",
            "data.num_samples=16", "training.per_device_train_batch_size=2", "training.max_steps=2",
            "training.save_steps=2", "training.logging_steps=1", *extra]


def launch(launcher: list[str], prepared, out, *extra, env=None) -> None:
    run([sys.executable, "-m", *launcher, *worker(prepared, out, *extra)], env=env)


def run(command: list[str], env=None) -> None:
    result = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def logged_losses(checkpoint: Path) -> list[float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def free_port() -> int:
    """A port for a launch's rendezvous, so that launches of concurrent test runs do not meet at 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def deepspeed_launcher() -> str:
    """The `deepspeed` console script of this interpreter's environment (else the one on PATH)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    launcher = str(launcher) if launcher.is_file() else shutil.which("deepspeed")
    assert launcher, "the deepspeed console script is not installed"
    return launcher


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


def test_the_deepspeed_launcher_with_zero3_and_cpu_offload(prepared, llama_dir, tmp_path):
    pytest.importorskip("deepspeed", reason="pip install speechlm[deepspeed]")
    # The `deepspeed` console script of this interpreter's environment, run by this interpreter: its ranks
    # start with the same one (it launches them with sys.executable) and add --local_rank=N to their arguments.
    launcher = deepspeed_launcher()
    # The shipped config as it is, but for one switch: accelerate swaps the Trainer's AdamW for DeepSpeedCPUAdam,
    # whose kernel compiles on first use (165 s of this test's 336 s on 2 busy cores, TORCH_EXTENSIONS_DIR cold);
    # "zero_force_ds_cpu_optimizer": false keeps torch's AdamW, which then steps the same offloaded fp32
    # partitions. Partitioning, offload, gathering and saving are DeepSpeed's either way.
    config = json.loads((DEEPSPEED / "zero3_offload.json").read_text())
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    (tmp_path / "zero3_offload.json").write_text(json.dumps({**config, "zero_force_ds_cpu_optimizer": False}))
    run([sys.executable, launcher, "--num_gpus", "2", "--master_port", str(free_port()),
         *worker(prepared, tmp_path, f"model.text_model={llama_dir}", "model.text=null", "model.mode=frozen",
                 "data.tasks={asr: 1, tts: 1, text: 1}", f"training.deepspeed={tmp_path / 'zero3_offload.json'}")])
    check_ranks(tmp_path, deepspeed=True)
    saved = load_file(tmp_path / "model.safetensors")
    assert "multi_modal_projector.linear_1.weight" in saved and not any(k.startswith("language_model.") for k in saved)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.mode == "frozen"


def test_two_nodes_of_one_process_train_as_one_node_of_two(prepared, tmp_path):
    # Two torchrun "nodes" on localhost (static rendezvous at 127.0.0.1), one process each, against one node of
    # two processes: the same two ranks, each with the same shard of the data, and gloo reduces their
    # gradients in the same order, so losses and weights agree bit for bit. One thread a process, as torchrun
    # sets for several processes a node but not for one: thread count can change float32 kernels' rounding.
    # (One process with batch 4 would not match to the bit: its loss averages the whole batch's tokens, not
    # two ranks' means, and its batches are length-grouped over all 16 samples instead of each rank's 8.)
    env = {"OMP_NUM_THREADS": "1"}
    one_node, two_nodes = tmp_path / "one-node", tmp_path / "two-nodes"
    launch(["torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_port", str(free_port())],
           prepared, one_node, env=env)
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               *worker(prepared, two_nodes)],
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    for node in nodes:
        output = node.communicate(timeout=400)[0]
        assert node.returncode == 0, output[-4000:]
    check_ranks(two_nodes)
    for rank in range(2):
        assert (json.loads((two_nodes / f"rank-{rank}.json").read_text())["seen"]
                == json.loads((one_node / f"rank-{rank}.json").read_text())["seen"])
    assert len(logged_losses(two_nodes / "checkpoint-2")) == 2
    assert logged_losses(two_nodes / "checkpoint-2") == logged_losses(one_node / "checkpoint-2")
    one, two = load_file(one_node / "model.safetensors"), load_file(two_nodes / "model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)
