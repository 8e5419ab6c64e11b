"""Chat templates that render tools: ChatML the Hermes / Qwen2.5 way, and one per tool-call format.

mlx-lm infers its "json_tools" parser from it (the template names
``<tool_call>`` and ``tool_call.name``): calls are written as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.
"""

from __future__ import annotations

from dataclasses import dataclass

TOOLS_CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') }}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- set tool_call = tool_call.function or tool_call %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _chatml_with_tools(preamble: str, call: str) -> str:
    """ChatML whose system message describes calls with ``preamble`` (the text mlx-lm infers the
    parser from) and whose assistant turns write each earlier call with ``call`` (Jinja, ``tool_call``)."""
    return (
        "{%- if tools %}"
        "{{- '<|im_start|>system\\n' }}"
        "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
        "{{- '# Tools\\n' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
        "{{- " + repr("\n\n" + preamble) + " + '<|im_end|>\\n' }}"
        "{%- elif messages[0].role == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message.role == 'system' %}"
        "{%- elif message.role == 'tool' %}"
        "{{- '<|im_start|>tool\\n' + message.content + '<|im_end|>\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') }}"
        "{%- for tool_call in message.tool_calls or [] %}"
        "{%- set tool_call = tool_call.function or tool_call %}" + call + "{%- endfor %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


_ARGS = "{%- for key, value in (tool_call.arguments.items() if tool_call.arguments is mapping else []) %}"


# gpt-oss's Harmony, shortened: tools as a TypeScript namespace in the developer message, earlier
# calls on the commentary channel addressed to functions.NAME, answers on the final channel.
HARMONY_TEMPLATE = (
    "{{- '<|start|>system<|message|>Reasoning: medium\\n# Valid channels: analysis, commentary, final.<|end|>' }}"
    "{%- if tools %}"
    "{{- '<|start|>developer<|message|># Tools\\n## functions\\nnamespace functions {\\n' }}"
    "{%- for tool in tools %}"
    "{{- 'type ' + tool.function.name + ' = (_: ' + (tool.function.parameters or {}) | tojson + ') => any;\\n' }}"
    "{%- endfor %}"
    "{{- '} // namespace functions<|end|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function or tool_call %}"
    "{{- '<|start|>assistant<|channel|>commentary to=functions.' + tool_call.name + ' <|constrain|>json<|message|>' }}"
    "{{- (tool_call.arguments if tool_call.arguments is string else tool_call.arguments | tojson) + '<|call|>' }}"
    "{%- endfor %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start|>functions.tool to=assistant<|channel|>commentary<|message|>' + message.content + '<|end|>' }}"
    "{%- else %}"
    "{{- '<|start|>' + message.role + '<|message|>' + message.content + '<|end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)
HARMONY_MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>", "<|call|>", "<|return|>")


@dataclass(frozen=True)
class FormatModel:
    """What a test model of one tool-call format needs: its template, its marker tokens, its EOS markers."""

    template: str
    markers: tuple[str, ...]
    eos_markers: tuple[str, ...] = ()


# mlx-lm parser name (or "harmony") -> a template that makes mlx-lm infer it and writes its calls.
FORMAT_MODELS: dict[str, FormatModel] = {
    "json_tools": FormatModel(TOOLS_CHATML_TEMPLATE, ("<tool_call>", "</tool_call>")),
    "qwen3_coder": FormatModel(
        _chatml_with_tools(
            "<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n</function>\n</tool_call>",
            "{{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}"
            + _ARGS
            + "{{- '<parameter=' + key + '>\\n' + value | string + '\\n</parameter>\\n' }}{%- endfor %}"
            "{{- '</function>\\n</tool_call>' }}",
        ),
        ("<tool_call>", "</tool_call>"),
    ),
    "glm47": FormatModel(
        _chatml_with_tools(
            "<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value></tool_call>",
            "{{- '<tool_call>' + tool_call.name }}"
            + _ARGS
            + "{{- '<arg_key>' + key + '</arg_key><arg_value>' + value | tojson + '</arg_value>' }}{%- endfor %}"
            "{{- '</tool_call>' }}",
        ),
        ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"),
    ),
    "longcat": FormatModel(
        _chatml_with_tools(
            "<longcat_tool_call>NAME<longcat_arg_key>KEY</longcat_arg_key>"
            "<longcat_arg_value>VALUE</longcat_arg_value></longcat_tool_call>",
            "{{- '<longcat_tool_call>' + tool_call.name }}"
            + _ARGS
            + "{{- '<longcat_arg_key>' + key + '</longcat_arg_key><longcat_arg_value>' + value | tojson"
            " + '</longcat_arg_value>' }}{%- endfor %}{{- '</longcat_tool_call>' }}",
        ),
        ("<longcat_tool_call>", "</longcat_tool_call>"),
    ),
    "mistral": FormatModel(
        _chatml_with_tools(
            "Call a tool as [TOOL_CALLS]NAME[ARGS]{JSON}",
            "{{- '[TOOL_CALLS]' + tool_call.name + '[ARGS]' + tool_call.arguments | tojson }}",
        ),
        ("[TOOL_CALLS]", "[ARGS]"),
    ),
    "kimi_k2": FormatModel(
        _chatml_with_tools(
            "<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>"
            "{JSON}<|tool_call_end|><|tool_calls_section_end|>",
            "{{- '<|tool_calls_section_begin|><|tool_call_begin|>functions.' + tool_call.name + ':0"
            "<|tool_call_argument_begin|>' + tool_call.arguments | tojson"
            " + '<|tool_call_end|><|tool_calls_section_end|>' }}",
        ),
        (
            "<|tool_calls_section_begin|>",
            "<|tool_calls_section_end|>",
            "<|tool_call_begin|>",
            "<|tool_call_argument_begin|>",
            "<|tool_call_end|>",
        ),
    ),
    # Kimi K3: mlx-lm infers it from the vocabulary (XTML tokens), not the template.
    "kimi_k3": FormatModel(
        _chatml_with_tools(
            "Call tools in a tools section.",
            '{{- \'<|open|>tools<|sep|><|open|>call tool="\' + tool_call.name + \'" index="1"<|sep|>'
            '<|open|>json type="object"<|sep|>\' + tool_call.arguments | tojson'
            " + '<|close|>json<|sep|><|close|>call<|sep|><|close|>tools<|sep|>' }}",
        ),
        ("<|open|>", "<|close|>", "<|sep|>", "<|end_of_msg|>"),
    ),
    "minimax_m2": FormatModel(
        _chatml_with_tools(
            '<minimax:tool_call><invoke name="NAME"><parameter name="KEY">VALUE</parameter></invoke>'
            "</minimax:tool_call>",
            "{{- '<minimax:tool_call><invoke name=\"' + tool_call.name + '\">' }}"
            + _ARGS
            + "{{- '<parameter name=\"' + key + '\">' + value | string + '</parameter>' }}{%- endfor %}"
            "{{- '</invoke></minimax:tool_call>' }}",
        ),
        ("<minimax:tool_call>", "</minimax:tool_call>"),
    ),
    "minicpm5": FormatModel(
        _chatml_with_tools(
            '<function name="NAME"><param name="KEY">VALUE</param></function>',
            "{{- '<function name=\"' + tool_call.name + '\">' }}"
            + _ARGS
            + "{{- '<param name=\"' + key + '\">' + value | string + '</param>' }}{%- endfor %}"
            "{{- '</function>' }}",
        ),
        (),
    ),
    "muse_spark": FormatModel(
        _chatml_with_tools(
            '<atem:function_calls><atem:invoke name="NAME"><atem:parameter name="KEY">JSON</atem:parameter>'
            "</atem:invoke></atem:function_calls>",
            "{{- '<atem:function_calls><atem:invoke name=\"' + tool_call.name + '\">' }}"
            + _ARGS
            + "{{- '<atem:parameter name=\"' + key + '\">' + value | tojson + '</atem:parameter>' }}"
            "{%- endfor %}{{- '</atem:invoke></atem:function_calls>' }}",
        ),
        (),
    ),
    "pythonic": FormatModel(
        _chatml_with_tools(
            "<|tool_call_start|>[NAME(KEY=VALUE)]<|tool_call_end|>",
            "{{- '<|tool_call_start|>[' + tool_call.name + '()]<|tool_call_end|>' }}",
        ),
        ("<|tool_call_start|>", "<|tool_call_end|>"),
    ),
    "gemma4": FormatModel(
        _chatml_with_tools(
            '<|tool_call>call:NAME{KEY:<|"|>VALUE<|"|>}<tool_call|>',
            "{{- '<|tool_call>call:' + tool_call.name + '{}<tool_call|>' }}",
        ),
        ("<|tool_call>", "<tool_call|>", '<|"|>'),
    ),
    "function_gemma": FormatModel(
        _chatml_with_tools(
            "<start_function_call>call:NAME{KEY:<escape>VALUE<escape>}<end_function_call>",
            "{{- '<start_function_call>call:' + tool_call.name + '{}<end_function_call>' }}",
        ),
        ("<start_function_call>", "<end_function_call>", "<escape>"),
    ),
    "harmony": FormatModel(HARMONY_TEMPLATE, HARMONY_MARKERS, ("<|return|>", "<|call|>")),
}
