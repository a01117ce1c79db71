"""Ways to get a (model, processor) pair: from pretrained parts (real stage 1) or tiny and random (tests, demos).

Not copied into checkpoints: it builds processors too, and the copied modeling code must not depend on them.
"""

from collections.abc import Iterable

import torch
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
)
from transformers.utils import is_torchvision_available

from processing.chat_templates import get_chat_template
from processing.processing_llava import LlavaProcessor
from processing.tokenization import train_tokenizer

from .configuration_llava import LlavaConfig
from .modeling_llava import LlavaForCausalLM


def load_pretrained_parts(
    vision_model_name_or_path: str,
    language_model_name_or_path: str,
    *,
    projector_type: str = "linear",
    chat_template: str = "vicuna_v1",
    image_aspect_ratio: str = "pad",
    dtype: torch.dtype | str | None = None,
    **config_kwargs,
) -> tuple[LlavaForCausalLM, LlavaProcessor]:
    """Stage 1's starting point for real: e.g. `("openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5",
    projector_type="mlp2x_gelu")`. Downloads both parts (or reads local folders), adds `<image>`/pad tokens,
    and returns the model with a fresh projector and its processor, whose token ids agree with it."""
    tokenizer = AutoTokenizer.from_pretrained(language_model_name_or_path)
    model = LlavaForCausalLM.from_pretrained_parts(
        vision_model_name_or_path,
        language_model_name_or_path,
        tokenizer=tokenizer,
        projector_type=projector_type,
        dtype=dtype,
        **config_kwargs,
    )
    image_processor = AutoImageProcessor.from_pretrained(vision_model_name_or_path)
    return model, processor_for(model, tokenizer, image_processor, chat_template, image_aspect_ratio)


def make_image_processor(image_size: int):
    """CLIP preprocessing (resize shortest edge, centre crop, CLIP mean/std) at `image_size` pixels."""
    # The torchvision backend when it imports, else the PIL one (the same numbers, without the fallback warning).
    image_processor_class = CLIPImageProcessor if is_torchvision_available() else CLIPImageProcessorPil
    return image_processor_class(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def processor_for(model: LlavaForCausalLM, tokenizer, image_processor, chat_template="vicuna_v1", image_aspect_ratio="pad"):
    """A processor that agrees with `model`'s config (image token id, image_seq_length)."""
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=get_chat_template(chat_template),
        image_seq_length=model.config.image_seq_length,
        image_aspect_ratio=image_aspect_ratio,
    )


_TINY_CORPUS = [
    "a red circle and a blue square on a white background",
    "there is a green triangle in the image",
    "what color is the circle? the circle is red.",
    "how many shapes are in the image? there are three shapes.",
    "describe the image briefly. a yellow square next to a blue triangle.",
    "USER: ASSISTANT: A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
]


def build_tiny_llava(
    projector_type: str = "mlp2x_gelu",
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    text_hidden_size: int = 64,
    text_layers: int = 2,
    vocab_size: int = 512,
    image_token_pooling: int = 1,
    vision_feature_select_strategy: str = "default",
    chat_template: str = "vicuna_v1",
    image_aspect_ratio: str = "pad",
    corpus: Iterable[str] | None = None,
    seed: int = 0,
    vision_feature_norm: bool = False,
) -> tuple[LlavaForCausalLM, LlavaProcessor]:
    """A random tiny LLaVA (CLIP tower + LLaMA LM) with a tokenizer trained here on `corpus`. Seconds on a CPU."""
    tokenizer = train_tokenizer(corpus or _TINY_CORPUS, vocab_size=vocab_size)
    vision_config = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden_size // 16),
        projection_dim=vision_hidden_size,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden_size,
        intermediate_size=text_hidden_size * 4,
        num_hidden_layers=text_layers,
        num_attention_heads=max(1, text_hidden_size // 16),
        num_key_value_heads=max(1, text_hidden_size // 16),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        projector_type=projector_type,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_token_pooling=image_token_pooling,
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_feature_norm=vision_feature_norm,
    )
    torch.manual_seed(seed)
    model = LlavaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = processor_for(model, tokenizer, make_image_processor(image_size), chat_template, image_aspect_ratio)
    return model, processor
