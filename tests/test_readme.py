"""The README's examples run as written, in a fresh folder, against the tiny default.

Left out, each for its reason: `make` lines and `pip install` lines (what CI itself runs), the
`speechlm init` line that names a gated Hub model and a local Whisper checkpoint, the `speechlm answer` line
that names the quick start's cached SmolLM2 (`make demo` builds it; `tests/finetune/test_self_answers.py`
runs the command on a tiny backbone), and the cluster launches (they need several machines;
`tests/finetune/test_launchers.py` runs two nodes on one). `speechlm serve` runs
until stopped, so it is started in the background on a free port, which the examples' address
(127.0.0.1:8000) is pointed at; it stops when the test ends.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NEEDS_THE_HUB = "meta-llama/"
NEEDS_THE_DEMO_CACHE = "~/.cache/speechlm/demo/"
NEEDS_A_CLUSTER = ("--nnodes", "--num_machines", "--hostfile")
SERVES = "speechlm serve "
README_ADDRESS = "127.0.0.1:8000"


def readme_blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def shell_commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def runnable(command: str) -> bool:
    return (not command.startswith(("make ", "pip ")) and NEEDS_THE_HUB not in command
            and NEEDS_THE_DEMO_CACHE not in command
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(command: str, cwd: Path, port: int) -> subprocess.Popen:
    """``speechlm serve ...`` on ``port``, once it answers."""
    log = open(cwd / f"serve-{port}.log", "w")  # the server writes to it until it stops
    server = subprocess.Popen([sys.executable, "-m", "speechlm.cli", *shlex.split(command)[1:], "--port", str(port)],
                              cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            assert server.poll() is None, f"README: {command} exited:\n{(cwd / log.name).read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"README: {command} did not start within 120 s"
            time.sleep(0.2)


def test_every_readme_example_runs_as_written(workdir):
    ran, servers = [], []
    address = f"127.0.0.1:{free_port()}"
    try:
        for language, block in readme_blocks():
            if language == "bash":
                for command in filter(runnable, shell_commands(block)):
                    command = command.replace(README_ADDRESS, address)
                    if command.startswith(SERVES):
                        assert not servers, "the README starts one server; the test points every example at it"
                        servers.append(start_server(command, workdir, int(address.split(":")[1])))
                    else:
                        result = run(shlex.split(command), workdir)
                        assert result.returncode == 0, f"README: {command}\n{result.stderr[-2000:]}"
                        if command.startswith("curl "):
                            assert json.loads(result.stdout)["object"] == "chat.completion", result.stdout
                    ran.append(command)
        python = "\n".join(block for language, block in readme_blocks() if language == "python")
        result = run(["python", "-c", python.replace(README_ADDRESS, address)], workdir)
        assert result.returncode == 0, f"README's Python examples:\n{result.stderr[-2000:]}"
    finally:
        for server in servers:
            server.terminate()
            server.wait(30)
    assert any(command.startswith("speechlm init configs/tiny/model.yaml --out out/tiny") for command in ran)
    assert any(command.startswith("speechlm train") for command in ran)
    assert any(command.startswith(SERVES) for command in ran) and any(command.startswith("curl ") for command in ran)
    assert (workdir / "out" / "asr.json").is_file()
    assert (workdir / "answer.wav").is_file()
