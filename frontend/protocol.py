"""OpenAI request models we accept (the responses: ``frontend.openai_shapes``).

Requests are validated strictly (a string is not a number) but ignore unknown
fields, as OpenAI-compatible servers do. Fields OpenAI defines that we cannot
honour yet are refused with 400 naming the field (``unsupported_problem``):
never a silently ignored field we claim to support (DESIGN rule 4).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

from frontend.constraints import response_format_constraint
from frontend.errors import APIError, invalid_request, unsupported
from frontend.logprobs import MAX_CHAT_TOP_LOGPROBS, MAX_COMPLETION_LOGPROBS
from frontend.tools import ToolPlan, plan_tools
from ipc.messages import Constraint, ModelInfo, SamplingParams

# OpenAI's own limits.
MAX_STOP_SEQUENCES = 4
LOGIT_BIAS_LIMIT = 100.0
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# mlx's PRNG keys are unsigned 64-bit; OpenAI seeds are signed 64-bit.
SEED_MODULUS = 2**64


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---------------------------------------------------------------- what /openapi.json adds
# Rules checked in code (with a 400 naming the field) that the document
# states too, so that a client or a fuzzer generating from it sends what we accept.


def _object(*required: str, **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": properties}


_NAME: dict[str, Any] = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
_ONLY_WITH: dict[str, Any] = {
    "stream_options": _object("stream", stream={"const": True}),
    "top_logprobs": _object("logprobs", logprobs={"const": True}),
}
_RESPONSE_FORMAT_DOC: dict[str, Any] = {
    "oneOf": [
        {"type": "null"},
        _object("type", type={"enum": ["text", "json_object"]}),
        _object(
            "type",
            "json_schema",
            type={"const": "json_schema"},
            json_schema=_object("name", name=_NAME, strict={"type": "boolean"}, schema={"type": "object"}),
        ),
    ]
}
_LOGIT_BIAS_DOC: dict[str, Any] = {
    "propertyNames": {"pattern": "^[0-9]+$"},
    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
}
_FUNCTION: dict[str, Any] = _object(
    "name", name=_NAME, description={"type": "string"}, parameters={"type": "object"}, strict={"type": "boolean"}
)
_TOOLS_DOC: dict[str, Any] = {"items": _object("type", "function", type={"const": "function"}, function=_FUNCTION)}
_TOOL_CHOICE_DOC: dict[str, Any] = {
    "anyOf": [
        {"type": "null"},
        {"enum": ["none", "auto", "required"]},
        _object("type", "function", type={"const": "function"}, function=_object("name", name=_NAME)),
    ]
}


class StreamOptions(_Strict):
    include_usage: bool | None = None


# ---------------------------------------------------------------- chat messages
# One model per role, with the fields OpenAI's schema requires of that role;
# content parts stay dicts, checked by _check_content (400 naming the part).


class TextContentPart(BaseModel):
    """The one kind of content part this text model takes (the document's view)."""

    type: Literal["text", "input_text"]
    text: str


_ContentInput = str | Annotated[list[TextContentPart], Field(min_length=1)]


def _content_shape(value: Any) -> str | list[dict[str, Any]]:
    """One message for any wrong content (a pydantic union would report its first member's complaint)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(part, dict) for part in value):
        return value
    raise ValueError("content must be a string or a non-empty array of content parts")


Content = Annotated[Any, PlainValidator(_content_shape, json_schema_input_type=_ContentInput)]


class _Message(_Strict):
    # Extra keys (reasoning_content, ...) go to the chat template untouched,
    # as mlx_lm.server passes message dicts.
    model_config = ConfigDict(strict=True, extra="allow")

    name: str | None = None


class ChatSystemMessage(_Message):
    role: Literal["system"]
    content: Content


class ChatDeveloperMessage(_Message):
    role: Literal["developer"]
    content: Content


class ChatUserMessage(_Message):
    role: Literal["user"]
    content: Content


class MessageFunctionCall(_Strict):
    name: str
    arguments: str  # JSON text


class MessageToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: MessageFunctionCall


class ChatAssistantMessage(_Message):
    model_config = ConfigDict(
        strict=True,
        extra="allow",
        json_schema_extra={
            "anyOf": [
                {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                {"required": ["tool_calls"], "properties": {"tool_calls": {"minItems": 1}}},
            ]
        },
    )

    role: Literal["assistant"]
    content: Content | None = None  # null only with tool_calls (checked in check_supported)
    refusal: str | None = None
    tool_calls: list[MessageToolCall] | None = None


class ChatToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


ChatMessage = Annotated[
    ChatSystemMessage | ChatDeveloperMessage | ChatUserMessage | ChatAssistantMessage | ChatToolMessage,
    Field(discriminator="role"),
]


class _GenerationRequest(_Strict):
    """Fields shared by chat completions and completions."""

    model: str | None = None  # any value: this server has one model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off (vLLM uses -1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra=_LOGIT_BIAS_DOC)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # text, json_object or json_schema (enforced by the engine's grammar mask).
    # Completions take it too (as vLLM does).
    response_format: dict[str, Any] | None = Field(None, json_schema_extra=_RESPONSE_FORMAT_DOC)

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise invalid_request(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop")
        if any(s == "" for s in stops):
            raise invalid_request("stop sequences must not be empty strings", param="stop")
        return tuple(stops)

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise invalid_request("stream_options is only allowed when stream is true", param="stream_options")

    def response_constraint(self) -> Constraint | None:
        """The grammar response_format asks for (400 if it cannot be enforced)."""
        return response_format_constraint(self.response_format)

    def sampling(self, vocab_size: int) -> SamplingParams:
        """Wire sampling parameters; omitted fields keep the wire defaults."""
        given: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": None if self.top_k is None else top_k_param(self.top_k, vocab_size),
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": logit_bias_ids(self.logit_bias, vocab_size),
            "seed": None if self.seed is None else self.seed % SEED_MODULUS,
        }
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})


def top_k_param(top_k: int, vocab_size: int) -> int:
    # 0 is off; so is keeping the whole vocabulary or more (mlx-lm refuses top_k >= vocab_size).
    return top_k if 0 < top_k < vocab_size else 0


def logit_bias_ids(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise invalid_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise invalid_request(
                f"logit_bias token id {token_id} is outside the vocabulary (0..{vocab_size - 1})", param="logit_bias"
            )
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise invalid_request(
                f"logit_bias values must be between -100 and 100, got {value} for token {token_id}",
                param="logit_bias",
            )
        out[token_id] = float(value)
    return out


# ---------------------------------------------------------------- unsupported fields

# field -> (is the value something we cannot honour?, what to tell the client)
_Check = tuple[Callable[[Any], bool], str]

_CHAT_UNSUPPORTED: dict[str, _Check] = {
    "functions": (lambda v: bool(v), "functions (deprecated) are not supported: use tools"),
    "function_call": (
        lambda v: v not in (None, "none", "auto"),
        "function_call (deprecated) is not supported: use tool_choice",
    ),
    "audio": (lambda v: v is not None, "audio output is not supported"),
    "modalities": (lambda v: v not in (None, ["text"]), 'only modalities ["text"] is supported'),
    "prediction": (lambda v: v is not None, "predicted outputs (prediction) are not supported"),
    "web_search_options": (lambda v: v is not None, "web search is not supported"),
    "moderation": (lambda v: v is not None, "moderation is not supported"),
}
# OpenAI fields accepted and without effect here (hints, bookkeeping):
# metadata, store (nothing is stored), service_tier, prompt_cache_key,
# prompt_cache_options, prompt_cache_retention (the prefix cache is automatic),
# safety_identifier, user.

# Fields a chat template may take as variables (gpt-oss's reasoning_effort, ...):
# honoured when the model's template uses them, refused otherwise.
TEMPLATE_VARIABLE_FIELDS = ("reasoning_effort", "verbosity")

_COMPLETION_UNSUPPORTED: dict[str, _Check] = {
    "suffix": (lambda v: bool(v), "suffix (insertion) is not supported"),
}

_TEXT_PART_TYPES = frozenset({"text", "input_text"})
_MEDIA_PART_TYPES = frozenset({"image_url", "input_image", "image", "input_audio", "audio", "file", "input_file"})


def _first_unsupported(extra: dict[str, Any], table: dict[str, _Check]) -> APIError | None:
    for field_name, (is_unsupported, message) in table.items():
        if is_unsupported(extra.get(field_name)):
            return unsupported(field_name, message)
    return None


# ---------------------------------------------------------------- chat completions


class ChatCompletionRequest(_GenerationRequest):
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={"dependentSchemas": _ONLY_WITH})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # mlx_lm.server / vLLM extension: extra variables for the chat template.
    chat_template_kwargs: dict[str, Any] | None = None
    # Checked against _CHAT_UNSUPPORTED; typed loosely so the check, not a
    # type error, tells the client what is wrong.
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    # Checked by frontend.tools.plan_tools (each tool, each choice, with a param path).
    tools: list[Any] | None = Field(None, json_schema_extra=_TOOLS_DOC)
    tool_choice: Any = Field(None, json_schema_extra=_TOOL_CHOICE_DOC)
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = Field(None, json_schema_extra={"items": {"const": "text"}})
    prediction: Any = None
    web_search_options: Any = None
    moderation: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is the current name; max_tokens the deprecated one.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        """Generate.logprobs: None, or how many top logprobs per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self) -> None:
        self.check_common()
        problem = _first_unsupported(dict(self), _CHAT_UNSUPPORTED)
        if problem is not None:
            raise problem
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        for i, message in enumerate(self.messages):
            if isinstance(message, ChatAssistantMessage) and message.content is None and not message.tool_calls:
                raise invalid_request(
                    "an assistant message needs content unless it has tool_calls", param=f"messages[{i}].content"
                )
            _check_content(i, message.content)

    def tool_plan(self, model: ModelInfo, marker_token_id: Callable[[str], int | None]) -> ToolPlan:
        return plan_tools(
            self.tools, self.tool_choice, self.parallel_tool_calls, model, marker_token_id, self.response_constraint()
        )

    def constraint(self, plan: ToolPlan) -> Constraint | None:
        """The grammar for this request: tool calls (forced, or calls-or-answer), else response_format."""
        return plan.constraint or self.response_constraint()

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as chat templates expect them (mlx_lm.server.process_message_content)."""
        return [_template_message(i, m) for i, m in enumerate(self.messages)]


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Chat messages checked (text parts only) and as chat templates expect them."""
    for i, message in enumerate(messages):
        _check_content(i, message.content)
    return [_template_message(i, m) for i, m in enumerate(messages)]


