"""At temperature 0 the server's text equals mlx_lm.generate on the same model and input."""

from __future__ import annotations

import json

import httpx
import pytest
from mlx_lm import generate, load, stream_generate

from tests.integration.server import ServerProcess
from tests.sse import sse_chunks

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
]


def reference_text(model_dir, messages, max_tokens, adapter_dir=None) -> str:
    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens, verbose=False)


def server_text(base: str, messages, max_tokens: int, stream: bool = False) -> tuple[str, str]:
    payload = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if not stream:
        body = httpx.post(f"{base}/v1/chat/completions", json=payload, timeout=300).json()
        return body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"]
    text, finish = "", None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=300) as r:
        for chunk in sse_chunks(r.iter_text()):
            choice = chunk["choices"][0]
            text += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True])
def test_tiny_model_greedy_matches_mlx_lm(tiny_server, tiny_model_dir, stream):
    expected = reference_text(tiny_model_dir, MESSAGES, 40)
    text, _ = server_text(tiny_server.base_url, MESSAGES, 40, stream)
    assert text == expected


def test_lora_adapter_greedy_matches_mlx_lm(tiny_model_dir, tiny_adapter_dir, server_logs):
    expected = reference_text(tiny_model_dir, MESSAGES, 30, tiny_adapter_dir)
    assert expected != reference_text(tiny_model_dir, MESSAGES, 30)  # the adapter matters
    with ServerProcess(tiny_model_dir, server_logs, "--adapter-path", str(tiny_adapter_dir)) as server:
        status = httpx.get(f"{server.base_url}/v1/mlx/status").json()
        assert status["model"]["adapter"] == str(tiny_adapter_dir.resolve())
        text, _ = server_text(server.base_url, MESSAGES, 30)
    assert text == expected


def test_real_model_answers_and_stops_at_eos(smollm2_dir, server_logs):
    """SmolLM2-135M-Instruct: a real answer, an EOS stop, exact streaming text."""
    expected = reference_text(smollm2_dir, MESSAGES, 48)
    with ServerProcess(smollm2_dir, server_logs, workers=1) as server:
        text, finish = server_text(server.base_url, MESSAGES, 48)
        streamed, stream_finish = server_text(server.base_url, MESSAGES, 48, stream=True)
    assert "Paris" in text
    assert text == expected == streamed
    assert finish == stream_finish == "stop"


@pytest.mark.slow
def test_real_model_completion_text_is_its_tokens(smollm2_dir, server_logs):
    """SmolLM2 continues "The sea" with a space token: the completion keeps that space (mlx-lm drops it)."""
    prompt, max_tokens = "The sea", 12
    model, tokenizer = load(str(smollm2_dir))
    responses = stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)
    ids = [r.token for r in responses if r.finish_reason != "stop"]
    expected = tokenizer.decode(ids)
    payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0}
    with ServerProcess(smollm2_dir, server_logs, workers=1) as server:
        url = f"{server.base_url}/v1/completions"
        choice = httpx.post(url, json=payload, timeout=300).json()["choices"][0]
        streamed, streamed_tokens = "", []
        with httpx.stream("POST", url, json={**payload, "stream": True}, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])["choices"][0]
                    streamed += chunk["text"]
                    streamed_tokens += (chunk["logprobs"] or {}).get("tokens", [])
    assert expected.startswith(" ")
    assert choice["text"] == "".join(choice["logprobs"]["tokens"]) == expected
    assert streamed == "".join(streamed_tokens) == expected
