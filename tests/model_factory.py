"""Deterministic models for tests and benchmarks.

No model hub is reachable, so the tests build their own: a real mlx-lm
architecture (llama) with seeded random weights, a byte-level BPE tokenizer
trained with `tokenizers` on a built-in English corpus, a ChatML chat template
and eos ids in config.json. The directory is what `mlx_lm.load` and
`transformers.AutoTokenizer.from_pretrained` expect from a Hugging Face repo.

Same arguments -> byte-identical files, so tests can compare outputs across
runs. Only numpy, tokenizers and safetensors are used here (no mlx), which
keeps a build well under a second for the "tiny" size.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes the ids: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2 (as SmolLM2).
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
TARGET_VOCAB_SIZE = 1024
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# How a tokenizer holds the tool-call markers: "text" (BPE pieces, the trained
# vocabulary as is), "added" (added non-special tokens: Qwen 2.5/3, Hermes) or
# "special" (added special tokens, skipped by skip_special_tokens).
TOOL_MARKER_KINDS = ("text", "added", "special")
# Thinking models (Qwen 3, DeepSeek-R1 distills) hold these as added non-special tokens.
THINK_START = "<think>"
THINK_END = "</think>"
MAX_POSITION_EMBEDDINGS = 4096

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
    # One layer: a prefill chunk only fills the KV cache (mlx evaluates attention for the last
    # chunk alone), so a 64k-token prompt is answered in seconds on a CPU.
    "long": ModelSize(hidden=16, layers=1, heads=1, kv_heads=1, intermediate=32),
    # ~34M parameters: enough compute per token to make benchmarks meaningful.
    "bench": ModelSize(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=2176),
}

# --- corpus -----------------------------------------------------------------

_PARAGRAPHS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter.
Every morning they walked down to the harbour, checked the nets, and talked about the weather.
"Will it rain today?" she asked. "Perhaps," he answered, "but the wind is from the west, so we'll see."

Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of Spain.
Rome, Lisbon, Vienna and Prague are old cities with museums, bridges, churches and busy markets.
The river flows through the city; people cross it on foot, by bicycle, by bus or by train.

Machine learning models learn patterns from data. A language model predicts the next token,
one step at a time, given all the tokens that came before it. Training needs many examples,
careful evaluation, and a lot of patience. Inference should be fast, cheap and reliable.
A server accepts requests, queues them, runs the model in batches, and streams the answers back.

def add(a, b):
    return a + b

for i in range(10):
    print(i, i * i)

{"name": "example", "values": [1, 2, 3], "enabled": true, "ratio": 0.75}
SELECT id, name FROM users WHERE age > 21 ORDER BY name;

user: Hello! How are you today?
assistant: I am fine, thank you. How can I help you?
user: What is the weather like in London?
assistant: I cannot check the weather, but London is often cloudy and mild.
system: You are a helpful assistant. Answer briefly and politely.

Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2025 3.14159 -17 +5 50% $20 #7 @home
Punctuation: , . ; : ! ? ' " ( ) [ ] { } < > / \\ | - _ = + * & ^ % $ # @ ~ `
Café, naïve, résumé, jalapeño, Zürich, São Paulo, Kraków. 你好，世界。 こんにちは 🙂 🚀
"""

_SUBJECTS = (
    "the teacher",
    "a small robot",
    "my neighbour",
    "the old cat",
    "every student",
    "the engineer",
    "a tired traveller",
    "our team",
    "the computer",
    "a young girl",
)
_VERBS = (
    "reads",
    "writes",
    "builds",
    "finds",
    "likes",
    "paints",
    "explains",
    "remembers",
    "carries",
    "opens",
    "watches",
    "answers",
)
_OBJECTS = (
    "a long letter",
    "the red book",
    "a simple program",
    "three green apples",
    "the morning news",
    "a difficult question",
    "the wooden door",
    "an old map",
    "the final report",
    "a quiet song",
    "twelve small boxes",
    "the blue river",
)
_ENDINGS = (
    "in the morning.",
    "after lunch.",
    "before the storm.",
    "with great care.",
    "every Sunday.",
    "without a word.",
    "at the station.",
    "near the window.",
    "for the first time.",
    "because it was late.",
)


