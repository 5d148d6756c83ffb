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
import visualize
import web_demo
from test_chat import tiny_chat_model  # noqa: F401 (the fixture: chat.py's tiny model)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NEW = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGIT = "What digit is shown?"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_several_images_and_a_later_one_answer_as_chat_py(tiny_chat_model, tmp_path, monkeypatch):
    """The page's conversation (no browser, no Gradio): two images with the first question, one more with the
    second, as chat.py's --image twice and "/image PATH"."""
    from PIL import Image
    model_dir, image, _ = tiny_chat_model
    other = str(tmp_path / "other.png")
    Image.open(image).transpose(0).save(other)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"What is shown?\n/image {image}\nAnd now?\n\n"))
    want = [t["value"] for t in chat.main(["--model", model_dir, "--image", image, "--image", other,
                                           "--max-new-tokens", str(NEW), "--no-stream"])[1::2]]
    engine, conv = web_demo.load_engine(model_dir), web_demo.Conversation()
    pics = [Image.open(p).convert("RGB") for p in (image, other)]
    got = [list(conv.answer(engine, "What is shown?", pics, max_new_tokens=NEW))[-1],
           list(conv.answer(engine, "And now?", pics[:1], max_new_tokens=NEW))[-1]]
    assert got == want and len(conv.pictures) == 3
    assert len(conv.explain(engine)) == len(conv.last[1])   # a panel per token of the last answer
    records = visualize.trace(engine["model"], engine["tokenizer"], *conv.last)
    assert {len(r["heat"]) for r in records} == {3}   # a heatmap per image of the conversation


@pytest.mark.skipif(CHROMIUM is None, reason="apt-get install -y chromium")
def test_browser_chat_visualizer_and_clear(tiny_chat_model, tmp_path, monkeypatch):
    pytest.importorskip("gradio", reason="pip install -r requirements-extras.txt")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-extras.txt")
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
