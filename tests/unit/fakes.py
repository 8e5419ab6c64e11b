"""Fakes for frontend unit tests: an engine client and a tiny tokenizer.

``FakeEngineClient`` implements ``frontend.engine_client.EngineClient``. Each
submitted Generate is answered by a ``Script`` (queued with ``fake.script(...)``,
else ``fake.default``): token ids in deltas of ``chunk`` tokens, cut at the
request's max_tokens with finish "length" like the engine. Everything that
happens is recorded in ``fake.events`` as (kind, request_id) with kinds
"submit", "delta", "final", "close", "abort" (a close before the final delta)
and "wait" (a ``wait`` that timed out: the script's first delta is late).
"""

from __future__ import annotations

import functools
import json
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from frontend.engine_client import ClientDisconnected, EngineUnavailable
from ipc.messages import EngineStatus, Generate, GroupStatus, ModelInfo, TokenDelta

# ---------------------------------------------------------------- engine client


@dataclass
class Script:
    token_ids: Sequence[int] = ()
    finish_reason: str = "stop"  # when the tokens run out before max_tokens
    chunk: int = 1  # tokens per delta
    cached_prompt_tokens: int = 0
    error: str | None = None  # with finish_reason "error"
    fail_after: int | None = None  # raise EngineUnavailable after this many deltas
    # The first delta comes after this many ``wait`` calls time out (a long
    # prefill or a queue, without a clock).
    late_waits: int = 0


def make_model_info(**overrides: object) -> ModelInfo:
    fields: dict = dict(
        model_id="tiny-test-model",
        model_path="/models/tiny-test-model",
        adapter_path=None,
        context_length=256,
        eos_token_ids=[2],
        vocab_size=512,
        created=1_700_000_000,
    )
    fields.update(overrides)
    return ModelInfo(**fields)


class FakeStream:
    def __init__(self, client: FakeEngineClient, request: Generate, script: Script) -> None:
        self.request_id = request.request_id
        self._client = client
        self._deltas = _deltas(request, script)
        self._fail_after = script.fail_after
        self._late_waits = script.late_waits
        self.wait_timeouts: list[float] = []  # the timeout of every wait call
        self.finished = False
        self.closed = False
        self._cancelled = None

    def watch(self, cancelled) -> None:
        self._cancelled = cancelled

    def forwarded(self, timeout_s: float) -> bool:
        self._client.events.append(("forwarded", self.request_id))
        return True

    def wait(self, timeout_s: float) -> bool:
        self.wait_timeouts.append(timeout_s)
        if self._late_waits > 0 and not self.closed:
            self._late_waits -= 1
            self._client.events.append(("wait", self.request_id))
            return False
        return True

    def __iter__(self) -> Iterator[TokenDelta]:
        sent = 0
        for delta in self._deltas:
            if self.closed:
                return
            if self._cancelled is not None and self._cancelled():
                self.close()
                raise ClientDisconnected(f"client went away; request {self.request_id} aborted")
            if self._fail_after is not None and sent >= self._fail_after:
                self.finished = True
                raise EngineUnavailable("fake engine died")
            sent += 1
            self._client.events.append(("delta", self.request_id))
            if delta.finish_reason is not None:
                self.finished = True
                self._client.events.append(("final", self.request_id))
            yield delta
            if self.finished:
                return

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._client.events.append(("close", self.request_id))
        if not self.finished:
            self._client.events.append(("abort", self.request_id))
            self._client.aborted.append(self.request_id)

    def __enter__(self) -> FakeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fake_logprob(position: int) -> float:
    """The logprob the fake engine reports for the token at ``position``."""
    return -0.25 * (position + 1)


def fake_top_logprobs(token_id: int, position: int, k: int) -> list[tuple[int, float]]:
    """The fake's top k at ``position``: the sampled token first, then the ids after it."""
    return [(token_id + j, fake_logprob(position) - j) for j in range(k)]


def _deltas(request: Generate, script: Script) -> list[TokenDelta]:
    rid = request.request_id
    if script.finish_reason in ("error", "overloaded", "too_large"):  # finals that carry the engine's words
        return [
            TokenDelta(rid, list(script.token_ids), script.finish_reason, script.cached_prompt_tokens, script.error)
        ]
    tokens = list(script.token_ids)[: request.max_tokens]
    # Like the engine: max_tokens reached before the script's end (its EOS) is "length".
    reason = "length" if len(script.token_ids) >= request.max_tokens else script.finish_reason
    starts = list(range(0, len(tokens), script.chunk)) or [0]
    deltas = []
    for n, start in enumerate(starts):
        chunk = tokens[start : start + script.chunk]
        logprobs = top = None
        if request.logprobs is not None:  # like the engine: only when asked, one entry per token
            logprobs = [fake_logprob(start + i) for i in range(len(chunk))]
            if request.logprobs:
                top = [fake_top_logprobs(t, start + i, request.logprobs) for i, t in enumerate(chunk)]
        cached = script.cached_prompt_tokens if n == 0 else 0
        final = reason if n == len(starts) - 1 else None
        deltas.append(TokenDelta(rid, chunk, final, cached, None, logprobs, top))
    return deltas


