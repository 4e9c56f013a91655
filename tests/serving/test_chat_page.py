"""The voice chat page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
upload a wav and record from the (fake) microphone, get answers as text and as speech, keep the turns.

Set SPEECHLM_CHAT_SCREENSHOT=docs/chat-page.png to refresh the README's screenshot from this run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from speechlm.responding import respond
from speechlm.serving import ServeSettings, start_server
from tests.inference.conftest import SAMPLE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver; .ci/run installs them)")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def page_url(speaking):
    model, processor = speaking
    settings = ServeSettings(port=0, chat_page=True, default_max_tokens=16, max_speech_units=60)
    running = start_server(model, processor, settings, model_name="tiny-speaker")
    yield running.url + "/"
    running.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,900",
                 "--autoplay-policy=no-user-gesture-required",
                 # a fake microphone that beeps, granted without asking
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def answer(browser, form: str, text: str = "") -> tuple[str, object]:
    """Send what is ready with the answer ``form``; the finished assistant turn's text and element."""
    done = len(browser.find_elements(By.CSS_SELECTOR, ".turn.assistant[data-done=true]"))
    if text:
        browser.find_element(By.ID, "text").send_keys(text)
    browser.find_element(By.CSS_SELECTOR, f"input[name=form][value={form}]").click()
    browser.find_element(By.ID, "send").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".turn.assistant[data-done=true]")) > done)
    turn = browser.find_elements(By.CSS_SELECTOR, ".turn.assistant")[-1]
    assert "error" not in turn.get_attribute("class"), turn.text
    # textContent, as the model wrote it (WebDriver's .text folds whitespace; a random model writes odd bytes)
    return browser.execute_script("return arguments[0].textContent", turn.find_element(By.CSS_SELECTOR, ".text")), turn


def audio_duration(browser, turn) -> float:
    """Seconds of the turn's <audio>, once Chromium has loaded its source (NaN if it cannot play it)."""
    return browser.execute_async_script("""
        const [audio, done] = arguments;
        if (audio.readyState >= 1) return done(audio.duration);
        audio.onloadedmetadata = () => done(audio.duration);
        audio.onerror = () => done(NaN);
        audio.load();""", turn.find_element(By.TAG_NAME, "audio"))


def test_upload_record_and_answers_in_text_and_speech(page_url, browser, speaking, tmp_path):
    model, processor = speaking
    question = tmp_path / "question.wav"
    array, rate = sf.read(SAMPLE, dtype="float32")
    sf.write(question, array, rate, subtype="PCM_16")
    browser.get(page_url)
    assert browser.find_element(By.ID, "model").text == "tiny-speaker"

    browser.find_element(By.ID, "file").send_keys(str(question))
    WebDriverWait(browser, 30).until(lambda b: "ready to send" in b.find_element(By.ID, "status").text)
    text, _ = answer(browser, "text", "What did you hear?")
    # The page sends the clip as 16 kHz 16-bit wav; this one already is, so the model hears the same samples.
    expected = respond(model, processor, [{"role": "user", "content": [
        {"type": "audio", "audio": str(question)}, {"type": "text", "text": "What did you hear?"}]}],
        max_new_tokens=16).text
    assert text == expected and text

    browser.find_element(By.ID, "record").click()  # the fake microphone beeps for a second
    WebDriverWait(browser, 10).until(lambda b: "Recording" in b.find_element(By.ID, "status").text)
    browser.execute_script("return new Promise((resolve) => setTimeout(resolve, 1000))")
    browser.find_element(By.ID, "record").click()
    WebDriverWait(browser, 30).until(lambda b: "ready to send" in b.find_element(By.ID, "status").text)
    _, turn = answer(browser, "both")
    assert audio_duration(browser, turn) > 0.1  # a playable source: Chromium decoded its length
    assert turn.find_element(By.TAG_NAME, "audio").get_attribute("src").startswith("blob:")

    assert browser.execute_script("return messages.map((m) => m.role)") == ["user", "assistant"] * 2
    assert len(browser.find_elements(By.CSS_SELECTOR, ".turn")) == 4
    shot = Path(os.environ.get("SPEECHLM_CHAT_SCREENSHOT") or tmp_path / "chat-page.png")
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:4] == b"\x89PNG"
