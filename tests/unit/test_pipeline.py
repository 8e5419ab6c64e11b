"""The request pipeline on its own: events through an adapter of another wire format (named events, no [DONE])."""

from __future__ import annotations

from collections.abc import Iterable

from frontend import pipeline, sse
from frontend.context import AppContext
from frontend.shapes import Shape
from frontend.tokenization import Tokenization
from ipc.messages import SamplingParams
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import FakeEngineClient, Script


class Note(Shape):
    index: int = 0
    text: str = ""
    reason: str = ""
    output_tokens: int = 0
    message: str = ""


class NamedEvents:
    """An adapter in the style of Anthropic's Messages stream: named events, no terminal [DONE]."""

    def started(self, event: pipeline.Started) -> Iterable[bytes]:
        return [sse.event(Note(index=event.index), name="block_start")]

    def delta(self, event: pipeline.Delta) -> Iterable[bytes]:
        return [sse.event(Note(index=event.index, text=event.piece.text), name="block_delta")]

    def finished(self, event: pipeline.Finished) -> Iterable[bytes]:
        return [sse.event(Note(index=event.index, reason=event.reason), name="block_stop")]

    def completed(self, event: pipeline.Completed) -> Iterable[bytes]:
        return [sse.event(Note(output_tokens=event.usage.completion), name="message_stop")]

    def failed(self, event: pipeline.Failed) -> Iterable[bytes]:
        return [sse.event(Note(message=event.error.message), name="error")]

    def waiting(self, event: pipeline.Waiting) -> Iterable[bytes]:
        return [sse.KEEPALIVE_COMMENT]


def _events(raw: bytes) -> list[tuple[str, str]]:
    out = []
    for block in raw.decode().split("\n\n")[:-1]:
        name, data = block.split("\n")
        out.append((name.removeprefix("event: "), data.removeprefix("data: ")))
    return out


def _generation(engine: FakeEngineClient, tok: Tokenization, n: int) -> pipeline.Generation:
    ctx = AppContext(engine=engine, tokenization=tok, settings=frontend_settings())
    request = pipeline.PipelineRequest(
        prompts=[tok.encode_prompt("Hello")],
        prompt_param="prompt",
        id_prefix="msg",
        sampling=SamplingParams(),
        max_tokens=20,
        n=n,
    )
    return pipeline.start(ctx, pipeline.plan(ctx, request))


def test_named_events_without_done(engine, tok):
    text = tok.hf.encode("Hi there", add_special_tokens=False)
    engine.script(Script(text), Script(text[:1]))
    raw = b"".join(pipeline.encode(_generation(engine, tok, n=2).events(), NamedEvents()))
    events = _events(raw)
    names = [name for name, _ in events]
    assert names[0] == "block_start" and names[-1] == "message_stop"
    assert names.count("block_start") == names.count("block_stop") == 2
    assert b"[DONE]" not in raw
    streamed = "".join(Note.model_validate_json(data).text for name, data in events if name == "block_delta")
    assert streamed == "Hi there" + tok.decode(text[:1])
    assert Note.model_validate_json(events[-1][1]).output_tokens == len(text) + 1
    assert engine.all_closed()


def test_a_failure_after_the_headers_is_the_last_event(engine, tok):
    engine.script(Script(tok.hf.encode("Hi there, how are you", add_special_tokens=False), fail_after=2))
    events = _events(b"".join(pipeline.encode(_generation(engine, tok, n=1).events(), NamedEvents())))
    assert events[-1][0] == "error"
    assert "engine is unavailable" in Note.model_validate_json(events[-1][1]).message
    assert "message_stop" not in [name for name, _ in events]
    assert engine.all_closed()


def test_collect_runs_every_choice_to_its_end(engine, tok):
    engine.script(Script(tok.hf.encode("Hi", add_special_tokens=False)), Script([], finish_reason="length"))
    outcome = _generation(engine, tok, n=2).collect()
    assert [(c.index, c.text, c.finish_reason) for c in outcome.choices] == [(0, "Hi", "stop"), (1, "", "length")]
    assert outcome.usage.prompt == len(tok.encode_prompt("Hello"))  # counted once for both choices
    assert engine.all_closed()


class BrokenDeltas(NamedEvents):
    def delta(self, event: pipeline.Delta) -> Iterable[bytes]:
        raise ValueError("a chunk its own schema refuses")


def test_a_wire_format_failing_on_an_event_ends_with_its_error_event(engine, tok):
    engine.script(Script(tok.hf.encode("Hi there", add_special_tokens=False)))
    events = _events(b"".join(pipeline.encode(_generation(engine, tok, n=1).events(), BrokenDeltas())))
    assert [name for name, _ in events] == ["block_start", "error"]
    assert Note.model_validate_json(events[-1][1]).message == "internal server error"
    assert engine.all_closed()
