"""Processor, chat templates, tokenizer training and the instruction-data pipeline of llava-plugin."""

from .chat_templates import CHAT_TEMPLATES, get_chat_template
from .processing_llava import ImageTokensTruncatedError, LlavaProcessor

__all__ = ["CHAT_TEMPLATES", "ImageTokensTruncatedError", "LlavaProcessor", "get_chat_template"]
