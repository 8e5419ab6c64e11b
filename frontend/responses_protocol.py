"""OpenAI Responses requests (``POST /v1/responses``) and how they map to chat's terms.

The input items become chat-template messages, function tools become chat
tools (``frontend.tools``), ``text.format`` becomes a grammar
(``frontend.constraints``) and ``reasoning.effort`` the template's thinking
switch. Nothing is stored: ``previous_response_id`` and item references get
a 400 that says to send the whole conversation (``store`` is accepted).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from frontend.constraints import JSON_OBJECT, schema_constraint
from frontend.errors import APIError, invalid_request, unsupported
from frontend.protocol import logit_bias_ids
from frontend.tools import ToolPlan, plan_tools
from ipc.messages import Constraint, ModelInfo, SamplingParams

_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})
_MEDIA_PARTS = frozenset({"input_image", "input_file", "input_audio"})
_ROLES = frozenset({"user", "system", "developer", "assistant"})
# OpenAI's ``include`` values (its Includable enum); an unknown one is a 400, as there.
Includable = Literal[
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
]
LOGPROBS_INCLUDE = "message.output_text.logprobs"
_SEND_FULL_INPUT = "this server stores no responses: send the whole conversation in input (store is accepted)"


class ResponsesRequest(BaseModel):
    """CreateResponse: the fields we honour, and those we refuse by name."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None  # any value: this server has one model
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool | None = None
    # mlx-server's extension, as in chat (bench.serving bans EOS with it).
    logit_bias: dict[str, float] | None = None
    # "message.output_text.logprobs" turns logprobs on; the other values name what
    # this server never produces (built-in tools' results, encrypted reasoning).
    include: list[Includable] | None = None
    # Accepted without effect: nothing is stored, usage is always reported.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Refused unless harmless (check_supported).
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def check_supported(self) -> None:
        if self.previous_response_id is not None:
            raise unsupported("previous_response_id", _SEND_FULL_INPUT)
        if self.conversation is not None:
            raise unsupported("conversation", _SEND_FULL_INPUT)
        if self.background:
            raise unsupported("background", "background responses are not supported")
        if self.prompt is not None:
            raise unsupported("prompt", "stored prompt templates are not supported: send instructions and input")
        if self.truncation == "auto":
            raise unsupported("truncation", "truncation 'auto' is not supported: the input must fit the context")

    @property
    def engine_logprobs(self) -> int | None:
        """Generate.logprobs: None, or how many top logprobs per token (top_logprobs
        alone asks for them too: its alternatives come with each token's own)."""
        wanted = LOGPROBS_INCLUDE in (self.include or ()) or self.top_logprobs
        return (self.top_logprobs or 0) if wanted else None

    def sampling(self, vocab_size: int) -> SamplingParams:
        given: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "logit_bias": logit_bias_ids(self.logit_bias, vocab_size),
        }
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})

    @property
    def effort(self) -> str | None:
        effort = (self.reasoning or {}).get("effort")
        if effort is not None and not isinstance(effort, str):
            raise invalid_request("reasoning.effort must be a string", param="reasoning.effort")
        return effort

    def template_kwargs(self, template_mentions: Callable[[str], bool]) -> dict[str, Any]:
        """reasoning.effort for a template that takes it as its own variable (gpt-oss)."""
        effort = self.effort
        return {"reasoning_effort": effort} if effort is not None and template_mentions("reasoning_effort") else {}

    def messages(self) -> list[dict[str, Any]]:
        """instructions and input as chat-template messages."""
        head = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*head, {"role": "user", "content": self.input}]
        if not self.input:
            raise invalid_request("input must not be empty", param="input")
        return head + _Conversation().build(self.input)

    # -- tools and the answer's format

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """Function tools in chat's shape; built-in tools are refused by name."""
        if self.tools is None:
            return None
        return [_chat_tool(i, tool) for i, tool in enumerate(self.tools)]

    def chat_tool_choice(self) -> Any:
        choice = self.tool_choice
        if not self.tools and choice in ("auto", "none"):
            return None  # agent clients send "auto" whether or not they have tools this turn
        if choice is None or isinstance(choice, str):
            return choice
        if choice.get("type") == "function":
            return {"type": "function", "function": {"name": choice.get("name")}}
        raise unsupported("tool_choice", f"tool_choice of type {choice.get('type')!r} is not supported")

    def answer_constraint(self) -> Constraint | None:
        """text.format: free text, json_object, or json_schema held by the grammar."""
        fmt = (self.text or {}).get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict):
            raise invalid_request("text.format must be an object", param="text.format")
        kind = fmt.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return JSON_OBJECT
        if kind == "json_schema":
            if not isinstance(fmt.get("name"), str):
                raise invalid_request("text.format.name is required", param="text.format.name")
            return schema_constraint(fmt.get("schema", {}), "text.format.schema")
        raise invalid_request(
            f"text.format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}", param="text.format.type"
        )

    def tool_plan(
        self, model: ModelInfo, marker_token_id: Callable[[str], int | None], answer: Constraint | None
    ) -> ToolPlan:
        """``answer``: text.format's constraint; with "auto" the output is calls or such an answer."""
        return plan_tools(
            self.chat_tools(), self.chat_tool_choice(), self.parallel_tool_calls, model, marker_token_id, answer
        )

    # -- what the response echoes

    def echo_tools(self) -> list[dict[str, Any]]:
        return [
            {
                "type": "function",
                "name": tool["name"],
                "description": tool.get("description"),
                "parameters": tool.get("parameters"),
                "strict": tool.get("strict"),
            }
            for tool in self.tools or []
        ]

    def echo_format(self) -> dict[str, Any]:
        return (self.text or {}).get("format") or {"type": "text"}


