"""The wheel maps adapters/, speech_io/ and finetune/ into the one import package ``speechlm``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w",
                             str(out), str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = out.glob("speechlm-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_contains_the_mapped_packages(wheel):
    names = set(wheel.namelist())
    for module in ("speechlm/__init__.py", "speechlm/cli.py", "speechlm/adapters/modeling.py",
                   "speechlm/adapters/configuration.py", "speechlm/speech_io/units.py",
                   "speechlm/finetune/__init__.py", "speechlm/serving/app.py",
                   "speechlm/serving/chat_page.html",  # the page is package data, and so are
                   "speechlm/demo/data/backbone-texts.json.gz",  # the quick start backbone's texts, its codec
                   "speechlm/demo/data/codec/shipped.json", "speechlm/demo/data/codec/codebook.safetensors",
                   "speechlm/demo/data/codec/vocoder-rvq1/model.safetensors",
                   "speechlm/demo/data/codec/speech-decoder/model.safetensors"):
        assert module in names, module
    assert not any(name.startswith(("adapters/", "speech_io/", "finetune/", "tests/")) for name in names)


def test_wheel_declares_the_console_script(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    assert "speechlm = speechlm.cli:main" in wheel.read(entry_points).decode()
