"""A completion's text is exactly its tokens' text (leading space included, as OpenAI and vLLM);
chat keeps mlx-lm's dropped leading space. The real scheduler on the tiny model writes the tokens."""

from __future__ import annotations

import falcon.testing
import pytest

from engine.loading import load_model
from frontend.app import create_app
from frontend.tokenization import Tokenization
from tests.unit.defaults import frontend_settings
from tests.unit.scheduler_client import SchedulerClient
from tests.unit.test_frontend_chat import sse_payloads

COMPLETIONS = "/v1/completions"
# Greedy, the first one starts its answer with a space token (" remembers") on this model.
PROMPTS = ["The capital of France is", "The sea", "Once upon a time, in a small village"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture
def client(loaded, tiny_model_dir) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(
        create_app(SchedulerClient(loaded), Tokenization.from_pretrained(tiny_model_dir), settings=frontend_settings())
    )


@pytest.fixture(scope="module")
def no_eos(loaded) -> dict[str, float]:
    # Every answer runs to max_tokens, so each test sees many tokens.
    return {str(t): -100.0 for t in loaded.info.eos_token_ids}


def tokens_text(tokens: list[str]) -> str:
    """The logprobs tokens put together (a "bytes:\\xNN" token is bytes of a character)."""
    raw = b"".join(
        bytes.fromhex(t[len("bytes:") :].replace("\\x", "")) if t.startswith("bytes:") else t.encode("utf-8")
        for t in tokens
    )
    return raw.decode("utf-8", errors="replace")


def body(prompt: str, no_eos: dict, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "logit_bias": no_eos, "logprobs": 0, **extra}


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_text_is_the_concatenation_of_its_tokens(client, no_eos, prompt, temperature):
    result = client.simulate_post(COMPLETIONS, json=body(prompt, no_eos, temperature=temperature, seed=1))
    assert result.status_code == 200, result.text
    [choice] = result.json["choices"]
    tokens = choice["logprobs"]["tokens"]
    assert len(tokens) == MAX_TOKENS
    assert choice["text"] == tokens_text(tokens)


def test_the_first_tokens_leading_space_is_kept(client, no_eos):
    [choice] = client.simulate_post(COMPLETIONS, json=body(PROMPTS[0], no_eos, temperature=0)).json["choices"]
    assert choice["logprobs"]["tokens"][0].startswith(" ")
    assert choice["text"].startswith(choice["logprobs"]["tokens"][0])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streamed_text_is_the_concatenation_of_its_tokens(client, no_eos, prompt):
    result = client.simulate_post(COMPLETIONS, json=body(prompt, no_eos, temperature=1.0, seed=2, stream=True))
    chunks = [p for p in sse_payloads(result.text) if p != "[DONE]"]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    tokens = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert len(tokens) == MAX_TOKENS
    assert text == tokens_text(tokens)
    whole = client.simulate_post(COMPLETIONS, json=body(prompt, no_eos, temperature=1.0, seed=2)).json
    assert whole["choices"][0]["text"] == text


@pytest.mark.parametrize("stream", [False, True])
def test_echo_is_the_prompt_then_the_text(client, no_eos, stream):
    prompt = PROMPTS[0]
    plain = client.simulate_post(COMPLETIONS, json=body(prompt, no_eos, temperature=0)).json["choices"][0]["text"]
    payload = {"prompt": prompt, "max_tokens": MAX_TOKENS, "logit_bias": no_eos, "temperature": 0, "echo": True}
    result = client.simulate_post(COMPLETIONS, json={**payload, "stream": stream})
    if stream:
        echoed = "".join(p["choices"][0]["text"] for p in sse_payloads(result.text) if p != "[DONE]")
    else:
        echoed = result.json["choices"][0]["text"]
    assert echoed == prompt + plain


def test_chat_still_drops_the_leading_space_as_mlx_lm(client, tiny_model_dir, no_eos):
    [the] = Tokenization.from_pretrained(tiny_model_dir).hf.encode(" the", add_special_tokens=False)
    forced = {**no_eos, str(the): 100.0}  # every token is " the"
    messages = [{"role": "user", "content": "Hi"}]
    chat = {"messages": messages, "max_tokens": 4, "temperature": 0, "logit_bias": forced, "logprobs": True}
    [choice] = client.simulate_post("/v1/chat/completions", json=chat).json["choices"]
    assert [entry["token"] for entry in choice["logprobs"]["content"]] == [" the"] * 4
    assert choice["message"]["content"] == "the the the the"
    completion = {"prompt": "Hi", "max_tokens": 4, "temperature": 0, "logit_bias": forced}
    assert client.simulate_post(COMPLETIONS, json=completion).json["choices"][0]["text"] == " the the the the"
