"""LLaVA: a frozen vision tower, a projector and a causal language model (Liu et al., 2023).

The processor expands each `<image>` into `config.image_seq_length` image tokens; this model replaces the embeddings
of those tokens with the projected features of the tower's `vision_feature_layer` (masked scatter), then runs the
language model on the result.

This file is copied next to the weights by `save_pretrained`, so it imports only `torch`, `transformers` and its
sibling `configuration_llava.py`.
"""

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_llava import LlavaConfig, projector_depth


# Written into config.json on save so that every Auto class finds its class in the copied code files.
AUTO_MAP = {
    "AutoConfig": "configuration_llava.LlavaConfig",
    "AutoModel": "modeling_llava.LlavaModel",
    "AutoModelForCausalLM": "modeling_llava.LlavaForCausalLM",
    "AutoModelForImageTextToText": "modeling_llava.LlavaForCausalLM",
}


@dataclass
class LlavaModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the projected image features, shape `(num_images, image_seq_length, hidden)`."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class LlavaCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the projected image features."""

    image_hidden_states: torch.FloatTensor | None = None


def _language_model_fields(outputs) -> dict:
    """The language model's output fields but its last hidden state, under the installed transformers' names: the KV
    cache is `past_key_values` up to 5.23 and `cache` from 5.24, and this code runs beside either."""
    return {k: v for k, v in outputs.items() if k != "last_hidden_state"}


class LlavaMultiModalProjector(nn.Module):
    """Maps vision features to the LM's hidden size: `linear` (paper) or `mlp{N}x_gelu` (LLaVA-1.5: N=2).

    Layers are named `linear_1`, `linear_2`, ... as in transformers' Llava, so weights convert by renaming only.
    """

    def __init__(self, config: LlavaConfig):
        super().__init__()
        depth = projector_depth(config.projector_type)
        vision_size, text_size = config.vision_config.hidden_size, config.text_config.hidden_size
        self.depth = depth
        for i in range(1, depth + 1):
            in_size = vision_size if i == 1 else text_size
            setattr(self, f"linear_{i}", nn.Linear(in_size, text_size, bias=config.projector_bias))
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(text_size) if config.projector_layernorm else None
        if config.vision_feature_norm:
            # Buffers, not parameters: statistics of the frozen tower's features, fitted once, never trained.
            self.register_buffer("feature_mean", torch.zeros(vision_size))
            self.register_buffer("feature_std", torch.ones(vision_size))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "feature_mean"):
            image_features = (image_features - self.feature_mean) / self.feature_std
        hidden_states = self.linear_1(image_features)
        for i in range(2, self.depth + 1):
            hidden_states = getattr(self, f"linear_{i}")(self.act(hidden_states))
        return self.norm(hidden_states) if self.norm is not None else hidden_states


