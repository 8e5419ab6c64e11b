"""The built-in web page in headless Chromium (Debian's chromium + chromium-driver, via selenium).

Against one real server on the tiny model: the page loads clean, its status matches
/v1/mlx/status, a chat streams, Stop aborts the engine request, and it works through the
nginx path-prefix proxy. Against the in-process app on the fake engine (whose output the
test scripts): model output that looks like HTML stays text, and an API key is asked for.
Without chromium/chromedriver these tests skip with the install hint (fail under CI).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import pytest

from deploy.proxy.render import render
from frontend.app import create_app
from frontend.tokenization import Tokenization
from tests.integration.server import free_port
from tests.integration.test_proxy import Nginx, nginx_binary
from tests.system_tools import require_system_tool
from tests.thinking_template import QWEN3_THINKING_TEMPLATE
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import FakeEngineClient, Script, write_tokenizer_dir
from tests.waiting import wait_until

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM_HINT = "apt-get install chromium chromium-driver (or brew install --cask chromium chromedriver)"
PAGE_WAIT_S = 30.0
HTTP_TIMEOUT_S = 30.0
API_KEY = "page-test-key"
HOSTILE = '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2"> & done'


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    chromium = require_system_tool("chromium", CHROMIUM_HINT)
    chromedriver = require_system_tool("chromedriver", CHROMIUM_HINT)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    try:
        yield browser
    finally:
        browser.quit()


def console_errors(driver: webdriver.Chrome) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def text(driver: webdriver.Chrome, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def open_page(driver: webdriver.Chrome, url: str, state: str = "ready") -> None:
    driver.get(url)
    wait_until(lambda: text(driver, "state") == state, f"the page to show {state}", PAGE_WAIT_S)


def chart_points(driver: webdriver.Chrome) -> int:
    return len((driver.find_element(By.ID, "chart-line").get_attribute("points") or "").split())


def status(base: str) -> dict:
    return httpx.get(f"{base}/v1/mlx/status", timeout=HTTP_TIMEOUT_S).json()


def send(driver: webdriver.Chrome, prompt: str, max_tokens: int) -> None:
    driver.find_element(By.ID, "max-tokens").clear()
    driver.find_element(By.ID, "max-tokens").send_keys(str(max_tokens))
    driver.find_element(By.ID, "temperature").clear()
    driver.find_element(By.ID, "temperature").send_keys("0")
    driver.find_element(By.ID, "prompt").send_keys(prompt)
    driver.find_element(By.ID, "send").click()


def ban_eos(driver: webdriver.Chrome, no_eos: dict[str, int]) -> None:
    """The tiny model may pick EOS at once: ban it in the page's requests, so answers run to max_tokens."""
    driver.execute_script(
        """const bias = arguments[0]; const original = window.fetch;
        window.fetch = (url, init) => {
          if (init && init.body) { const body = JSON.parse(init.body); body.logit_bias = bias;
            init = Object.assign({}, init, {body: JSON.stringify(body)}); }
          return original(url, init);
        };""",
        no_eos,
    )


def last_answer(driver: webdriver.Chrome) -> tuple[str, str]:
    """The last assistant turn's (text, stats line)."""
    turn = driver.find_elements(By.CSS_SELECTOR, "#transcript .turn")[-1]
    return turn.find_element(By.CLASS_NAME, "text").text, turn.find_element(By.CLASS_NAME, "stats").text


def test_page_loads_without_console_errors(driver, base):
    open_page(driver, base + "/")
    assert console_errors(driver) == []


def test_status_matches_the_api(driver, base):
    open_page(driver, base + "/ui/")  # /ui/ redirects to the page
    wait_until(lambda: text(driver, "s-model") != "–", "the status to show")
    expected = status(base)
    wait_until(lambda: text(driver, "s-tokens") == str(status(base)["engine"]["tokens_generated"]), "the token count")
    assert text(driver, "s-model") == expected["model"]["id"]
    assert text(driver, "s-adapter") == "none"
    assert text(driver, "s-context") == str(expected["model"]["context_length"])
    assert text(driver, "s-restarts") == str(expected["engine"]["restarts"])
    assert text(driver, "s-running") == "0" and text(driver, "s-queued") == "0"
    assert text(driver, "s-cache-entries") == str(status(base)["prompt_cache"]["entries"])


def test_chat_streams_an_answer_with_usage(driver, base, no_eos):
    open_page(driver, base + "/")
    ban_eos(driver, no_eos)
    send(driver, "Tell me a story.", 16)
    wait_until(lambda: "finish:" in last_answer(driver)[1], "the answer to finish")
    answer, stats = last_answer(driver)
    assert answer and stats.startswith("finish: length · prompt "), stats
    assert " · completion 16 tokens" in stats, stats
    assert console_errors(driver) == []


def test_stop_aborts_the_engine_request(driver, base, no_eos, tmp_path):
    open_page(driver, base + "/")
    ban_eos(driver, no_eos)
    wait_until(lambda: chart_points(driver) >= 3, "the tokens/s chart to draw a line")
    context = status(base)["model"]["context_length"]
    send(driver, "Count.", context - 64)
    wait_until(lambda: status(base)["engine"]["running_requests"] == 1, "the chat to run")
    wait_until(lambda: text(driver, "s-running") == "1", "the page to show it running")
    driver.save_screenshot(str(tmp_path / "ui-under-load.png"))  # an artifact of the run
    driver.find_element(By.ID, "stop-button").click()
    wait_until(lambda: status(base)["engine"]["running_requests"] == 0, "the engine request to be aborted")
    wait_until(lambda: last_answer(driver)[1] == "stopped", "the page to say stopped")
    assert console_errors(driver) == []