def _check_content(i: int, content: str | list[dict[str, Any]] | None) -> None:
    if not isinstance(content, list):
        return
    for j, part in enumerate(content):
        kind = part.get("type")
        param = f"messages[{i}].content[{j}]"
        if kind in _TEXT_PART_TYPES:
            if not isinstance(part.get("text"), str):
                raise invalid_request("a text content part needs a string 'text'", param=param)
        elif kind in _MEDIA_PART_TYPES:
            raise unsupported(
                param, f"content parts of type {kind!r} are not supported: this server serves a text model"
            )
        else:
            raise invalid_request(f"unknown content part type {kind!r}", param=param)


def _template_message(i: int, message: ChatMessage) -> dict[str, Any]:
    out = message.model_dump(exclude_none=True)
    # OpenAI's "developer" messages are the newer name for system messages;
    # templates know "system" (some raise on roles they do not know).
    if out["role"] == "developer":
        out["role"] = "system"
    content = message.content
    if isinstance(content, list):
        content = "".join(part["text"] for part in content)
    out["content"] = content or ""
    if out.get("tool_calls"):
        out["tool_calls"] = [_parsed_tool_call(i, j, call) for j, call in enumerate(out["tool_calls"])]
    return out


def _parsed_tool_call(i: int, j: int, call: dict[str, Any]) -> dict[str, Any]:
    """Templates iterate over arguments as a mapping; OpenAI sends a JSON string."""
    function = call["function"]
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        raise invalid_request(
            "tool call arguments must be a JSON string", param=f"messages[{i}].tool_calls[{j}].function.arguments"
        ) from None
    return {**call, "function": {**function, "arguments": arguments}}


