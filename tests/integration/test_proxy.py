"""Two mlx-server instances, two different tiny models, behind the real nginx of deploy/proxy.

nginx comes from a system package: without it on PATH these tests skip with the install hint,
and fail when `CI` is set (.ci/run installs it).
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from deploy.proxy.render import TEMPLATE, render
from tests.integration.server import ChildProcess, ServerProcess, free_port
from tests.model_factory import build_tiny_model
from tests.system_tools import require_system_tool
from tests.waiting import wait_until

NAMES = ("tiny-a", "tiny-b")  # model directory names, hence model ids, hence proxy paths
NGINX_START_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 60.0
# Debian puts nginx in /usr/sbin, which a non-root PATH often lacks.
NGINX_HINT = "apt-get install nginx (Debian puts it in /usr/sbin: have that on PATH) or brew install nginx"


def nginx_binary() -> str:
    return require_system_tool("nginx", NGINX_HINT)


def nginx_command(nginx: str, prefix: Path, conf: Path, *extra: str) -> list[str]:
    # -p: relative pid/log/temp paths land in prefix; -e: errors before the config is read too.
    return [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log"), *extra]


class Nginx(ChildProcess):
    """`nginx -g 'daemon off;'` in the foreground on a free port, everything under `prefix`."""

    def __init__(self, conf_text: str, prefix: Path, port: int) -> None:
        self.prefix = prefix
        self.base_url = f"http://127.0.0.1:{port}"
        conf = prefix / "nginx.conf"
        conf.write_text(conf_text)
        super().__init__(nginx_command(nginx_binary(), prefix, conf, "-g", "daemon off;"), prefix / "nginx.out")

    def logs(self) -> str:
        parts = [self.prefix / "nginx.out", self.prefix / "error.log"]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())

    def listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited {self.proc.returncode}:\n{self.logs()}")
        try:
            httpx.get(self.base_url + "/", timeout=2)  # the JSON 404 of `location /`
            return True
        except httpx.HTTPError:
            return False

    def wait_ready(self) -> None:
        wait_until(self.listening, "nginx to listen", NGINX_START_TIMEOUT_S, context=self.logs)


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory, server_logs: Path) -> Iterator[dict[str, ServerProcess]]:
    nginx_binary()  # fail before starting servers that could not be used
    models = tmp_path_factory.mktemp("proxy-models")
    servers: dict[str, ServerProcess] = {}
    try:
        for seed, name in enumerate(NAMES):  # different seeds: different models
            model = build_tiny_model(models / name, seed=seed)
            servers[name] = ServerProcess(model, server_logs, workers=1)  # starts at once
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def proxy(instances: dict[str, ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    port = free_port()
    conf = render({name: s.port for name, s in instances.items()}, listen=f"127.0.0.1:{port}")
    nginx = Nginx(conf, tmp_path_factory.mktemp("nginx"), port)
    try:
        nginx.wait_ready()
        yield nginx
    finally:
        nginx.stop(signal.SIGQUIT)  # graceful: finish requests, then exit


def test_shipped_config_is_the_rendered_example(tmp_path: Path) -> None:
    # nginx.conf is the template: rendering its own example instances gives it back unchanged.
    assert render() == TEMPLATE.read_text()
    check = subprocess.run(
        nginx_command(nginx_binary(), tmp_path, TEMPLATE, "-t"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("name", NAMES)
def test_each_instance_by_path_prefix(proxy: Nginx, name: str) -> None:
    response = httpx.get(f"{proxy.base_url}/m/{name}/v1/models", timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200, response.text
    assert [model["id"] for model in response.json()["data"]] == [name]


def test_instance_by_header(proxy: Nginx) -> None:
    response = httpx.get(
        f"{proxy.base_url}/v1/models",
        headers={"X-MLX-Instance": "tiny-b"},
        timeout=HTTP_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["id"] == "tiny-b"


@pytest.mark.parametrize("path", ["/m/nope/v1/models", "/v1/models", "/elsewhere"])
def test_unknown_instance_is_an_openai_404(proxy: Nginx, path: str) -> None:
    response = httpx.get(proxy.base_url + path, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("name", NAMES)
def test_streaming_chat_through_the_proxy(proxy: Nginx, name: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 24,
        "temperature": 0,  # greedy: the same number of chunks on every run
        "stream": True,
    }
    url = f"{proxy.base_url}/m/{name}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=HTTP_TIMEOUT_S) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in response.headers
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert all(event.startswith("data: ") for event in events)
    assert len(chunks) >= 3, events  # role, content..., finish: several chunks, not one
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk["model"] for chunk in chunks} == {name}
    assert chunks[-1]["choices"][0]["finish_reason"] in {"length", "stop"}


def test_openai_client_through_the_proxy(proxy: Nginx) -> None:
    answers = {}
    for name in NAMES:
        client = openai.OpenAI(
            base_url=f"{proxy.base_url}/m/{name}/v1",
            api_key="not-needed",
            timeout=HTTP_TIMEOUT_S,
            max_retries=0,
        )
        assert [model.id for model in client.models.list().data] == [name]
        prompt = [{"role": "user", "content": "Hello"}]
        chat = client.chat.completions.create(model=name, messages=prompt, max_tokens=12, temperature=0.0)
        assert chat.model == name and chat.choices[0].message.content is not None
        stream = client.chat.completions.create(
            model=name, messages=prompt, max_tokens=12, temperature=0.0, stream=True
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == chat.choices[0].message.content  # greedy: same text either way
        completion = client.completions.create(model=name, prompt="Once upon", max_tokens=8)
        assert completion.model == name and completion.choices[0].text is not None
        answers[name] = chat.choices[0].message.content
    # Two different models behind one proxy: greedy answers tell them apart.
    assert answers["tiny-a"] != answers["tiny-b"]