class LlavaPreTrainedModel(PreTrainedModel):
    config_class = LlavaConfig
    config: LlavaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _no_split_modules = ["LlavaMultiModalProjector"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # `output_loading_info=True` returns a pair
        align_cpu_tensors(model)
        return loaded


# What torch's own CPU allocator guarantees: one AVX-512 vector, one cache line.
CPU_ALIGNMENT = 64


def align_cpu_tensors(model: nn.Module) -> int:
    """Copy CPU parameters and buffers that start off a 64-byte boundary into fresh (aligned) memory.

    Weights loaded from safetensors on CPU are views into the memory-mapped file, starting wherever the file's header
    happened to end (8 + header length, a multiple of 8 only). Decode-size matmuls read misaligned weights measurably
    slower (2-6% in a micro-benchmark at 56 bytes off). The copy swaps `.data`, so tied parameters stay one object and
    `requires_grad` is kept. It costs one memcpy of the misaligned weights at load; tensors on an accelerator or on
    the meta device, and weights that loading already copied (a dtype cast), are left alone. Returns the number of
    tensors copied.
    """
    copied = 0
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % CPU_ALIGNMENT:
            tensor.data = tensor.data.clone(memory_format=torch.preserve_format)
            copied += 1
    return copied


class LlavaModel(LlavaPreTrainedModel):
    """Vision tower + projector + language model (no LM head). `last_hidden_state` is the LM's."""

    def __init__(self, config: LlavaConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        # LLaVA never trains the tower (both stages); freezing it here means every construction path agrees.
        self.vision_tower.requires_grad_(False)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's selected features of `pixel_values` `(num_images, 3, H, W)`, before the projector:
        `vision_feature_layer`, the select strategy and the pooling applied, `(num_images, image_seq_length,
        vision_hidden)`. They depend on the frozen tower and the image only, so they can be computed once and passed
        back as `vision_features` (training/feature_cache.py)."""
        tower_trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(tower_trainable and torch.is_grad_enabled()):
            tower_dtype = next(self.vision_tower.parameters()).dtype
            layer = self.config.vision_feature_layer
            # Ask for the one hidden state we read (a list, so that layer 0 stays truthy), as transformers' Llava
            # does: with `True` the tower keeps every layer's output alive until it returns (13 x 3 MiB at batch 8
            # in the benchmark), which grows the heap under each layer's MLP buffers; glibc then trims and re-faults
            # them on every call (measured at batch 8: up to ~150K page faults and a 1-11% slower tower per call).
            # Towers without selective capture treat the list as `True`; `hidden_states` is indexed the same either way.
            outputs = self.vision_tower(pixel_values.to(tower_dtype), output_hidden_states=[layer], return_dict=True)
            features = outputs.hidden_states[layer]
        return self.select_and_pool(features)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected features of `pixel_values` `(num_images, 3, H, W)`: `(num_images, image_seq_length, hidden)`."""
        return self.multi_modal_projector(self.get_vision_features(pixel_values))

    def select_and_pool(self, features: torch.Tensor) -> torch.Tensor:
        """Applies the select strategy (drop CLS or not) and the optional average pooling of the patch grid."""
        config = self.config
        side = config.num_patches_per_side
        prefix, patches = features[:, : -side * side], features[:, -side * side :]
        if config.image_token_pooling > 1:
            grid = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)
            grid = nn.functional.avg_pool2d(grid, config.image_token_pooling)
            patches = grid.flatten(2).transpose(1, 2)
        if config.vision_feature_select_strategy == "full":
            return torch.cat([prefix, patches], dim=1)
        return patches

    def merge_image_features(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Writes the image features over the embeddings of the image tokens, in order."""
        image_mask = input_ids == self.config.image_token_id
        n_tokens, n_features = int(image_mask.sum()), image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"Image features and image tokens do not match: input_ids hold {n_tokens} image tokens "
                f"(id {self.config.image_token_id}) but {image_features.shape[0]} image(s) give {n_features} features "
                f"({image_features.shape[1]} per image). Was the sequence truncated into its image tokens?"
            )
        image_mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(image_mask, image_features.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        vision_features: torch.FloatTensor | None = None,
        **kwargs,
    ) -> LlavaModelOutputWithPast | tuple:
        r"""
        vision_features (`torch.FloatTensor` of shape `(num_images, image_seq_length, vision_hidden)`, *optional*):
            The tower's selected features (`get_vision_features`), given instead of `pixel_values` to skip the
            frozen tower, e.g. read from a feature cache. The projector still runs on them.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if pixel_values is not None and vision_features is not None:
            raise ValueError("Pass pixel_values or vision_features, not both.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = None
        if pixel_values is not None or vision_features is not None:
            if input_ids is None:
                raise ValueError("Images need input_ids to locate the image tokens.")
            if vision_features is None:
                vision_features = self.get_vision_features(pixel_values)
            projector_dtype = self.multi_modal_projector.linear_1.weight.dtype
            image_features = self.multi_modal_projector(vision_features.to(projector_dtype))
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        output = LlavaModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state, **_language_model_fields(outputs), image_hidden_states=image_features
        )
        return output.to_tuple() if return_dict is False else output


class LlavaForCausalLM(LlavaPreTrainedModel, GenerationMixin):
    """LLaVA with a language-modeling head: `.model` (`LlavaModel`) + `.lm_head`.

    This layout is what TRL's SFTTrainer expects: its fused LM head runs `model.base_model(...)`, reads
    `last_hidden_state` and projects it through `get_output_embeddings()`.
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: LlavaConfig):
        super().__init__(config)
        self.model = LlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def multi_modal_projector(self):
        return self.model.multi_modal_projector

    @property
    def language_model(self):
        return self.model.language_model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        vision_features: torch.FloatTensor | None = None,
        **kwargs,
    ) -> LlavaCausalLMOutputWithPast | tuple:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            vision_features=vision_features,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        output = LlavaCausalLMOutputWithPast(loss=loss, logits=logits, **_language_model_fields(outputs))
        return output.to_tuple() if return_dict is False else output

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `register_for_auto_class` records one Auto class; the checkpoint must answer to all of them.
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained_parts(
        cls,
        vision_model_name_or_path: str,
        language_model_name_or_path: str,
        tokenizer=None,
        projector_type: str = "linear",
        image_token: str = "<image>",
        dtype: torch.dtype | str | None = None,
        **config_kwargs,
    ) -> "LlavaForCausalLM":
        """Builds stage 1's starting point from a pretrained vision encoder and a pretrained causal LM.

        The projector is freshly initialised; the tower and LM keep their pretrained weights. `<image>` (and a pad
        token when the tokenizer has none) is added to `tokenizer` in place, and the LM's embeddings are resized.

        Args:
            vision_model_name_or_path: a CLIP/SigLIP checkpoint (full model or vision-only), e.g.
                `"openai/clip-vit-large-patch14"`.
            language_model_name_or_path: a causal LM checkpoint, e.g. `"lmsys/vicuna-7b-v1.5"`.
            tokenizer: the LM's tokenizer; loaded from `language_model_name_or_path` when None. Build the processor
                from the same object so token ids agree (see `modeling_llava.builders.load_pretrained_parts`).
            projector_type, **config_kwargs: `LlavaConfig` fields (`vision_feature_layer`, `image_token_pooling`, ...).
        """
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(language_model_name_or_path)
        added = {}
        if image_token not in tokenizer.get_vocab():
            added["additional_special_tokens"] = [image_token]
        if tokenizer.pad_token is None:
            added["pad_token"] = "<pad>"
        if added:
            tokenizer.add_special_tokens(added, replace_extra_special_tokens=False)

        vision_tower = AutoModel.from_pretrained(vision_model_name_or_path, dtype=dtype)
        if hasattr(vision_tower.config, "vision_config"):  # a full CLIP/SigLIP: keep its vision half only
            vision_tower = vision_tower.vision_model
        lm = AutoModelForCausalLM.from_pretrained(language_model_name_or_path, dtype=dtype)
        lm.resize_token_embeddings(len(tokenizer))

        config = LlavaConfig(
            vision_config=vision_tower.config.to_dict(),
            text_config=lm.config.to_dict(),
            projector_type=projector_type,
            image_token_id=tokenizer.convert_tokens_to_ids(image_token),
            **config_kwargs,
        )
        config.text_config.pad_token_id = tokenizer.pad_token_id
        # Build the shell on the meta device and move the pretrained modules in: no second copy of a 7B LM.
        with torch.device("meta"):
            model = cls(config)
        model.model.vision_tower = vision_tower.requires_grad_(False)
        model.model.language_model = lm.get_decoder()
        model.lm_head = lm.get_output_embeddings()
        projector = LlavaMultiModalProjector(config)
        for module in projector.modules():
            model._init_weights(module)
        model.model.multi_modal_projector = projector.to(lm.dtype)
        return model


__all__ = ["LlavaForCausalLM", "LlavaModel", "LlavaPreTrainedModel", "LlavaMultiModalProjector"]
