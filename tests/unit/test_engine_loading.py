"""Model loading: facts announced in the handshake and load progress."""

from __future__ import annotations

import io
import logging

from engine.loading import LoadProgress, load_model


def test_load_model_announces_the_models_facts(tiny_model_dir, tiny_adapter_dir):
    loaded = load_model(str(tiny_model_dir), str(tiny_adapter_dir))
    info = loaded.info
    assert info.model_id == tiny_model_dir.name
    assert info.adapter_path == str(tiny_adapter_dir.resolve())
    assert info.context_length == 4096
    assert info.eos_token_ids == [0, 2]
    assert info.vocab_size == len(loaded.tokenizer)


def test_progress_is_plain_lines_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="engine.loading")
    progress = LoadProgress(1000, stream=io.StringIO())
    for done in range(0, 1001, 50):
        progress.update(done)
    percents = [r.getMessage().split(":")[1].split("%")[0].strip() for r in caplog.records]
    assert percents == [str(p) for p in range(0, 101, 10)]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal():
    out = _Tty()
    progress = LoadProgress(200, stream=out)
    progress.update(100)
    progress.update(200)
    text = out.getvalue()
    assert "\r" in text and " 50%" in text and text.endswith("100%\n")
