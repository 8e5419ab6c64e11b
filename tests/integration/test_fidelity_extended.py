"""Greedy output equals mlx_lm's: for completions, with the LoRA adapter, and inside a full batch.

A completion's text is its tokens' text, while mlx-lm drops the first
token's leading space (as the server's chat does): completions are compared
with the text of mlx-lm's token ids, chat with mlx_lm.generate's text.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from mlx_lm import generate, load, stream_generate

from tests.integration.server import ServerProcess
from tests.sse import sse_chunks

PROMPTS = ["Once upon a time, in a small village by the sea,", "The capital of France is", "def add(a, b):"]
MESSAGES = [{"role": "user", "content": "Tell me about the river and the city."}]
BATCH = 16


def reference(model_dir, prompt, max_tokens: int, adapter_dir=None) -> str:
    """The text of mlx-lm's greedy token ids (mlx_lm.generate's text, untrimmed)."""
    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    ids, trimmed = [], ""
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        ids += [response.token] if response.finish_reason != "stop" else []
        trimmed += response.text
    text = tokenizer.decode(ids)
    assert text.removeprefix(" ") == trimmed  # the one difference
    return text


def completion(base: str, prompt: str, max_tokens: int, **extra) -> str:
    payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    body = httpx.post(f"{base}/v1/completions", json=payload, timeout=300).json()
    return body["choices"][0]["text"]


def stream_completion(base: str, prompt: str, max_tokens: int) -> str:
    text = ""
    payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=payload, timeout=300) as r:
        for chunk in sse_chunks(r.iter_text()):
            text += chunk["choices"][0]["text"] if chunk["choices"] else ""
    return text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completions_greedy_match_mlx_lm(tiny_server, tiny_model_dir, prompt):
    expected = reference(tiny_model_dir, prompt, 40)
    assert completion(tiny_server.base_url, prompt, 40) == expected
    assert stream_completion(tiny_server.base_url, prompt, 40) == expected


def test_lora_adapter_completions_match_mlx_lm(tiny_model_dir, tiny_adapter_dir, server_logs):
    prompt = PROMPTS[0]
    expected = reference(tiny_model_dir, prompt, 30, tiny_adapter_dir)
    assert expected != reference(tiny_model_dir, prompt, 30)  # the adapter matters
    with ServerProcess(tiny_model_dir, server_logs, "--adapter-path", str(tiny_adapter_dir)) as server:
        assert completion(server.base_url, prompt, 30) == expected
        # Chat through the adapter too, streamed this time.
        model, tokenizer = load(str(tiny_model_dir), adapter_path=str(tiny_adapter_dir))
        chat_prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
        chat_expected = generate(model, tokenizer, prompt=chat_prompt, max_tokens=30, verbose=False)
        body = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 30, "temperature": 0},
            timeout=300,
        ).json()
        assert body["choices"][0]["message"]["content"] == chat_expected


def test_greedy_request_inside_a_full_batch(tiny_server, tiny_model_dir):
    eos = json.loads((tiny_model_dir / "config.json").read_text())["eos_token_id"]
    no_eos = {str(t): -100 for t in (eos if isinstance(eos, list) else [eos])}
    """One greedy request among 15 others (sampled, other prompts and lengths, joining
    at different times) gives exactly the text it gives alone."""
    probe = PROMPTS[1]
    expected = reference(tiny_model_dir, probe, 48)
    rng = random.Random(7)
    noise = [
        {
            "prompt": " ".join(
                rng.choice(["river", "city", "train", "old", "map", "song"]) for _ in range(rng.randint(3, 40))
            ),
            # Longer than the probe and never ending early: they surround it.
            "max_tokens": rng.randint(100, 200),
            "logit_bias": no_eos,
            "temperature": rng.choice([0.7, 1.0, 1.3]),
            "seed": i,
        }
        for i in range(BATCH - 1)
    ]

    def noisy(payload: dict) -> int:
        r = httpx.post(f"{tiny_server.base_url}/v1/completions", json=payload, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(BATCH) as pool:
        early = [pool.submit(noisy, p) for p in noise[:8]]
        probe_result = pool.submit(completion, tiny_server.base_url, probe, 48)
        late = [pool.submit(noisy, p) for p in noise[8:]]
        assert probe_result.result() == expected
        assert all(f.result() >= 100 for f in early + late)
