"""Fixed, deterministic chat prompts of an exact templated token length.

Every target sees the same prompts: the HTTP targets get the user text, the raw
target gets the token ids of that text after the chat template, which is what
the servers compute from it. Each (seed, index) gives a different prompt so a
prefix cache cannot turn a timed run into cache hits of its warm-up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

WORDS = (
    "the quick brown fox jumps over lazy dog journey thousand miles begins with single step "
    "once upon time small village sea lived old fisherman daughter every morning walked down "
    "harbour checked nets talked about weather river flows through city people cross foot "
    "bicycle bus train teacher robot neighbour cat student engineer traveller team computer "
    "reads writes builds finds likes paints explains remembers carries opens watches answers "
    "letter book program apples news question door map report song boxes window station"
).split()

# Single letters are one token in any byte-level BPE vocabulary worth the name,
# so they can always close the last small gap to the exact length.
FILLERS = tuple("abcdefghijklmnopqrstuvwxyz")
# Words counted one by one stop this many tokens short; the rest is added
# checking the whole templated prompt, which absorbs any boundary effects.
EXACT_MARGIN_TOKENS = 8


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...
    def encode(self, text: str, **kwargs: Any) -> list[int]: ...
    def decode(self, ids: list[int], **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class Prompt:
    text: str  # the user message
    ids: tuple[int, ...]  # the templated prompt (generation prompt included)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]


def templated_ids(tokenizer: ChatTokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    # The template already holds the special tokens; adding more would differ from the servers.
    return tokenizer.encode(rendered, add_special_tokens=False)


def make_prompt(tokenizer: ChatTokenizer, prompt_tokens: int, seed: str, index: int) -> Prompt:
    """Add seeded words while they fit; the pre-tokenizer splits on spaces, so a word
    appended never changes the tokens before it and the length only grows."""
    rng = random.Random(f"{seed}:{index}")
    ids = templated_ids(tokenizer, "")
    if len(ids) >= prompt_tokens:
        raise ValueError(f"--prompt-tokens must exceed the chat template's {len(ids)} tokens")
    # Fast part: count words on their own (no re-tokenizing the whole text per
    # word, which is quadratic for long prompts) up to a safe margin.
    words: list[str] = []
    estimate = len(ids)
    while True:
        word = rng.choice(WORDS)
        cost = len(tokenizer.encode(" " + word, add_special_tokens=False))
        if estimate + cost > prompt_tokens - EXACT_MARGIN_TOKENS:
            break
        words.append(word)
        estimate += cost
    if words:
        ids = templated_ids(tokenizer, " ".join(words))
    # Exact part: every candidate checked on the full templated prompt.
    while len(ids) < prompt_tokens:
        for word in rng.sample(WORDS, len(WORDS)) + list(FILLERS):
            trial = templated_ids(tokenizer, " ".join([*words, word]))
            if len(trial) <= prompt_tokens:
                words.append(word)
                ids = trial
                break
        else:
            raise ValueError(f"cannot build a prompt of exactly {prompt_tokens} tokens")
    return Prompt(" ".join(words), tuple(ids))


def make_prompts(tokenizer: ChatTokenizer, n: int, prompt_tokens: int, seed: str) -> list[Prompt]:
    return [make_prompt(tokenizer, prompt_tokens, seed, i) for i in range(n)]
