"""The chat templates LLaVA trains and prompts with.

Message content is a string or a list of typed parts (`{"type": "image"}`, `{"type": "text", "text": ...}`). Parts are
joined with a newline, so `[image, text]` renders as `<image>\nQ` and `[text, image]` as `Q\n<image>`: the two
placements of the original data.

Every assistant answer, and the token that ends it, sits inside `{% generation %}`: TRL's `assistant_only_loss`
then trains on exactly the answers and their end token, so the model learns to stop (the llava-hf template leaves the
`</s>` out and models trained with it ramble).
"""

_RENDER_CONTENT = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

def _quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _opening(system_prompt: str) -> str:
    """`bos`, then the conversation's own system message, or `system_prompt` when it brings none; `loop_messages` are
    the turns after it."""
    return (
        _RENDER_CONTENT
        + "{%- if bos_token -%}{{- bos_token -}}{%- endif -%}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{{- render_content(messages[0]['content']) -}}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}"
        "{{- " + _quoted(system_prompt) + " -}}{%- set loop_messages = messages -%}"
        "{%- endif -%}"
    )


def _vicuna_v1(system_prompt: str) -> str:
    """`SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>` (LLaVA's `llava_v1` / `vicuna_v1`)."""
    return (
        _opening(system_prompt)
        + "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if loop.first -%}{{- ' ' -}}{%- endif -%}"
        "{{- 'USER: ' + render_content(message['content']) + ' ' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- 'ASSISTANT:' -}}"
        "{%- generation -%}{{- ' ' + render_content(message['content']) + eos_token -}}{%- endgeneration -%}"
        "{%- else -%}{{- raise_exception('vicuna_v1 only knows the roles system, user and assistant') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


VICUNA_V1 = _vicuna_v1(VICUNA_V1_SYSTEM)

# Stage 1 of LLaVA-1.5: the image, then its caption; the instruction text of the user turn is not rendered.
PLAIN = (
    "{%- if bos_token -%}{{- bos_token -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}{{- '<image>' if '<image>' in message['content'] else '' -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# Original LLaVA's `llava_v1` conversation: `vicuna_v1` with a system prompt that says "human". Its CLI and demo
# picked it for every checkpoint with "v1" in the name (llava-v1.5-7b included), while training used `vicuna_v1`.
LLAVA_V1 = _vicuna_v1(LLAVA_V1_SYSTEM)


def _llava_v0(system_prompt: str) -> str:
    """Original LLaVA's `llava_v0` (the paper's figure): `SYSTEM###Human: <image>\\nQ###Assistant: A###Human: ...`.
    `###` ends every turn and is the stop marker: it sits inside `{% generation %}` with the answer."""
    return (
        _opening(system_prompt)
        + "{{- '###' -}}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- 'Human: ' + render_content(message['content']) + '###' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- 'Assistant:' -}}"
        "{%- generation -%}{{- ' ' + render_content(message['content']) + '###' -}}{%- endgeneration -%}"
        "{%- else -%}{{- raise_exception('llava_v0 only knows the roles system, user and assistant') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
    )


LLAVA_V0 = _llava_v0(LLAVA_V1_SYSTEM)

CHAT_TEMPLATES = {"vicuna_v1": VICUNA_V1, "plain": PLAIN, "llava_v1": LLAVA_V1, "llava_v0": LLAVA_V0}
# The templates that open with a system prompt, and how each is built with another one.
_WITH_SYSTEM_PROMPT = {"vicuna_v1": _vicuna_v1, "llava_v1": _vicuna_v1, "llava_v0": _llava_v0}


def get_chat_template(name: str, system_prompt: str | None = None) -> str:
    """The template registered under `name`; raises ValueError listing the known names.

    `system_prompt` replaces the template's default system prompt (the one rendered when a conversation brings no
    system message of its own); `""` renders none, as original LLaVA does with an empty `conv.system`."""
    try:
        template = CHAT_TEMPLATES[name]
    except KeyError:
        raise ValueError(f"Unknown chat template {name!r}: expected one of {sorted(CHAT_TEMPLATES)}.") from None
    if system_prompt is None:
        return template
    if name not in _WITH_SYSTEM_PROMPT:
        raise ValueError(f"Chat template {name!r} has no system prompt to replace: expected one of "
                         f"{sorted(_WITH_SYSTEM_PROMPT)} with system_prompt.")
    return _WITH_SYSTEM_PROMPT[name](system_prompt)
