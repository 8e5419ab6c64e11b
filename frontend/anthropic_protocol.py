"""Anthropic Messages request models (the responses: ``frontend.anthropic_shapes``).

Requests are validated strictly but ignore unknown fields, as Anthropic-compatible
servers do. Fields of the published API that change nothing we must honour are
accepted (``cache_control``, ``service_tier``, ``context_management``, ``speed``, ...);
what would change the answer and cannot be done here (images, documents,
server-side tools, MCP servers, containers) is a 400 naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from frontend.constraints import schema_constraint
from frontend.errors import APIError, invalid_request, unsupported
from frontend.protocol import logit_bias_ids, top_k_param
from frontend.tools import ToolPlan, plan_tools
from ipc.messages import Constraint, ModelInfo, SamplingParams

# Blocks of earlier turns that carry only the model's own opaque state: left out of the prompt.
_DROPPED_BLOCKS = frozenset({"redacted_thinking"})
# Blocks that would change the answer and a text model cannot take.
_MEDIA_BLOCKS = frozenset({"image", "document", "search_result", "container_upload"})
# Anthropic's tool_choice types -> OpenAI's (what plan_tools takes).
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
# Thinking config types -> the template's thinking switch.
_THINKING = {"enabled": True, "adaptive": True, "disabled": False}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class AnthropicMessage(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]  # blocks checked by template_messages (400 naming the block)


class MessagesInput(_Strict):
    """What a prompt is made of: shared by /v1/messages and /v1/messages/count_tokens."""

    model: str | None = None  # any value: this server has one model
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    # Refused when set: they need server-side execution this server does not have.
    mcp_servers: list[Any] | None = None
    container: Any = None

    def check_supported(self) -> None:
        if self.mcp_servers:
            raise unsupported("mcp_servers", "MCP servers (mcp_servers) are not supported: run the tools client-side")
        if self.container is not None:
            raise unsupported("container", "containers (code execution) are not supported")

    def thinking_enabled(self) -> bool | None:
        """The template's thinking switch, or None to leave the template's default."""
        if self.thinking is None:
            return None
        kind = _type_of(self.thinking)
        if kind not in _THINKING:
            raise invalid_request(
                f"thinking.type must be one of {', '.join(_THINKING)}, got {kind!r}", param="thinking.type"
            )
        return _THINKING[kind]

    def answer_constraint(self) -> Constraint | None:
        """output_config.format (json_schema), enforced by the grammar as chat's response_format."""
        fmt = (self.output_config or {}).get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise invalid_request("output_config.format.type must be 'json_schema'", param="output_config.format")
        return schema_constraint(fmt.get("schema"), "output_config.format.schema")

    def tool_plan(self, model: ModelInfo, marker_token_id: Callable[[str], int | None]) -> ToolPlan:
        choice, parallel = _tool_choice(self.tool_choice)
        try:
            return plan_tools(
                _openai_tools(self.tools or []), choice, parallel, model, marker_token_id, self.answer_constraint()
            )
        except APIError as exc:
            exc.param = _anthropic_param(exc.param)
            raise

    def template_messages(self) -> list[dict[str, Any]]:
        """System and messages as chat templates expect them (OpenAI's roles)."""
        out: list[dict[str, Any]] = []
        if self.system:
            out.append({"role": "system", "content": _system_text(self.system)})
        for i, message in enumerate(self.messages):
            out += _template_messages(i, message)
        if not out or out[-1]["role"] == "system":
            raise invalid_request("the messages have no content", param="messages")
        return out


class MessagesRequest(MessagesInput):
    max_tokens: int = Field(ge=1)  # required, as Anthropic requires it
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    # mlx-server's extension, as in chat (bench.serving bans EOS with it).
    logit_bias: dict[str, float] | None = None
    metadata: dict[str, Any] | None = None  # user_id: bookkeeping only
    stream: bool | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = tuple(self.stop_sequences or ())
        if any(s == "" for s in stops):
            raise invalid_request("stop_sequences must not contain empty strings", param="stop_sequences")
        return stops

    def sampling(self, vocab_size: int) -> SamplingParams:
        """Wire sampling parameters; omitted fields keep the wire defaults."""
        given: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": None if self.top_k is None else top_k_param(self.top_k, vocab_size),
            "logit_bias": logit_bias_ids(self.logit_bias, vocab_size),
        }
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})


class CountTokensRequest(MessagesInput):
    pass


# ---------------------------------------------------------------- tools


