"""Processor, chat templates, tokenizer training and the instruction-data pipeline of llava-plugin.

The processor is imported on first use: the data tools (`python -m processing.generate`, ...) then start without
paying for transformers' import.
"""

from .chat_templates import CHAT_TEMPLATES, get_chat_template


def __getattr__(name):
    if name in ("LlavaProcessor", "ImageTokensTruncatedError"):
        from . import processing_llava

        return getattr(processing_llava, name)
    raise AttributeError(f"module 'processing' has no attribute {name!r}")


__all__ = ["CHAT_TEMPLATES", "ImageTokensTruncatedError", "LlavaProcessor", "get_chat_template"]
