"""ChatML chat templates of thinking models, for tests.

``QWEN3_THINKING_TEMPLATE`` does what Qwen 3's does with ``enable_thinking``:
on (the default), the generation prompt is plain and the model opens
``<think>`` itself; off, the prompt closes an empty ``<think></think>`` so the
model answers at once. Earlier assistant turns keep only their answer.
``R1_THINKING_TEMPLATE`` opens ``<think>`` in the generation prompt, as the
DeepSeek-R1 distills and Qwen3-Thinking-2507 do: the output starts inside
reasoning and only ``</think>`` is written by the model.
"""

from tests.tool_template import TOOLS_CHATML_TEMPLATE

_MESSAGES = (
    "{%- for message in messages %}"
    "{%- set content = message.content %}"
    "{%- if message.role == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
)

QWEN3_THINKING_TEMPLATE = (
    _MESSAGES + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

R1_THINKING_TEMPLATE = (
    _MESSAGES + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)


def _with_generation_prompt(template: str, prompt: str) -> str:
    plain = "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    assert template.endswith(plain)
    return template[: -len(plain)] + prompt


# The Hermes tools template (tests/tool_template.py) of a model that thinks
# unless told not to, opening <think> in the generation prompt itself.
TOOLS_THINKING_TEMPLATE = _with_generation_prompt(
    TOOLS_CHATML_TEMPLATE,
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}",
)
