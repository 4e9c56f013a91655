"""``speechlm serve`` / ``chat-ui`` as the console script parses them (the server itself: test_api.py; the
command run for real: tests/test_readme.py)."""

from __future__ import annotations

import pytest

from speechlm.cli import main
from speechlm.serving import server


@pytest.fixture
def served(monkeypatch) -> list[dict]:
    """What `serve` would have served, instead of serving it."""
    calls = []
    monkeypatch.setattr(server, "serve", lambda model, settings, **kwargs: calls.append(
        {"model": model, "settings": settings, **kwargs}))
    return calls


def test_serve_maps_its_options_and_reads_the_key_from_the_environment(served, monkeypatch, capsys):
    monkeypatch.setenv("SPEECHLM_API_KEY", "sk-from-env")
    assert main(["serve", "out/model", "--port", "9001", "--max-batch-size", "4", "--max-waiting", "2"]) == 0
    (call,) = served
    settings = call["settings"]
    assert call["model"] == "out/model" and settings.host == "127.0.0.1" and settings.port == 9001
    assert (settings.api_key, settings.max_batch_size, settings.max_waiting) == ("sk-from-env", 4, 2)
    assert not settings.chat_page and call["device"] is None
    assert "serving out/model (OpenAI-compatible API) at http://127.0.0.1:9001/v1 (API key required)" in \
        capsys.readouterr().err


def test_chat_ui_serves_the_page_and_a_given_key_wins(served, monkeypatch):
    monkeypatch.setenv("SPEECHLM_API_KEY", "sk-from-env")
    assert main(["chat-ui", "out/model", "--api-key", "sk-given"]) == 0
    assert served[0]["settings"].chat_page and served[0]["settings"].api_key == "sk-given"


@pytest.mark.parametrize("args, message", [
    (["--max-batch-size", "0"], "max_batch_size=0: expected an integer >= 1"),
    (["--host", "example.com"], "host='example.com': not an IP address"),
    (["--api-key", " "], "api_key is empty"),
])
def test_bad_settings_exit_2_naming_the_field(served, capsys, args, message):
    assert main(["serve", "out/model", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("speechlm serve: error: invalid serve settings:") and message in err and not served
