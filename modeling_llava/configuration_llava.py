"""LLaVA configuration for the `llava_plugin` model type.

This file is copied next to the weights by `save_pretrained`, so it imports nothing but `transformers`: a
checkpoint must load with `trust_remote_code=True` in a process that never installed this repository.
"""

import re

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


PROJECTOR_TYPES_HELP = "'linear' (the paper), 'mlp2x_gelu' (LLaVA-1.5) or 'mlp{N}x_gelu' for N >= 1"
_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


def projector_depth(projector_type: str) -> int:
    """Number of Linear layers in a projector type; raises ValueError naming the type if it is unknown."""
    if projector_type == "linear":
        return 1
    match = _MLP_GELU.match(str(projector_type))
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    raise ValueError(f"Unknown projector_type {projector_type!r}: expected {PROJECTOR_TYPES_HELP}.")


def num_prefix_tokens(vision_config) -> int:
    """Tokens the vision tower emits before its patch tokens: CLIP's CLS (1); SigLIP has none (0)."""
    return 0 if "siglip" in getattr(vision_config, "model_type", "") else 1


class LlavaConfig(PreTrainedConfig):
    r"""
    Configuration of a LLaVA model: a frozen vision encoder, a projector and a causal language model.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the vision encoder, any vision model `AutoModel.from_config` can build (CLIP's
            `clip_vision_model` by default, `siglip_vision_model` works too). The tower is frozen.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the language model, any decoder `AutoModel.from_config` can build (LLaMA/Vicuna by default,
            Qwen2, ...). Only its base model is used; the LM head lives on `LlavaForCausalLM`.
        projector_type (`str`, *optional*, defaults to `"linear"`):
            `"linear"`: one Linear layer, as in the LLaVA paper. `"mlp2x_gelu"`: Linear -> GELU -> Linear, as in
            LLaVA-1.5 (`"mlp{N}x_gelu"` gives N Linear layers).
        projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector's Linear layers have a bias (the original code and llava-hf do).
        projector_layernorm (`bool`, *optional*, defaults to `False`):
            A LayerNorm after the projector, so image tokens enter the LM at the scale of its embeddings. Not in the
            paper or llava-hf (which cannot export it). In the miniature recipe it made things worse: the 16 tokens of
            an image came out nearly identical and the LM learned to ignore them.
        vision_feature_norm (`bool`, *optional*, defaults to `False`):
            Standardizes the vision features per channel before the projector, with fixed statistics stored as the
            projector's `feature_mean` / `feature_std` buffers (fitted once on the training images before stage 1,
            `training/sft.py --vision_feature_norm`; identity until then). Not in the paper: real CLIP features work
            without it. It is for towers whose features share one large common vector, like the miniature recipe's
            tiny CLIP, where every image token looked alike to the LM (probe 0.59 -> 0.71 at 400 stage-2 steps, and
            existence questions left chance only with it). llava-hf export folds it into `linear_1`.
        vision_feature_layer (`int`, *optional*, defaults to `-2`):
            Index into the vision tower's hidden states whose features are projected; -2 is the second-to-last
            layer, as in the paper. Must lie in `[-(num_hidden_layers + 1), num_hidden_layers]`.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the CLS token and keeps the patch tokens (the paper); `"full"` keeps the CLS token too.
        image_token_id (`int`, *optional*):
            Id of the `<image>` token in the tokenizer. Each image occupies `image_seq_length` of these tokens in
            `input_ids`, and the projected image features replace their embeddings.
        image_seq_length (`int`, *optional*):
            Number of image tokens per image. Derived from the vision config, the select strategy and the pooling
            stride when not given; a given value that disagrees with them is an error.
        image_token_pooling (`int`, *optional*, defaults to `1`):
            Stride of an average pooling over the patch grid before the projector. 1 is the paper; 2 gives 4x fewer
            image tokens (the miniature recipe scored the same at 1.55x the training speed). Must divide the grid.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the LM head shares the input embedding matrix; taken from the text config when it sets it.

    Example:

    ```python
    >>> from transformers import CLIPVisionConfig, LlamaConfig
    >>> from modeling_llava import LlavaConfig, LlavaForCausalLM
    >>> config = LlavaConfig(vision_config=CLIPVisionConfig(), text_config=LlamaConfig(), projector_type="mlp2x_gelu")
    >>> model = LlavaForCausalLM(config)
    ```
    """

    model_type = "llava_plugin"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: str = "linear"
    projector_bias: bool = True
    projector_layernorm: bool = False
    vision_feature_norm: bool = False
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    image_token_id: int | None = None
    image_seq_length: int | None = None
    image_token_pooling: int = 1
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Older checkpoints saved the tie flag on the text config only.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self.validate_llava_fields()

    @property
    def num_patches_per_side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    def expected_image_seq_length(self) -> int:
        side = self.num_patches_per_side // self.image_token_pooling
        prefix = num_prefix_tokens(self.vision_config) if self.vision_feature_select_strategy == "full" else 0
        return side * side + prefix

    def validate_llava_fields(self) -> None:
        """Checks the LLaVA-specific fields; each error names the offending value."""
        projector_depth(self.projector_type)
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"Unknown vision_feature_select_strategy {self.vision_feature_select_strategy!r}: "
                "expected 'default' (drop CLS) or 'full' (keep CLS)."
            )
        num_layers = self.vision_config.num_hidden_layers
        if not -(num_layers + 1) <= int(self.vision_feature_layer) <= num_layers:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} is out of range for a vision tower with "
                f"{num_layers} layers (its hidden states are indexed {-(num_layers + 1)}..{num_layers})."
            )
        side = self.num_patches_per_side
        if self.image_token_pooling < 1 or side % self.image_token_pooling:
            raise ValueError(
                f"image_token_pooling={self.image_token_pooling} must be >= 1 and divide the {side}x{side} patch grid."
            )
        expected = self.expected_image_seq_length()
        if self.image_seq_length is None:
            self.image_seq_length = expected
        elif self.image_seq_length != expected:
            raise ValueError(
                f"image_seq_length={self.image_seq_length} disagrees with the vision config: image_size "
                f"{self.vision_config.image_size}, patch_size {self.vision_config.patch_size}, pooling "
                f"{self.image_token_pooling} and strategy {self.vision_feature_select_strategy!r} give {expected}."
            )


__all__ = ["LlavaConfig"]
