"""Editable prompts for GPT-assisted instruction generation.

For each instruction type there is a system message (`{type}_system.txt`) and few-shot examples
(`{type}_example_{n}.txt`, each a `=== context ===` section followed by a `=== response ===` section).
The contexts use the exact rendering of `processing.coco.ImageContext.to_prompt()`; the responses use the
reply format `processing.generate.parse_reply` reads, so every teacher (LLM or symbolic) is parsed alike.

`{name}_questions.txt` files hold instruction lists, one per line (`#` starts a comment).
Point `prompts_dir` at a copy of this folder to experiment without touching the package.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent
INSTRUCTION_TYPES = ("conversation", "detail", "complex")

# Appended to every user message; it states the task in plain words for LLM teachers and lets the
# symbolic teacher know which type it is asked for without a side channel.
TASK_LINES = {
    "conversation": "Task: write a conversation about this image.",
    "detail": "Task: write a detailed description of this image.",
    "complex": "Task: write one complex reasoning question about this image and its answer.",
}

_SECTION = re.compile(r"^=== (context|response) ===\s*$", re.MULTILINE)


@dataclass(frozen=True)
class PromptSet:
    """System message and few-shot (context, response) pairs of one instruction type."""

    kind: str
    system: str
    examples: tuple[tuple[str, str], ...]


def _folder(prompts_dir: str | os.PathLike | None) -> Path:
    return Path(prompts_dir) if prompts_dir is not None else PROMPTS_DIR


def parse_example(text: str, source: str = "<example>") -> tuple[str, str]:
    """Split an example file into (context, response)."""
    pieces = _SECTION.split(text)
    # pieces = [preamble, "context", body, "response", body]
    if len(pieces) != 5 or pieces[1] != "context" or pieces[3] != "response":
        raise ValueError(f"{source}: expected one '=== context ===' then one '=== response ===' section")
    return pieces[2].strip(), pieces[4].strip()


def load_prompts(kind: str, prompts_dir: str | os.PathLike | None = None) -> PromptSet:
    """Load the system message and few-shot examples of one instruction type."""
    if kind not in INSTRUCTION_TYPES:
        raise ValueError(f"instruction type must be one of {INSTRUCTION_TYPES}, got {kind!r}")
    folder = _folder(prompts_dir)
    system = (folder / f"{kind}_system.txt").read_text(encoding="utf-8").strip()
    examples = tuple(
        parse_example(path.read_text(encoding="utf-8"), str(path))
        for path in sorted(folder.glob(f"{kind}_example_*.txt"))
    )
    return PromptSet(kind, system, examples)


def load_instructions(name: str, prompts_dir: str | os.PathLike | None = None) -> list[str]:
    """Instruction list `{name}_questions.txt`: one instruction per line, `#` comments skipped."""
    path = _folder(prompts_dir) / f"{name}_questions.txt"
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    if not instructions:
        raise ValueError(f"{path}: no instructions")
    return instructions


def user_message(kind: str, context: str) -> str:
    """The user turn sent to a teacher: the symbolic context followed by the task line."""
    return f"{context}\n\n{TASK_LINES[kind]}"


def build_messages(prompts: PromptSet, context: str) -> list[dict[str, str]]:
    """Chat messages for a teacher: system, few-shot user/assistant pairs, then the query context."""
    messages = [{"role": "system", "content": prompts.system}]
    for example_context, response in prompts.examples:
        messages.append({"role": "user", "content": user_message(prompts.kind, example_context)})
        messages.append({"role": "assistant", "content": response})
    messages.append({"role": "user", "content": user_message(prompts.kind, context)})
    return messages


def kind_from_messages(messages: list[dict]) -> str | None:
    """Which instruction type a message list asks for (read from the task line of the last user turn)."""
    last_user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    for kind, line in TASK_LINES.items():
        if isinstance(last_user, str) and last_user.rstrip().endswith(line):
            return kind
    return None
