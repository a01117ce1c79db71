"""LLaVA as a transformers plug-in, model type `llava_plugin`.

Importing this package registers the config, the models and the processor with the Auto classes, and marks them
so that `save_pretrained` writes their code next to the weights: the checkpoint then loads with
`trust_remote_code=True` anywhere, this package installed or not.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from processing.processing_llava import LlavaProcessor

from .configuration_llava import LlavaConfig
from .modeling_llava import LlavaForCausalLM, LlavaModel, LlavaMultiModalProjector, LlavaPreTrainedModel


AutoConfig.register(LlavaConfig.model_type, LlavaConfig, exist_ok=True)
AutoModel.register(LlavaConfig, LlavaModel, exist_ok=True)
AutoModelForCausalLM.register(LlavaConfig, LlavaForCausalLM, exist_ok=True)
AutoModelForImageTextToText.register(LlavaConfig, LlavaForCausalLM, exist_ok=True)
AutoProcessor.register(LlavaConfig, LlavaProcessor, exist_ok=True)

LlavaConfig.register_for_auto_class()
LlavaModel.register_for_auto_class("AutoModel")
LlavaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
LlavaProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "LlavaConfig",
    "LlavaForCausalLM",
    "LlavaModel",
    "LlavaMultiModalProjector",
    "LlavaPreTrainedModel",
    "LlavaProcessor",
]