def test_page_through_the_nginx_prefix_proxy(driver, tiny_server, tmp_path_factory):
    nginx_binary()
    port = free_port()
    nginx = Nginx(render({"tiny": tiny_server.port}, listen=f"127.0.0.1:{port}"), tmp_path_factory.mktemp("ng"), port)
    try:
        nginx.wait_ready()
        open_page(driver, f"{nginx.base_url}/m/tiny/")
        wait_until(lambda: text(driver, "s-model") == status(tiny_server.base_url)["model"]["id"], "the status")
        send(driver, "Hello", 4)
        wait_until(lambda: "finish:" in last_answer(driver)[1], "the answer through the proxy")
        assert console_errors(driver) == []
    finally:
        nginx.stop(signal.SIGQUIT)


# --- The in-process app on the fake engine: the test decides the model's output -----------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _ThreadedServer(WSGIServer):
    daemon_threads = True


@pytest.fixture(scope="module")
def fake_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenization:
    return Tokenization.from_pretrained(str(write_tokenizer_dir(tmp_path_factory.mktemp("tok"))))


def serve(engine: FakeEngineClient, tok: Tokenization, port: int = 0, **settings: object) -> Iterator[str]:
    app = create_app(engine, tok, settings=frontend_settings(**settings))
    server = make_server("127.0.0.1", port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fake_engine() -> FakeEngineClient:
    return FakeEngineClient()


@pytest.fixture
def fake_base(fake_engine: FakeEngineClient, fake_tok: Tokenization) -> Iterator[str]:
    yield from serve(fake_engine, fake_tok)


@pytest.fixture
def keyed_base(fake_engine: FakeEngineClient, fake_tok: Tokenization) -> Iterator[str]:
    yield from serve(fake_engine, fake_tok, api_keys=(API_KEY,))


def test_model_output_that_looks_like_html_is_text(driver, fake_base, fake_engine, fake_tok):
    fake_engine.script(Script(fake_tok.hf.encode(HOSTILE, add_special_tokens=False)))
    open_page(driver, fake_base + "/")
    send(driver, "Say something dangerous.", 200)
    wait_until(lambda: "finish:" in last_answer(driver)[1], "the answer")
    assert last_answer(driver)[0] == HOSTILE
    assert driver.find_elements(By.CSS_SELECTOR, "#transcript img, #transcript script") == []
    assert driver.execute_script("return window.pwned === undefined")
    assert console_errors(driver) == []


def test_reasoning_shows_apart_from_the_answer(driver, fake_engine, tmp_path):
    path = write_tokenizer_dir(tmp_path / "qwen3", chat_template=QWEN3_THINKING_TEMPLATE, think_markers="added")
    tok = Tokenization.from_pretrained(str(path))
    fake_engine.script(Script(tok.encode_prompt("<think>Weighing it up.</think>The answer.", add_special_tokens=False)))
    for base in serve(fake_engine, tok):
        open_page(driver, base + "/")
        send(driver, "Think first.", 200)
        wait_until(lambda: "finish:" in last_answer(driver)[1], "the answer")
        turn = driver.find_elements(By.CSS_SELECTOR, "#transcript .turn")[-1]
        assert turn.find_element(By.CLASS_NAME, "reasoning").text == "Weighing it up."
        assert last_answer(driver)[0] == "The answer."


def test_engine_down_shows_and_recovers_by_itself(driver, fake_base, fake_engine):
    open_page(driver, fake_base + "/")
    fake_engine.available = False  # /v1/mlx/status answers 503, as while the engine restarts
    wait_until(lambda: text(driver, "state") == "restarting", "the page to show the engine down")
    fake_engine.available = True
    wait_until(lambda: text(driver, "state") == "ready", "the page to recover")


def test_server_gone_shows_unreachable_and_recovers_by_itself(driver, fake_engine, fake_tok):
    port = free_port()
    first = serve(fake_engine, fake_tok, port)
    base = next(first)
    open_page(driver, base + "/")
    first.close()  # the server stops: the page's polls fail
    wait_until(lambda: text(driver, "state") == "unreachable", "the page to show the server gone")
    for again in serve(fake_engine, fake_tok, port):
        assert again == base
        wait_until(lambda: text(driver, "state") == "ready", "the page to recover")


def test_page_asks_for_the_api_key_and_keeps_it_for_the_tab(driver, keyed_base):
    open_page(driver, keyed_base + "/", state="needs API key")
    form = driver.find_element(By.ID, "key-form")
    assert form.is_displayed()
    driver.find_element(By.ID, "key-input").send_keys(API_KEY)
    form.find_element(By.CSS_SELECTOR, "button").click()
    wait_until(lambda: text(driver, "state") == "ready", "the page to use the key")
    assert not form.is_displayed()
    assert driver.execute_script("return sessionStorage.getItem('mlx-server-api-key')") == API_KEY
    assert driver.execute_script("return localStorage.length") == 0
    assert driver.execute_script("return document.cookie") == ""
