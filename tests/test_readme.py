"""The README's examples run as written, in a fresh folder, against the tiny default.

Left out, each for its reason: `make` lines and `pip install` lines (what CI itself runs), the
`speechlm init` line that names a gated Hub model and a local Whisper checkpoint, and the cluster launches
(they need several machines; `tests/finetune/test_launchers.py` runs two nodes on one).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NEEDS_THE_HUB = "meta-llama/"
NEEDS_A_CLUSTER = ("--nnodes", "--num_machines", "--hostfile")


def readme_blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def shell_commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def runnable(command: str) -> bool:
    return (not command.startswith(("make ", "pip ")) and NEEDS_THE_HUB not in command
            and not any(flag in command.split() for flag in NEEDS_A_CLUSTER))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A fresh folder holding what a clone has beside the code: the configs."""
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "configs", folder / "configs")
    return folder


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # `speechlm` is the console script; run it with this interpreter so the test needs no PATH
    if command[0] == "speechlm":
        command = [sys.executable, "-m", "speechlm.cli", *command[1:]]
    elif command[0] == "python":
        command = [sys.executable, *command[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_the_readme_has_the_examples_this_test_runs():
    languages = [language for language, _ in readme_blocks()]
    assert languages.count("python") >= 2 and languages.count("bash") >= 4


def test_every_readme_example_runs_as_written(workdir):
    ran = []
    for language, block in readme_blocks():
        if language == "bash":
            for command in filter(runnable, shell_commands(block)):
                result = run(command.split(), workdir)
                assert result.returncode == 0, f"README: {command}\n{result.stderr[-2000:]}"
                ran.append(command)
    python = "\n".join(block for language, block in readme_blocks() if language == "python")
    result = run(["python", "-c", python], workdir)
    assert result.returncode == 0, f"README's Python examples:\n{result.stderr[-2000:]}"
    assert any(command.startswith("speechlm init configs/tiny/model.yaml --out out/tiny") for command in ran)
    assert any(command.startswith("speechlm train") for command in ran)
    assert (workdir / "out" / "asr.json").is_file()
