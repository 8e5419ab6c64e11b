"""Talk to mlx-server with the official `openai` client: the model, a chat, a stream, a completion.

    pip install openai
    python examples/client.py [--base-url http://127.0.0.1:8000/v1] [--api-key not-needed]

mlx-server serves one model, fixed at startup: there is nothing to load or unload, and the
`model` field of a request may be any string (this sends the served model's id).
"""

from __future__ import annotations

import argparse
import sys

import openai

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
TIMEOUT_S = 60.0  # per request; a small answer from a loaded model takes far less
MAX_TOKENS = 48  # keep the demo short, whatever the model


def show_model(client: openai.OpenAI) -> str:
    model = client.models.list().data[0]
    print(f"model: {model.id}")
    return model.id


def chat(client: openai.OpenAI, model: str, max_tokens: int) -> None:
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello in five words."}],
        max_tokens=max_tokens,
        temperature=0.0,  # greedy: the same answer every time
    )
    choice = response.choices[0]
    print(f"chat: {choice.message.content!r} (finish_reason={choice.finish_reason})")
    if response.usage:
        usage = response.usage
        print(f"usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens")


def stream_chat(client: openai.OpenAI, model: str, max_tokens: int) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name three colors of the rainbow."}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
    )
    print("stream: ", end="", flush=True)
    chunks = 0
    for chunk in stream:  # each server-sent event, as soon as the server sends it
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
            chunks += 1
    print(f"\nstream: done ({chunks} chunks)")


def complete(client: openai.OpenAI, model: str, max_tokens: int) -> None:
    response = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=max_tokens, temperature=0.0
    )
    choice = response.choices[0]
    print(f"completion: {choice.text!r} (finish_reason={choice.finish_reason})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="[default: %(default)s]")
    parser.add_argument("--api-key", default="not-needed", help="sent as a bearer token [default: %(default)s]")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="[default: %(default)s]")
    args = parser.parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=TIMEOUT_S, max_retries=1)
    try:
        model = show_model(client)
        chat(client, model, args.max_tokens)
        stream_chat(client, model, args.max_tokens)
        complete(client, model, args.max_tokens)
    except openai.APITimeoutError:
        print(f"error: no answer within {TIMEOUT_S:.0f} s from {args.base_url}", file=sys.stderr)
        return 1
    except openai.APIConnectionError:
        print(f"error: no server answers at {args.base_url}: is mlx-server running?", file=sys.stderr)
        return 1
    except openai.APIStatusError as exc:
        print(f"error: HTTP {exc.status_code}: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
