"""The dashboard in a real browser: ``streamlit run`` on a free loopback port, Debian's chromium driven by
Playwright (no browser download: ``scripts/install_chromium.sh``, run by ``make tools``), against the
real trainer and inference services with two adapters trained by real jobs. Issue #5, tests item 2.

The test goes through every page, streams a chat reply from an adapter (and checks it is the service's
answer, seen growing in the page) and saves a screenshot of each page under ``screenshots/dashboard/``
(git-ignored; ``LORAFLEET_SCREENSHOTS`` overrides the folder). ``docs/dashboard.png`` is a copy of
the job-detail screenshot, ``docs/dashboard-chat.png`` of the chat one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from dashboard_utils import ROOT, SlowStreamProxy, Stack, StreamlitProcess, running_stack
from inference_service_utils import collect, greedy

from lorafleet.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("LORAFLEET_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("LORAFLEET_SCREENSHOTS", str(ROOT / "screenshots" / "dashboard")))
# shared/STACK.md, "Streamlit, for real": what Debian's chromium needs in a container, offline.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
# Questions to chat with; the test asks the first one an adapter answers at some length (a tiny adapter
# may answer with a word or a bare EOS, and a reply of one chunk cannot be seen streaming).
QUESTIONS = (
    "这是什么",
    "你好，请介绍一下你自己。",
    "What is this?",
    "判断临床试验筛选标准的类型：\n年龄≥18周岁\n答：",
)
MAX_NEW_TOKENS = 48
# The dashboard reaches the inference service over a slow link (tests/dashboard_utils.SlowStreamProxy):
# the tiny model decodes a reply in about 0.1 s, too fast for the page to be seen mid-stream otherwise.
STREAM_DELAY_S = 0.03
TIMEOUT_MS = 60_000

# Records every text the last chat message showed, as the page updates it (a MutationObserver), so the
# test can see the reply growing rather than only its final text.
RECORD_ASSISTANT = """() => {
  window.__seen = [];
  const last = () => {
    const msgs = document.querySelectorAll('[data-testid="stChatMessage"]');
    return msgs.length >= 2 ? msgs[msgs.length - 1] : null;
  };
  new MutationObserver(() => {
    const m = last();
    if (!m) return;
    const body = m.querySelector('[data-testid="stChatMessageContent"]') || m;
    const text = (body.querySelector('[data-testid="stMarkdownContainer"]') || body).innerText.trim();
    if (text && window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def stack(tiny_llama, bundled_data, tmp_path_factory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("dash-web"), tiny_llama, bundled_data) as s:
        # Two adapters from two real jobs running side by side (the trainer runs two at once).
        # The first also evaluates as it goes and scores generations: every chart and metric has data.
        s.submit(
            "web-lora",
            max_steps=40,
            logging_steps=2,
            eval_steps=10,
            lr_scheduler="cosine",
            warmup_ratio=0.1,
            predict_with_generate=True,
            max_eval_samples=16,
        )
        s.submit("web-lora-b", max_steps=40, logging_steps=2, learning_rate=3e-2)
        s.train("web-lora")
        s.train("web-lora-b")
        yield s


@pytest.fixture(scope="module")
def app(stack: Stack, tmp_path_factory) -> Iterator[StreamlitProcess]:
    log = tmp_path_factory.mktemp("dash-web-app") / "streamlit.log"
    with SlowStreamProxy(stack.inference_addr, STREAM_DELAY_S) as link:
        proc = StreamlitProcess(stack.env(LORAFLEET_INFERENCE_ADDR=link.address), log).start()
        try:
            yield proc
        finally:
            proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: run `make tools` (scripts/install_chromium.sh)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _reference(stack: Stack, adapter: str, question: str, n: int) -> str:
    """The service's own greedy answer, straight from it."""
    channel = grpc.insecure_channel(stack.inference_addr)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = inference_pb2.ChatRequest(
        adapter=adapter,
        messages=[inference_pb2.ChatMessage(role="user", content=question)],
        sampling=greedy(n, top_p=1.0, top_k=0, repetition_penalty=1.0),
    )
    text, _, _ = collect(stub.ChatStream(request, timeout=60))
    channel.close()
    return text


def _norm(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _goto(page: Any, title: str) -> None:
    """Open a page from the sidebar navigation, as a user does."""
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=title).click()
    page.get_by_role("heading", name=title, exact=True).wait_for(timeout=TIMEOUT_MS)


def _idle(page: Any) -> None:
    """Wait until the app has finished its current run (the status widget stops showing "Running")."""
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TIMEOUT_MS
    )


def _select(page: Any, label: str, option: str, scope: Any = None) -> None:
    """Pick ``option`` in the Streamlit selectbox labelled ``label``."""
    root = scope or page
    box = root.get_by_test_id("stSelectbox").filter(has=page.get_by_text(label, exact=True))
    box.locator("[role=combobox], input").first.click()
    page.get_by_role("option", name=option, exact=True).click()
    _idle(page)


def _shot(page: Any, name: str, whole: bool = True) -> Path:
    """Save ``<SHOTS>/<name>.png``: the whole page when ``whole`` (Streamlit scrolls inside its main
    block, so the window is made as tall as the content for the shot), else the 1440x900 window."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    size = page.viewport_size
    page.evaluate("() => document.activeElement && document.activeElement.blur()")  # no focus ring
    if whole:
        height = page.evaluate(
            "() => (document.querySelector('main.stMain') || document.documentElement).scrollHeight"
        )
        page.set_viewport_size({"width": size["width"], "height": max(size["height"], int(height))})
        page.wait_for_timeout(500)  # charts re-fit to the new size
    page.screenshot(path=str(path))
    page.set_viewport_size(size)
    assert path.stat().st_size > 10_000, f"{path} looks empty"
    return path


def test_browser_walks_every_page_and_streams_a_chat_reply(
    stack: Stack, app: StreamlitProcess, browser: Any
) -> None:
    answers = {
        (adapter, q): _reference(stack, adapter, q, MAX_NEW_TOKENS)
        for adapter in ("web-lora@1", "web-lora-b@1")
        for q in QUESTIONS
    }
    adapter, question = next((k for k, a in answers.items() if len(_norm(a)) >= 12), ("", ""))
    assert question, f"the adapters answer every question too briefly to see it stream: {answers}"
    expected = answers[adapter, question]
    context = browser.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    try:
        page.goto(app.url, wait_until="domcontentloaded")

        # Jobs: both jobs listed as succeeded (the table is a canvas grid: read its cells' accessible text).
        page.get_by_role("heading", name="Jobs", exact=True).wait_for(timeout=TIMEOUT_MS)
        grid = page.locator(".st-key-jobs-table [data-testid=stDataFrame]")
        grid.wait_for(timeout=TIMEOUT_MS)
        page.get_by_text("Submit a job").wait_for()
        for job_id in stack.jobs.values():  # the grid's accessible cells (it draws on a canvas)
            grid.get_by_text(job_id, exact=True).first.wait_for(state="attached", timeout=TIMEOUT_MS)
        _idle(page)
        _shot(page, "jobs")

        # Job detail: the three charts of the first job, drawn (vega-embed renders into a canvas or svg).
        _goto(page, "Job detail")
        _select(page, "Job", stack.jobs["web-lora"])
        charts = page.locator("[data-testid=stVegaLiteChart]")
        charts.nth(2).wait_for(timeout=TIMEOUT_MS)
        assert charts.count() == 3
        page.wait_for_function(
            "() => [...document.querySelectorAll('[data-testid=stVegaLiteChart]')]"
            ".every(c => c.querySelector('canvas, svg'))",
            timeout=TIMEOUT_MS,
        )
        assert page.get_by_text("succeeded").count() >= 1
        _shot(page, "job_detail")

        # Adapters: both published versions; load one into the inference service.
        _goto(page, "Adapters")
        page.get_by_text("Manifest of web-lora").first.wait_for(timeout=TIMEOUT_MS)
        _select(page, "Adapter", "web-lora@1")
        page.get_by_role("button", name=re.compile("Load")).first.click()
        page.get_by_text("web-lora@1: loaded").wait_for(timeout=TIMEOUT_MS)
        _idle(page)
        _shot(page, "adapters")

        # Chat: greedy, the adapter, the question; the reply streams in and is the service's answer.
        _goto(page, "Chat")
        sidebar = page.get_by_test_id("stSidebar")
        _select(page, "Adapter", adapter, scope=sidebar)
        temperature = sidebar.get_by_test_id("stSlider").filter(
            has=page.get_by_text("Temperature", exact=True)
        )
        temperature.get_by_role("slider").press("Home")  # 0.0: greedy
        _idle(page)
        tokens = sidebar.get_by_role("spinbutton", name="Max new tokens")
        tokens.fill(str(MAX_NEW_TOKENS))
        tokens.press("Enter")
        _idle(page)
        page.evaluate(RECORD_ASSISTANT)
        box = page.get_by_test_id("stChatInputTextArea")
        box.fill(question)
        box.press("Enter")
        messages = page.get_by_test_id("stChatMessage")
        messages.nth(1).wait_for(timeout=TIMEOUT_MS)
        page.get_by_text(f"served by {adapter}").wait_for(timeout=TIMEOUT_MS)
        _idle(page)
        shown = messages.nth(1).get_by_test_id("stMarkdownContainer").first.inner_text()
        assert _norm(shown) == _norm(expected), (shown, expected)
        seen = page.evaluate("window.__seen")
        assert seen and _norm(seen[-1]).startswith(_norm(expected)), seen
        # Streamed: the page showed the reply growing (strict prefixes of it) before the full text.
        partial = [s for s in seen if _norm(expected).startswith(_norm(s)) and _norm(s) != _norm(expected)]
        assert len(partial) >= 3, f"the reply did not grow in the page: {seen}"
        assert _norm(messages.nth(0).inner_text()).endswith(_norm(question))
        _shot(page, "chat")

        # Compare: the two adapters and the base side by side.
        _goto(page, "Compare")
        prompt = page.get_by_role("textbox", name="Prompt", exact=True)
        prompt.fill(question)
        prompt.press("Control+Enter")
        _idle(page)
        go = page.get_by_role("button", name=re.compile("Compare"))
        go.wait_for(timeout=TIMEOUT_MS)
        go.click()
        for label in ("web-lora@1", "web-lora-b@1", "(base model)"):
            page.get_by_text(label, exact=True).first.wait_for(timeout=TIMEOUT_MS)
        page.get_by_text(re.compile(r"\d+ tokens · first token")).nth(2).wait_for(timeout=TIMEOUT_MS)
        _idle(page)
        _shot(page, "compare")

        assert not page.get_by_text("Traceback").count()
        assert not page_errors, page_errors
    finally:
        context.close()