def _corpus() -> list[str]:
    """A fixed corpus (~12 KB): hand-written paragraphs plus seeded sentences."""
    rng = random.Random(1234)  # Random(int).choice is stable across Python versions
    sentences = [
        " ".join((rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_ENDINGS))).capitalize()
        for _ in range(200)
    ]
    lines = _PARAGRAPHS.splitlines()
    return lines + [" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4)]


def _with_think_markers(tokenizer_json: str) -> str:
    """The tokenizer with <think>/</think> as added tokens (ids after the vocabulary and tool markers)."""
    tok = Tokenizer.from_str(tokenizer_json)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
    return tok.to_str(pretty=True)


def _with_tool_markers(tokenizer_json: str, kind: str, markers: Sequence[str]) -> str:
    """The tokenizer with the tool-call markers as ``kind`` says (ids follow the vocabulary)."""
    if kind not in TOOL_MARKER_KINDS:
        raise ValueError(f"unknown tool marker kind {kind!r}; expected one of {TOOL_MARKER_KINDS}")
    if kind == "text":
        return tokenizer_json
    tok = Tokenizer.from_str(tokenizer_json)
    special = kind == "special"
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t in markers])
    return tok.to_str(pretty=True)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; training is deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # ByteLevel decoder: mlx-lm then picks its BPEStreamingDetokenizer.
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str(pretty=True)


def _tokenizer_config(chat_template: str = CHATML_TEMPLATE, context: int = MAX_POSITION_EMBEDDINGS) -> dict:
    return {
        # PreTrainedTokenizerFast = "use tokenizer.json as is" in transformers 4 and 5
        # (a GPT2Tokenizer class would rebuild the pipeline in transformers 5).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context,
        "chat_template": chat_template,
    }


# --- weights ----------------------------------------------------------------


def llama_weight_shapes(
    *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, tied_embeddings: bool
) -> dict[str, tuple[int, ...]]:
    """Hugging Face llama tensor names, exactly as mlx_lm.models.llama expects
    (no lm_head when the embeddings are tied). Also bench/gpu_model.py's."""
    h, kv, ff = hidden, kv_heads * (hidden // heads), intermediate
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not tied_embeddings:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (h, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.mlp.gate_proj.weight": (ff, h),
            f"{p}.mlp.up_proj.weight": (ff, h),
            f"{p}.mlp.down_proj.weight": (h, ff),
        }
    return shapes


def _weight_shapes(size: ModelSize, vocab: int, architecture: str = "llama") -> dict[str, tuple[int, ...]]:
    shapes = llama_weight_shapes(
        hidden=size.hidden, layers=size.layers, heads=size.heads, kv_heads=size.kv_heads,
        intermediate=size.intermediate, vocab=vocab, tied_embeddings=False,
    )  # fmt: skip
    return with_qwen2_biases(shapes) if architecture == "qwen2" else shapes


def with_qwen2_biases(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Qwen2's layout: llama's plus biases on the q, k and v projections. Also bench/gpu_model.py's."""
    biases = {
        name.removesuffix("weight") + "bias": dims[:1]
        for name, dims in shapes.items()
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))
    }
    return shapes | biases


def _random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    # Unit-variance embeddings and 1/sqrt(fan_in) projections keep activations
    # O(1), so greedy output depends on the prompt instead of repeating one token.
    rng = np.random.default_rng(seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shape, dtype=np.float32)
            continue
        # Biases: small, so they shift activations without dominating them.
        std = 1.0 if "embed_tokens" in name else 0.1 if name.endswith(".bias") else shape[-1] ** -0.5
        weights[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return weights


# architecture -> (Hugging Face class, mlx-lm model_type). qwen2 shards both
# ways in mlx-lm (model.shard and PipelineMixin), llama only by tensor.
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}