# ---------------------------------------------------------------- completions

PromptInput = str | list[str] | list[int] | list[list[int]]
_Text = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# What the document says of prompts: nothing empty, token ids from 0.
_PromptDoc = (
    _Text | Annotated[list[_Text], Field(min_length=1)] | _TokenIds | Annotated[list[_TokenIds], Field(min_length=1)]
)
_PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


def _prompt_shape(value: Any) -> PromptInput:
    """OpenAI's four prompt forms, with one clear message for anything else
    (a pydantic union would report its first member's complaint)."""
    if isinstance(value, str) or _is_token_list(value):
        return value
    if isinstance(value, list) and (all(isinstance(p, str) for p in value) or all(_is_token_list(p) for p in value)):
        return value
    raise ValueError(f"prompt must be {_PROMPT_SHAPES}")


class CompletionRequest(_GenerationRequest):
    model_config = ConfigDict(
        strict=True,
        extra="ignore",
        json_schema_extra={"dependentSchemas": {"stream_options": _ONLY_WITH["stream_options"]}},
    )

    prompt: Annotated[Any, PlainValidator(_prompt_shape, json_schema_input_type=_PromptDoc)]
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None

    def check_supported(self) -> None:
        self.check_common()
        problem = _first_unsupported(dict(self), _COMPLETION_UNSUPPORTED)
        if problem is not None:
            raise problem
        # best_of == n returns all n candidates: the same as plain n.
        if self.best_of not in (None, 1, self.choices_per_prompt):
            raise unsupported("best_of", "best_of other than n is not supported")
        if self.stream and self.best_of not in (None, 1):
            raise invalid_request("best_of cannot be used with stream", param="best_of")
        if self.echo and self.logprobs is not None:
            # The prompt's logprobs would need the prefill's logits, which the engine does not keep.
            raise unsupported("logprobs", "logprobs together with echo (prompt logprobs) are not supported")

    def prompt_items(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise invalid_request("prompt must not be an empty list", param="prompt")
        if isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]
