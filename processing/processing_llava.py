"""LLaVA processor: image processor + tokenizer + chat template.

Each `<image>` in the text becomes `image_seq_length` image tokens, so the model only has to scatter the image
features over them. Images are padded to a square with their mean colour (`image_aspect_ratio="pad"`, LLaVA-1.5) or
resized and centre-cropped by the image processor (`"crop"`, the paper).

This file is copied next to the weights by `save_pretrained`, so it imports nothing but `transformers`, `torch`, `numpy` and
`PIL`: a checkpoint must load with `trust_remote_code=True` in a process that never installed this repository.
"""

import bisect
import json
import os
import re

import numpy as np
import torch
from PIL import Image
from transformers.processing_utils import ProcessorMixin


try:  # `sanitize_control_tokens=True` marks user-typed specials; a marked `<image>` is text, not a placeholder
    from transformers.processing_utils import _UNMARKED
except ImportError:  # a transformers without that feature
    _UNMARKED = ""


class ImageTokensTruncatedError(ValueError):
    """Truncation would cut a sample's image tokens: the model could no longer place its image features."""


class LlavaProcessor(ProcessorMixin):
    r"""
    Args:
        image_processor: a CLIP-style image processor (resize shortest edge + centre crop + normalise).
        tokenizer: the language model's (fast) tokenizer, holding the `<image>` token.
        chat_template (`str`, *optional*): Jinja template; see `processing.chat_templates` (`vicuna_v1`, `plain`).
        image_seq_length (`int`, *optional*, defaults to 576): image tokens per image; equals the model config's.
        image_aspect_ratio (`str`, *optional*, defaults to `"pad"`): `"pad"` pads each image to a square with its
            mean colour before the image processor (LLaVA-1.5); `"crop"` leaves it to the image processor's resize
            and centre crop (the paper).
        image_token (`str`, *optional*, defaults to `"<image>"`): the placeholder the chat template writes.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_seq_length: int = 576,
        image_aspect_ratio: str = "pad",
        image_token: str = "<image>",
        **kwargs,
    ):
        if image_aspect_ratio not in ("pad", "crop"):
            raise ValueError(f"Unknown image_aspect_ratio {image_aspect_ratio!r}: expected 'pad' or 'crop'.")
        self.image_seq_length = image_seq_length
        self.image_aspect_ratio = image_aspect_ratio
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {image_token!r} token; add it as a special token first.")
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # -- images ---------------------------------------------------------------------------------------------------

    def _process_images(self, images, **kwargs):
        if self.image_aspect_ratio == "pad":
            images = _map_images(images, self.pad_to_square)
        return super()._process_images(images, **kwargs)

    def pad_to_square(self, image) -> Image.Image:
        """Pads to a square, image centred, filled with the image processor's mean colour (CLIP: 122, 116, 104)."""
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        image = image.convert("RGB")  # grayscale, RGBA, CMYK and palette images are converted, not rejected
        width, height = image.size
        if width == height:
            return image
        mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        fill = tuple(int(m * 255) for m in mean)  # truncated, as the original and transformers do: (122, 116, 104)
        side = max(width, height)
        square = Image.new("RGB", (side, side), fill)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        return square

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_seq_length

    # -- text -----------------------------------------------------------------------------------------------------

    def _check_special_mm_tokens(self, text, text_inputs, modalities):
        """After tokenization (and truncation), every sample must still hold all of its image tokens."""
        input_ids = text_inputs["input_ids"]
        input_ids = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
        for index, (sample, ids) in enumerate(zip(text, input_ids)):
            expected = len(re.findall(_UNMARKED + re.escape(self.image_token), sample))
            found = list(ids).count(self.image_token_id)
            if found != expected:
                needed = len(self.tokenizer(sample, add_special_tokens=False)["input_ids"])
                raise ImageTokensTruncatedError(
                    f"Sample {index} of the batch would lose image tokens to truncation: it needs {needed} tokens "
                    f"({expected // self.image_seq_length} image(s) x {self.image_seq_length} image tokens) but only "
                    f"{found} image tokens survive. Raise max_length, or drop such samples before training "
                    "(training/sft.py: --overlong_policy skip)."
                )

    def _adjust_assistant_masks_indices(self, processed_dict, generation_indices):
        """The assistant mask of `apply_chat_template(..., return_assistant_tokens_mask=True)`: tokens overlapping a
        `{% generation %}` span, the spans shifted past the expanded image tokens.

        The same rule as transformers' own implementation, vectorised: that one walks the offsets tensor element by
        element, which was 70% of a TRL collator call (0.43 of 0.61 s for 32 conversations).
        """
        offset_mapping = processed_dict.pop("offset_mapping")
        replacement_offsets = processed_dict.pop("text_replacement_offsets", None) or [[]] * len(generation_indices)
        masks = []
        for offsets, spans, replacements in zip(offset_mapping, generation_indices, replacement_offsets):
            offsets = torch.as_tensor(offsets).reshape(-1, 2)
            placeholder_ends = [r["span"][1] for r in replacements]
            chars_gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements]
            mask = torch.zeros(offsets.shape[0], dtype=torch.bool)
            for span in spans:
                start, end = (char + chars_gained[bisect.bisect_right(placeholder_ends, char)] for char in span)
                mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
            masks.append(mask.long().tolist())
        processed_dict["assistant_masks"] = masks
        return processed_dict

    # -- saving ---------------------------------------------------------------------------------------------------
    # transformers resolves a saved `"processor_class": "LlavaProcessor"` by name to *its own* LlavaProcessor, which
    # cannot read this folder. Without the key, AutoProcessor goes by the config's model type (`llava_plugin`, whose
    # processor is this class) or by the `auto_map` of processor_config.json under `trust_remote_code=True`.

    def to_dict(self):
        output = super().to_dict()
        output.pop("processor_class", None)
        return output

    def save_pretrained(self, save_directory, *args, **kwargs):
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        self.tokenizer.init_kwargs.pop("processor_class", None)
        tokenizer_config = os.path.join(save_directory, "tokenizer_config.json")
        if os.path.isfile(tokenizer_config):
            with open(tokenizer_config, encoding="utf-8") as f:
                config = json.load(f)
            if config.pop("processor_class", None) is not None:
                with open(tokenizer_config, "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=2, ensure_ascii=False)
        return saved

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


def _map_images(images, fn):
    """Applies `fn` to every image of a (possibly nested) list, keeping the nesting."""
    if isinstance(images, (list, tuple)):
        return [_map_images(image, fn) for image in images]
    return fn(images)


__all__ = ["LlavaProcessor", "ImageTokensTruncatedError"]