@dataclass
class FakeEngineClient:
    model_info: ModelInfo = field(default_factory=make_model_info)
    default: Script = field(default_factory=Script)
    available: bool = True
    fail_submit_after: int | None = None  # submits that succeed before EngineUnavailable
    submitted: list[Generate] = field(default_factory=list)
    streams: list[FakeStream] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)
    status_queries: int = 0
    group: GroupStatus | None = None  # a sharded engine's ranks, as rank 0 reports them
    _scripts: deque = field(default_factory=deque)

    @property
    def model(self) -> ModelInfo:
        return self.model_info

    @property
    def alive(self) -> bool:
        return self.available

    def script(self, *scripts: Script) -> None:
        """Answer the next submits with these scripts, in order."""
        self._scripts.extend(scripts)

    def announce(self) -> None:
        self.events.append(("announce", ""))

    def settle(self) -> None:
        self.events.append(("settle", ""))

    def submit(self, request: Generate) -> FakeStream:
        if not self.available or (self.fail_submit_after is not None and len(self.submitted) >= self.fail_submit_after):
            raise EngineUnavailable("fake engine is down")
        self.submitted.append(request)
        self.events.append(("submit", request.request_id))
        script = self._scripts.popleft() if self._scripts else self.default
        stream = FakeStream(self, request, script)
        self.streams.append(stream)
        return stream

    def status(self, timeout_s: float = 5.0) -> EngineStatus:
        self.status_queries += 1
        if not self.available:
            raise EngineUnavailable("fake engine is down")
        return EngineStatus(
            query_id="q1",
            uptime_s=12.5,
            running_requests=2,
            queued_requests=1,
            tokens_generated=1234,
            prompt_tokens_processed=5678,
            requests_finished=42,
            prompt_cache_entries=3,
            prompt_cache_bytes=4096,
            prompt_cache_hits=7,
            prompt_cache_hit_tokens=99,
            active_memory_bytes=1 << 20,
            peak_memory_bytes=2 << 20,
            steps=300,
            step_seconds=1.5,
            kv_budget_bytes=1 << 30,
            kv_reserved_bytes=3 << 20,
            kv_bytes_per_token=2048,
            kv_bits=8,
            kv_group_size=64,
            group=self.group,
        )

    def all_closed(self) -> bool:
        return all(s.closed for s in self.streams)


# ---------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "STOP here. END of the story. The end.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 42 and punctuation , . ; : ! ?",
    "Café, naïve, Zürich. 你好，世界。 🙂 🚀",
    "user: hi\nassistant: hello, how can I help?\n",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


THINK_MARKERS = ("<think>", "</think>")


def _with_think_markers(tokenizer_json: str, special: bool) -> str:
    """Qwen 3 holds <think>/</think> as added non-special tokens; ``special`` makes them special."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t in THINK_MARKERS])
    return tok.to_str()


def write_tokenizer_dir(
    path: Path, chat_template: str | None = CHATML_TEMPLATE, *, think_markers: str | None = None
) -> Path:
    """A model directory holding only a byte-level BPE tokenizer (ChatML template).

    ``think_markers``: "added" or "special" adds <think>/</think> as tokens of that kind (a thinking model).
    """
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _tokenizer_json()
    if think_markers is not None:
        tokenizer_json = _with_think_markers(tokenizer_json, special=think_markers == "special")
    (path / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def created_recently(created: int) -> bool:
    return abs(created - time.time()) < 60


def write_spm_tokenizer_dir(path: Path) -> Path:
    """A Llama-2-style tokenizer: "▁" for spaces, byte fallback, the SPM decoder
    that mlx-lm recognises (Replace, ByteFallback, Fuse, Strip)."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    base.train_from_iterator(_CORPUS * 4, trainer=trainer)
    spec = json.loads(base.to_str())
    # Byte tokens <0x00>..<0xFF> right after the specials, as Llama 2 has them.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    spec["model"]["vocab"] = vocab
    spec["model"]["byte_fallback"] = True
    spec["added_tokens"] = [
        {
            "id": i,
            "content": c,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, c in enumerate(["<unk>", "<s>", "</s>"])
    ]
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path