def _tool_choice(tool_choice: dict[str, Any] | None) -> tuple[Any, bool | None]:
    """(OpenAI's tool_choice, parallel_tool_calls) for plan_tools."""
    if tool_choice is None:
        return None, None
    kind = _type_of(tool_choice)
    parallel = False if tool_choice.get("disable_parallel_tool_use") is True else None
    if kind == "tool":
        name = tool_choice.get("name")
        if not isinstance(name, str):
            raise invalid_request("tool_choice.name is required with type 'tool'", param="tool_choice.name")
        return {"type": "function", "function": {"name": name}}, parallel
    if kind not in _TOOL_CHOICES:
        raise invalid_request(
            f"tool_choice.type must be 'auto', 'any', 'tool' or 'none', got {kind!r}", param="tool_choice.type"
        )
    return _TOOL_CHOICES[kind], parallel


# plan_tools names OpenAI's fields; the client sent Anthropic's.
_PARAM_NAMES = ((".function.parameters", ".input_schema"), (".function.", "."), (".function", ""))


def _anthropic_param(param: str | None) -> str | None:
    for openai_name, anthropic_name in _PARAM_NAMES:
        if param is not None and openai_name in param:
            return param.replace(openai_name, anthropic_name)
    return param


def _openai_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic custom tools as OpenAI function tools (what templates and plan_tools take)."""
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise unsupported(
                f"tools[{i}]", f"tools of type {kind!r} (Anthropic-defined or server tools) are not supported"
            )
        if "input_schema" not in tool:
            raise invalid_request("a tool needs an input_schema", param=f"tools[{i}].input_schema")
        function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


# ---------------------------------------------------------------- messages


def _system_text(system: str | list[dict[str, Any]]) -> str:
    if isinstance(system, str):
        return system
    return "\n".join(_text_of(block, f"system[{j}]") for j, block in enumerate(system))


def _type_of(block: Any) -> str | None:
    kind = block.get("type") if isinstance(block, dict) else None
    return kind if isinstance(kind, str) else None


def _text_of(block: Any, param: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
        raise _block_problem(block, param, "only text blocks are allowed here")
    return str(block["text"])


def _block_problem(block: Any, param: str, otherwise: str) -> APIError:
    kind = _type_of(block)
    if kind in _MEDIA_BLOCKS:
        return unsupported(param, f"content blocks of type {kind!r} are not supported: this server serves a text model")
    return invalid_request(f"{otherwise}; got a block of type {kind!r}", param=param)


def _tool_result_text(block: dict[str, Any], param: str) -> str:
    content = block.get("content", "")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "\n".join(_text_of(part, f"{param}.content[{k}]") for k, part in enumerate(content))
    else:
        raise invalid_request("tool_result content must be a string or text blocks", param=f"{param}.content")
    # The template has no error flag: the text says it.
    return f"Error: {text}" if block.get("is_error") else text


class _Turn:
    """One Anthropic message's blocks gathered into chat-template messages."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.out: list[dict[str, Any]] = []
        self.texts: list[str] = []
        self.thinking: list[str] = []
        self.calls: list[dict[str, Any]] = []

    def flush_text(self) -> None:
        # A user's text after tool results is a new user message (templates render tool results apart).
        if self.role == "user" and self.texts:
            self.out.append({"role": "user", "content": "\n".join(self.texts)})
            self.texts = []

    def messages(self) -> list[dict[str, Any]]:
        if self.role == "user":
            self.flush_text()
            return self.out
        message: dict[str, Any] = {"role": "assistant", "content": "\n".join(self.texts)}
        if self.thinking:
            message["reasoning_content"] = "\n".join(self.thinking)
        if self.calls:
            message["tool_calls"] = self.calls
        return [message]


def _add_block(turn: _Turn, block: Any, param: str) -> None:
    kind = _type_of(block)
    if kind == "text" and isinstance(block.get("text"), str):
        turn.texts.append(block["text"])
    elif kind == "tool_result" and turn.role == "user" and isinstance(block.get("tool_use_id"), str):
        turn.flush_text()
        content = _tool_result_text(block, param)
        turn.out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": content})
    elif kind == "tool_use" and turn.role == "assistant" and isinstance(block.get("input"), dict):
        function = {"name": block.get("name"), "arguments": block["input"]}
        turn.calls.append({"id": block.get("id"), "type": "function", "function": function})
    elif kind == "thinking" and turn.role == "assistant" and isinstance(block.get("thinking"), str):
        turn.thinking.append(block["thinking"])
    elif kind not in _DROPPED_BLOCKS:
        raise _block_problem(block, param, f"not a valid {turn.role} content block")


def _template_messages(i: int, message: AnthropicMessage) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    turn = _Turn(message.role)
    for j, block in enumerate(message.content):
        _add_block(turn, block, f"messages[{i}].content[{j}]")
    return turn.messages()


def tool_use_input(arguments: str) -> dict[str, Any]:
    """A parsed call's JSON arguments as tool_use ``input`` (an object)."""
    value = json.loads(arguments)
    return value if isinstance(value, dict) else {"value": value}
