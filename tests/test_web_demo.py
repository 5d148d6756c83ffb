"""web_demo.py in a real browser (issue 27): the page on 127.0.0.1, driven by headless Chromium (Debian's package,
through Playwright): upload an image, ask, read the streamed answer off the page (chat.py's answer), ask again over
the conversation, draw the visualizer, take a screenshot, clear. Needs requirements-extras.txt and `chromium`
(.ci/run installs both); skipped, saying so, where they are missing."""
import io
import os
import shutil
import socket

import pytest

import chat
import web_demo
from test_chat import tiny_chat_model  # noqa: F401 (the fixture: chat.py's tiny model)

pytest.importorskip("gradio", reason="pip install -r requirements-extras.txt")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-extras.txt")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NEW = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGIT = "What digit is shown?"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="apt-get install -y chromium")
def test_browser_chat_visualizer_and_clear(tiny_chat_model, tmp_path, monkeypatch):
    model_dir, _, _ = tiny_chat_model
    image = os.path.join(ROOT, "demo", "images", "00002.png")   # a demo digit, the demo's digit question
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{DIGIT}\nIs the digit even?\n\n"))
    want = [t["value"] for t in chat.main(["--model", model_dir, "--image", image, "--max-new-tokens", str(NEW),
                                           "--no-stream"])[1::2]]   # chat.py's two answers
    page = web_demo.build_page(web_demo.load_engine(model_dir), max_new_tokens=NEW)
    port = free_port()
    page.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                tab = browser.new_page(viewport={"width": 1100, "height": 1000})
                tab.goto(f"http://127.0.0.1:{port}")
                assert model_dir in tab.inner_text("#model-name")   # which model answers
                bot = tab.locator("#chatbot .bot-row .message-content")

                def ask(question, answers, files=()):
                    tab.wait_for_selector("#question textarea:not([disabled])")
                    if files:
                        tab.set_input_files("#question input[type=file]", list(files))
                        tab.wait_for_selector("#question img, #question .thumbnail-item", timeout=30000)
                    tab.fill("#question textarea", question)
                    tab.press("#question textarea", "Enter")
                    sync_api.expect(bot).to_have_count(answers, timeout=60000)
                    tab.wait_for_selector("#question textarea:not([disabled])", timeout=60000)
                    return bot.last.inner_text().strip()
                assert ask(DIGIT, 1, [image]) == want[0]
                assert ask("Is the digit even?", 2) == want[1]   # asked over the whole conversation, as chat.py
                tab.click("#look")
                sync_api.expect(tab.locator("#visualizer img")).to_have_count(NEW, timeout=60000)
                tab.screenshot(path=str(tmp_path / "page.png"), full_page=True)
                tab.click("#clear")
                sync_api.expect(bot).to_have_count(0, timeout=30000)
            finally:
                browser.close()
    finally:
        page.close()
    assert os.path.getsize(tmp_path / "page.png") > 10000