def _model_config(
    size: ModelSize, vocab: int, eos_ids: list[int], context: int = MAX_POSITION_EMBEDDINGS, architecture: str = "llama"
) -> dict:
    hf_class, model_type = ARCHITECTURES[architecture]
    return {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": size.hidden,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "intermediate_size": size.intermediate,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": context,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": eos_ids,
        "pad_token_id": eos_ids[-1],
        "torch_dtype": "float32",
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_model(
    out_dir: Path,
    size: str = "tiny",
    seed: int = 0,
    chat_template: str | None = None,
    tool_markers: str = "text",
    thinking: bool = False,
    markers: Sequence[str] = (TOOL_CALL_START, TOOL_CALL_END),
    eos_markers: Sequence[str] = (),
    context: int = MAX_POSITION_EMBEDDINGS,
    architecture: str = "llama",
) -> Path:
    """Write a deterministic model directory for `mlx_lm.load`; return it.

    `size` is "tiny" (hidden 64, 2 layers; builds in well under a second),
    "long" (one layer, for 64k-token prompts) or "bench" (~34M parameters). Weights are float32 and depend only on `seed`.
    `chat_template`: another template than ChatML (e.g. one that renders tools).
    `tool_markers`: how the tokenizer holds ``<tool_call>``/``</tool_call>``
    (one of TOOL_MARKER_KINDS); ``markers``: which texts are the markers
    (a format's tool-call or Harmony tokens); ``eos_markers``: those of them
    that end the output too (Harmony's ``<|call|>``, ``<|return|>``).
    ``context``: max_position_embeddings (64k for long-prompt tests).
    `thinking`: add ``<think>``/``</think>`` as added tokens, which makes it a
    thinking model to mlx-lm and to the server (pair it with a template of
    tests/thinking_template.py).
    `architecture`: "llama" or "qwen2" (llama's weights plus q/k/v biases;
    for sharded engines in pipeline mode, which llama lacks in mlx-lm).
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer_json = _with_tool_markers(_tokenizer_json(), tool_markers, markers)
    if thinking:
        tokenizer_json = _with_think_markers(tokenizer_json)
    tok = Tokenizer.from_str(tokenizer_json)
    vocab = tok.get_vocab_size()
    eos_ids = [tok.token_to_id(IM_END), tok.token_to_id(ENDOFTEXT), *(tok.token_to_id(m) for m in eos_markers)]

    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(chat_template or CHATML_TEMPLATE, context))
    _write_json(out_dir / "config.json", _model_config(SIZES[size], vocab, eos_ids, context, architecture))
    weights = _random_weights(_weight_shapes(SIZES[size], vocab, architecture), seed)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "mlx"})
    return out_dir


# --- LoRA adapter ------------------------------------------------------------

LORA_KEYS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
LORA_RANK = 4
LORA_SCALE = 2.0


def build_lora_adapter(model_dir: Path, out_dir: Path, seed: int = 1) -> Path:
    """Write an mlx-lm LoRA adapter for the model in `model_dir`; return its dir.

    Tensor names and shapes follow mlx_lm.tuner (LoRALinear: lora_a is
    (input_dims, rank), lora_b is (rank, output_dims)). lora_b is non-zero
    (unlike a fresh adapter) so the adapter visibly changes greedy output.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    hidden = config["hidden_size"]
    kv = config["num_key_value_heads"] * (hidden // config["num_attention_heads"])
    dims = {  # key -> (input_dims, output_dims)
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, kv),
        "mlp.down_proj": (config["intermediate_size"], hidden),
    }
    layers = config["num_hidden_layers"]
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for i in range(layers):
        for key in LORA_KEYS:
            d_in, d_out = dims[key]
            p = f"model.layers.{i}.{key}"
            weights[f"{p}.lora_a"] = rng.standard_normal((d_in, LORA_RANK), dtype=np.float32) * np.float32(d_in**-0.5)
            weights[f"{p}.lora_b"] = rng.standard_normal((LORA_RANK, d_out), dtype=np.float32) * np.float32(
                LORA_RANK**-0.5
            )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(
        out_dir / "adapter_config.json",
        {
            "fine_tune_type": "lora",
            "num_layers": layers,
            "lora_parameters": {
                "rank": LORA_RANK,
                "scale": LORA_SCALE,
                "dropout": 0.0,
                "keys": list(LORA_KEYS),
            },
        },
    )
    save_file(weights, str(out_dir / "adapters.safetensors"), metadata={"format": "mlx"})
    return out_dir