def _chat_tool(i: int, tool: dict[str, Any]) -> dict[str, Any]:
    kind = tool.get("type")
    if kind != "function":
        raise unsupported(
            f"tools[{i}]", f"built-in tool {kind!r} is not supported: this server runs only function tools"
        )
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": function}


# ---------------------------------------------------------------- input items


def _name(value: Any) -> str | None:
    """A ``type`` or ``role`` field as a string (anything else matches nothing)."""
    return value if isinstance(value, str) else None


def _text(content: Any, param: str) -> str:
    """A message's content (a string or text parts) as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_request("content must be a string or an array of content parts", param=param)
    texts = []
    for j, part in enumerate(content):
        kind = _name(part.get("type")) if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            raise unsupported(f"{param}[{j}]", f"content parts of type {kind!r} are not supported: text model")
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise invalid_request(f"unknown or malformed content part {kind!r}", param=f"{param}[{j}]")
    return "".join(texts)


class _Conversation:
    """Input items as chat messages: calls join the assistant turn before them,
    a reasoning item goes with the assistant turn after it."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._reasoning = ""  # of the next assistant turn

    def build(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, item in enumerate(items):
            kind = _name(item.get("type", "message"))
            handler = self._HANDLERS.get(kind or "")
            if handler is None:
                raise _unknown_item(kind, f"input[{i}]")
            handler(self, item, f"input[{i}]")
        return self.messages

    def _assistant(self, message: dict[str, Any]) -> dict[str, Any]:
        if self._reasoning:
            message["reasoning_content"] = self._reasoning
            self._reasoning = ""
        self.messages.append(message)
        return message

    def message(self, item: dict[str, Any], param: str) -> None:
        role = _name(item.get("role"))
        if role not in _ROLES:
            raise invalid_request(f"role must be one of {sorted(_ROLES)}, got {role!r}", param=f"{param}.role")
        content = _text(item.get("content"), f"{param}.content")
        if role == "assistant":
            self._assistant({"role": "assistant", "content": content})
        else:
            self.messages.append({"role": "system" if role == "developer" else role, "content": content})

    def function_call(self, item: dict[str, Any], param: str) -> None:
        for field in ("call_id", "name", "arguments"):
            if not isinstance(item.get(field), str):
                raise invalid_request(f"a function_call item needs a string {field!r}", param=f"{param}.{field}")
        try:
            arguments = json.loads(item["arguments"])
        except ValueError:
            raise invalid_request("arguments must be JSON text", param=f"{param}.arguments") from None
        call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": arguments}}
        last = self.messages[-1] if self.messages else None
        if last is not None and last["role"] == "assistant" and not self._reasoning:
            last.setdefault("tool_calls", []).append(call)
        else:
            self._assistant({"role": "assistant", "content": "", "tool_calls": [call]})

    def function_call_output(self, item: dict[str, Any], param: str) -> None:
        if not isinstance(item.get("call_id"), str):
            raise invalid_request("a function_call_output item needs a string 'call_id'", param=f"{param}.call_id")
        output = _text(item.get("output"), f"{param}.output")
        self.messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})

    def reasoning(self, item: dict[str, Any], param: str) -> None:
        parts = item.get("content") or item.get("summary") or []
        self._reasoning += _text(parts, f"{param}.content")

    _HANDLERS: dict[str, Callable[[_Conversation, dict[str, Any], str], None]] = {
        "message": message,
        "function_call": function_call,
        "function_call_output": function_call_output,
        "reasoning": reasoning,
    }


def _unknown_item(kind: Any, param: str) -> APIError:
    if kind == "item_reference":
        return unsupported(param, f"item references need stored responses; {_SEND_FULL_INPUT}")
    return unsupported(f"{param}.type", f"input items of type {kind!r} are not supported")
