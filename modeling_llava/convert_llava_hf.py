"""Import llava-hf checkpoints (transformers' `LlavaForConditionalGeneration`) into llava-plugin, and export ours.

    python -m modeling_llava.convert_llava_hf import SRC DST [--chat-template NAME] [--image-aspect-ratio pad|crop]
    python -m modeling_llava.convert_llava_hf export SRC DST [--layout hub|current]

llava-hf is what vLLM, TGI and SGLang serve. Import reads any of the layouts llava-hf checkpoints exist in:

- hub (every llava-hf repository): `language_model.model.*`, `language_model.lm_head.weight`,
  `multi_modal_projector.linear_{1,2}.*`, `vision_tower.vision_model.*`;
- current (transformers >= 4.52): `model.language_model.*`, `model.vision_tower.vision_model.*`,
  `model.multi_modal_projector.*`, `lm_head.weight`;
- and both of them without the tower's `vision_model.` level, which transformers 5 drops in memory (and its own
  `save_pretrained` writes: `vision_tower.embeddings.*`).

Export writes the hub layout by default (`--layout current` for the other one), keeping `vision_model.` because
older transformers and serving engines look for it; transformers 5.23 reads all four.

Every tensor is accounted for: the report lists `source key -> target key shape dtype` for each, and an unknown
source key, a missing target key or a shape mismatch stops the conversion with the keys named. Output folders are
written next to DST under a temporary name and renamed at the end, so a failed run leaves no half folder.

The checkpoint I/O helpers at the top (reading shards, strict renaming, the report, atomic output, saving ours) are
shared with `convert_original_llava`.
"""

import argparse
import contextlib
import json
import pickle
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
import transformers
from transformers import AutoProcessor, GenerationConfig, LlavaForConditionalGeneration, PreTrainedConfig
from transformers import LlavaConfig as HFLlavaConfig
from transformers import LlavaProcessor as HFLlavaProcessor
from transformers.utils import is_torchvision_available

from processing.chat_templates import CHAT_TEMPLATES, get_chat_template
from processing.processing_llava import LlavaProcessor

from .configuration_llava import LlavaConfig, num_prefix_tokens
from .modeling_llava import LlavaForCausalLM


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint I/O shared by both converters
# ---------------------------------------------------------------------------------------------------------------------


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked; the message names the file, key or field at fault."""


@dataclass
class MappedTensor:
    source: str
    target: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class ConversionReport:
    """What a conversion did: every tensor mapped, every key deliberately left out, and notes for the user."""

    source: str
    destination: str
    tensors: list[MappedTensor] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (source key, why)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        width = max([len(t.source) for t in self.tensors] + [10])
        lines = [f"{self.source} -> {self.destination}: {len(self.tensors)} tensors"]
        lines += [f"  {t.source:<{width}} -> {t.target}  {list(t.shape)} {t.dtype}" for t in self.tensors]
        lines += [f"  {key:<{width}}    ignored: {why}" for key, why in self.ignored]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


_EMBED_KEY = "model.language_model.embed_tokens.weight"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# In the order they are looked for: safetensors win over pickles when a folder holds both.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def weight_files(path: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a checkpoint folder (or a single weight file) and, for a sharded one, its weight map."""
    path = Path(path)
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise ConversionError(f"{path}: no such file or folder.")
    for name in WEIGHT_FILES:
        candidate = path / name
        if not candidate.is_file():
            continue
        if not name.endswith(".index.json"):
            return [candidate], None
        try:
            weight_map = json.loads(candidate.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConversionError(f"{candidate}: not a shard index with a 'weight_map' ({error}).") from None
        shards = [path / shard for shard in sorted(set(weight_map.values()))]
        absent = [str(shard) for shard in shards if not shard.is_file()]
        if absent:
            raise ConversionError(f"{candidate}: lists shards that do not exist: {absent}.")
        return shards, weight_map
    raise ConversionError(f"{path}: no weights found (looked for {', '.join(WEIGHT_FILES)}).")


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one `.safetensors` or `.bin` file; pickles are read with `weights_only=True` and never run code."""
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix not in (".bin", ".pt", ".pth"):
        raise ConversionError(f"{path}: unknown weight file type (expected .safetensors or .bin).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(
            f"{path}: refused to load. It is read with torch.load(weights_only=True), which only accepts tensors and "
            f"plain containers and never runs code stored in a pickle: {first_line}"
        ) from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: holds a {type(state).__name__}, expected a dict of tensors (a state dict).")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor.")
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder or weight file: sharded or not, safetensors (preferred) or `.bin`."""
    files, weight_map = weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for file in tqdm(files, desc="reading weights", unit="file", disable=len(files) < 2):
        for key, tensor in load_weight_file(file).items():
            if key in state:
                raise ConversionError(f"{file}: key {key!r} already came from another shard.")
            if weight_map is not None and weight_map.get(key) != file.name:
                raise ConversionError(
                    f"{file}: holds {key!r}, which the shard index places in {weight_map.get(key)!r}."
                )
            state[key] = tensor
    if weight_map is not None and set(weight_map) - set(state):
        raise ConversionError(f"{path}: keys listed in the shard index but absent: {_name(set(weight_map) - set(state))}")
    return state


def _name(keys, limit: int = 25) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def map_state_dict(
    source: dict[str, torch.Tensor],
    rename: Callable[[str], str | None],
    expected: dict[str, torch.Size],
    *,
    source_name: str,
    ignore: Callable[[str, torch.Tensor], str | None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[MappedTensor], list[tuple[str, str]]]:
    """Renames every source tensor to exactly the `expected` keys, or raises naming every key at fault.

    `rename(key)` gives the target key (None: unknown); `ignore(key, tensor)` gives a reason to leave a key out
    (None: do not). Unknown keys, targets that the model does not have, two keys for one target, shape mismatches
    and expected keys that nothing fills are all errors: nothing is dropped or left at random init silently.
    """
    mapped, rows, ignored = {}, [], []
    unknown, mismatched, duplicates = [], [], []
    origin = {}
    for key, tensor in source.items():
        reason = ignore(key, tensor) if ignore else None
        if reason:
            ignored.append((key, reason))
            continue
        target = rename(key)
        if target is None or target not in expected:
            unknown.append(key if target is None else f"{key} (-> {target}, which the model does not have)")
            continue
        if target in mapped:
            duplicates.append(f"{origin[target]} and {key} -> {target}")
            continue
        if tuple(tensor.shape) != tuple(expected[target]):
            mismatched.append(f"{key} -> {target}: {list(tensor.shape)}, expected {list(expected[target])}")
        mapped[target], origin[target] = tensor, key
        rows.append(MappedTensor(key, target, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")))
    missing = sorted(set(expected) - set(mapped))
    problems = []
    if unknown:
        problems.append(f"unknown keys ({len(unknown)}): {_name(unknown)}")
    if missing:
        problems.append(f"missing keys ({len(missing)}), nothing in the source fills them: {_name(missing)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_name(mismatched)}")
    if duplicates:
        problems.append(f"several source keys for one target ({len(duplicates)}): {_name(duplicates)}")
    if problems:
        raise ConversionError(f"{source_name}: cannot convert the weights.\n  " + "\n  ".join(problems))
    return mapped, rows, ignored


def expected_shapes(model_class, config) -> dict[str, torch.Size]:
    """Parameter and persistent-buffer shapes of `model_class(config)`, built on the meta device (no memory).

    With tied word embeddings the LM head is left out: checkpoints store only the embedding matrix.
    """
    with torch.device("meta"):
        model = model_class(config)
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def position_ids_ignore(key: str, tensor: torch.Tensor) -> str | None:
    """`ignore` hook: older transformers saved the towers' `embeddings.position_ids` (an arange) as a weight."""
    if key.endswith("embeddings.position_ids") and torch.equal(tensor.flatten(), torch.arange(tensor.numel())):
        return "a buffer the model recomputes (0, 1, 2, ...)"
    return None


def combine_ignores(*hooks):
    """One `ignore` hook from several (None entries skipped): the first reason given wins."""
    hooks = [hook for hook in hooks if hook is not None]
    return lambda key, tensor: next((why for hook in hooks if (why := hook(key, tensor))), None)


def tied_head_ignore(tied: bool, embed: torch.Tensor | None) -> Callable[[str, torch.Tensor], str | None] | None:
    """`ignore` hook for checkpoints that store an LM head although the config ties it to the embeddings `embed`:
    the copy is dropped when it equals them, and is an error when it does not."""
    if not tied:
        return None

    def ignore(key: str, tensor: torch.Tensor) -> str | None:
        if key not in ("lm_head.weight", "language_model.lm_head.weight"):
            return None
        if embed is not None and not torch.equal(embed, tensor):
            raise ConversionError(f"{key} differs from the input embeddings, but the config ties them.")
        return "tied to the input embeddings (tie_word_embeddings)"

    return ignore


def cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Casts floating-point tensors to `dtype` (None: unchanged); integer buffers keep theirs."""
    if dtype is None:
        return state_dict
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def floating_dtype(state_dict: dict[str, torch.Tensor], prefer: str | None = None) -> torch.dtype:
    """The dtype of tensor `prefer` when present, else of the first floating-point tensor."""
    if prefer in state_dict:
        return state_dict[prefer].dtype
    return next(v.dtype for v in state_dict.values() if v.is_floating_point())


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ConversionError(f"Unknown dtype {name!r}: expected 'auto' or one of {sorted(DTYPES)}.")
    return DTYPES[name]


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder next to `dst` and renames it to `dst` only when the block succeeds.

    A failure (or Ctrl-C) removes the temporary folder, so `dst` is either absent, untouched or complete.
    """
    dst = Path(dst).resolve()
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists; pass --overwrite to replace it.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.parent / f".{dst.name}.replaced-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)


def load_our_config(src: str | Path) -> LlavaConfig:
    """A llava-plugin checkpoint's config; an invalid field (e.g. an unknown projector_type) names config.json."""
    try:
        return LlavaConfig.from_pretrained(src)
    except ValueError as error:
        raise ConversionError(f"{Path(src) / 'config.json'}: {error}") from None


def check_distinct(src: str | Path, dst: str | Path) -> None:
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or src in dst.parents:
        raise ConversionError(f"The destination {dst} must not be the source {src} or lie inside it.")


def save_ours(
    out_dir: Path,
    config: LlavaConfig,
    state_dict: dict[str, torch.Tensor],
    processor: LlavaProcessor,
    generation_config: GenerationConfig | None,
    max_shard_size: str = "5GB",
) -> None:
    """Writes a llava-plugin checkpoint (weights, config, code, processor) from an already-checked state dict.

    The model is built on the meta device and the tensors are assigned, not copied: a 7B conversion holds one copy
    of the weights in memory.
    """
    with torch.device("meta"):
        model = LlavaForCausalLM(config)
    if config.tie_word_embeddings:
        state_dict = {**state_dict, "lm_head.weight": state_dict[_EMBED_KEY]}
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    if generation_config is not None:
        model.generation_config = generation_config
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(out_dir)


def save_safetensors(out_dir: Path, state_dict: dict[str, torch.Tensor], max_shard_size: str = "5GB") -> None:
    """Writes `model.safetensors`, or shards plus `model.safetensors.index.json` above `max_shard_size`."""
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state_dict[k].contiguous() for k in keys}, out_dir / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state_dict.values())},
                 "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def clip_image_processor(image_processor):
    """A CLIP image processor with the same resize/crop/normalisation as `image_processor` (a CLIP or Llava one).

    Our processor pads to square itself (`image_aspect_ratio="pad"`), so the image processor must not pad again.
    """
    params = {k: v for k, v in image_processor.to_dict().items() if k in _CLIP_IMAGE_PARAMS}
    return _image_processor_class("CLIPImageProcessor")(**params)


def llava_image_processor(image_processor, do_pad: bool):
    """transformers' `LlavaImageProcessor`: CLIP preprocessing plus, with `do_pad`, padding to a square filled with
    the mean colour (`int(mean * 255)`, as original LLaVA's `expand2square`)."""
    params = {k: v for k, v in image_processor.to_dict().items() if k in _CLIP_IMAGE_PARAMS}
    return _image_processor_class("LlavaImageProcessor")(**params, do_pad=do_pad)


def _image_processor_class(name: str):
    # The torchvision backend when it imports, else the PIL one: the same numbers, without the fallback warning.
    return getattr(transformers, name if is_torchvision_available() else name + "Pil")


def is_clip_like(image_processor) -> bool:
    """Whether an image processor is CLIP's preprocessing (CLIP, or Llava's = CLIP + optional pad to square)."""
    return type(image_processor).__name__.removesuffix("Pil").removesuffix("Fast") in _CLIP_LIKE_IMAGE_PROCESSORS


_CLIP_IMAGE_PARAMS = {
    "do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std",
}
_CLIP_LIKE_IMAGE_PROCESSORS = {"CLIPImageProcessor", "LlavaImageProcessor"}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ---------------------------------------------------------------------------------------------------------------------
# llava-hf <-> llava-plugin
# ---------------------------------------------------------------------------------------------------------------------

LAYOUTS = ("hub", "current")

# Vision towers whose transformers 4.x class nested its weights under `vision_model.` (5.x strips it on load).
_VISION_MODEL_LEVEL = {"clip_vision_model", "siglip_vision_model", "siglip2_vision_model"}

# Any llava-hf layout -> transformers 5.23 in-memory names, which are also ours. The tower's `vision_model.` level is
# resolved against the expected keys afterwards.
_HF_TO_MEMORY = [
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^(model\.(language_model|vision_tower|multi_modal_projector)\.|lm_head\.)"), r"\1"),
]


def hf_key_to_memory(key: str, expected: dict) -> str | None:
    """The in-memory (transformers 5.23 and llava-plugin) name of a llava-hf checkpoint key, or None."""
    for pattern, replacement in _HF_TO_MEMORY:
        if pattern.match(key):
            target = pattern.sub(replacement, key, count=1)
            break
    else:
        return None
    if target not in expected and target.startswith("model.vision_tower.vision_model."):
        target = "model.vision_tower." + target[len("model.vision_tower.vision_model."):]
    return target


def memory_key_to_hf(key: str, layout: str, vision_model_type: str) -> str:
    """The on-disk name, in `layout`, of an in-memory llava-hf key."""
    level = "vision_model." if vision_model_type in _VISION_MODEL_LEVEL else ""
    if key.startswith("model.vision_tower."):
        key = "model.vision_tower." + level + key[len("model.vision_tower."):]
    if layout == "current":
        return key
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model."):]
    if key.startswith("lm_head."):
        return "language_model." + key
    return key.removeprefix("model.")


def hf_strategy(config: LlavaConfig) -> tuple[str, int]:
    """llava-hf's (`vision_feature_select_strategy`, `num_additional_image_tokens`) for our config.

    llava-hf's `default` drops the first token whatever the tower; for towers without a CLS token (SigLIP) our
    `default` keeps every patch, which llava-hf calls `full`.
    """
    prefix = num_prefix_tokens(config.vision_config)
    return ("full" if prefix == 0 else config.vision_feature_select_strategy), prefix


def our_strategy(hf_config) -> str:
    prefix = num_prefix_tokens(hf_config.vision_config)
    strategy = hf_config.vision_feature_select_strategy
    if prefix == 0:
        if strategy == "default":
            raise ConversionError(
                "vision_feature_select_strategy='default' with a tower without CLS token "
                f"({hf_config.vision_config.model_type}) drops the first patch; llava-plugin cannot express that."
            )
        return "default"
    return strategy


def hf_image_token_count(processor: HFLlavaProcessor) -> int:
    """Image tokens transformers' LlavaProcessor writes per image (its `replace_image_token` arithmetic)."""
    crop = processor.image_processor.crop_size or processor.image_processor.size
    height, width = crop["height"], crop["width"]
    count = (height // processor.patch_size) * (width // processor.patch_size) + processor.num_additional_image_tokens
    return count - 1 if processor.vision_feature_select_strategy == "default" else count


def to_llava_hf_config(config: LlavaConfig, dtype: torch.dtype) -> HFLlavaConfig:
    """transformers' LlavaConfig for our config; raises ConversionError for what llava-hf cannot express."""
    problems = []
    if config.projector_type != "mlp2x_gelu":
        problems.append(
            f"projector_type={config.projector_type!r}: llava-hf's projector is always Linear -> GELU -> Linear "
            "('mlp2x_gelu')"
        )
    if config.image_token_pooling != 1:
        problems.append(f"image_token_pooling={config.image_token_pooling}: llava-hf has no pooling of image tokens")
    if getattr(config, "projector_layernorm", False):
        problems.append("projector_layernorm=True: llava-hf's projector has no LayerNorm")
    if problems:
        raise ConversionError("This model cannot be exported to llava-hf:\n  " + "\n  ".join(problems))
    strategy, _ = hf_strategy(config)
    hf_config = HFLlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        image_seq_length=config.image_seq_length,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=config.vision_feature_layer,
        multimodal_projector_bias=config.projector_bias,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    hf_config.architectures = ["LlavaForConditionalGeneration"]
    hf_config.dtype = dtype
    return hf_config


def from_llava_hf_config(hf_config) -> LlavaConfig:
    """Our LlavaConfig for transformers' one; raises ConversionError for what llava-plugin cannot express."""
    if not isinstance(hf_config.vision_feature_layer, int):
        raise ConversionError(
            f"vision_feature_layer={hf_config.vision_feature_layer!r}: llava-plugin projects one layer, not a list."
        )
    if hf_config.projector_hidden_act != "gelu":
        raise ConversionError(
            f"projector_hidden_act={hf_config.projector_hidden_act!r}: llava-plugin's projector uses exact GELU."
        )
    return LlavaConfig(
        vision_config=hf_config.vision_config.to_dict(),
        text_config=hf_config.text_config.to_dict(),
        projector_type="mlp2x_gelu",
        projector_bias=hf_config.multimodal_projector_bias,
        vision_feature_layer=hf_config.vision_feature_layer,
        vision_feature_select_strategy=our_strategy(hf_config),
        image_token_id=hf_config.image_token_id,
        tie_word_embeddings=hf_config.tie_word_embeddings,
    )


def import_llava_hf(
    src: str | Path,
    dst: str | Path,
    *,
    chat_template: str | None = None,
    image_aspect_ratio: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> ConversionReport:
    """Converts a llava-hf folder (`LlavaForConditionalGeneration` + its processor) into a llava-plugin checkpoint.

    Args:
        src: a local llava-hf folder, in any of the layouts listed in the module docstring.
        dst: the folder to write; must not exist unless `overwrite`.
        chat_template: a name from `processing.chat_templates` to replace the source's template; by default the
            source's template is kept verbatim (a source without one gets `vicuna_v1`).
        image_aspect_ratio: `pad` or `crop`; by default `pad` when the source's image processor pads
            (`LlavaImageProcessor(do_pad=True)`), else `crop` (published llava-hf processors do not pad).
        dtype: `auto` (keep the source's), `float32`, `float16` or `bfloat16`.
    """
    src, report = Path(src), ConversionReport(str(src), str(dst))
    check_distinct(src, dst)
    raw = PreTrainedConfig.get_config_dict(str(src))[0]
    if raw.get("model_type") != "llava":
        raise ConversionError(
            f"{src / 'config.json'}: model_type is {raw.get('model_type')!r}, expected 'llava' "
            "(transformers' LlavaForConditionalGeneration)."
        )
    hf_config = HFLlavaConfig.from_pretrained(src)
    config = from_llava_hf_config(hf_config)
    if hf_config.image_seq_length != config.image_seq_length:
        report.notes.append(
            f"config.json says image_seq_length={hf_config.image_seq_length}; the tower and strategy give "
            f"{config.image_seq_length}, which is what transformers' processor writes too: using it."
        )

    expected = expected_shapes(LlavaForCausalLM, config)
    source = read_state_dict(src)
    embed = next((v for k, v in source.items() if hf_key_to_memory(k, expected) == _EMBED_KEY), None)
    state, rows, ignored = map_state_dict(
        source, lambda key: hf_key_to_memory(key, expected), expected, source_name=str(src),
        ignore=combine_ignores(position_ids_ignore, tied_head_ignore(config.tie_word_embeddings, embed)),
    )
    report.tensors, report.ignored = rows, ignored
    target_dtype = parse_dtype(dtype)
    state = cast(state, target_dtype)

    processor = import_processor(src, config, chat_template, image_aspect_ratio, report)
    generation_config = _generation_config(src, config)
    with atomic_output_dir(dst, overwrite) as out:
        save_ours(out, config, state, processor, generation_config, max_shard_size)
    return report


def import_processor(src: Path, config: LlavaConfig, chat_template, image_aspect_ratio, report) -> LlavaProcessor:
    """Our LlavaProcessor from a llava-hf folder's processor: same tokenizer, same image preprocessing."""
    try:
        hf_processor = AutoProcessor.from_pretrained(src)
    except (OSError, ValueError, TypeError) as error:
        raise ConversionError(f"{src}: cannot load its processor (tokenizer + image processor): {error}") from None
    tokenizer, image_processor = hf_processor.tokenizer, hf_processor.image_processor
    image_token = getattr(hf_processor, "image_token", "<image>")
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id != config.image_token_id:
        raise ConversionError(
            f"{src}: the tokenizer gives {image_token!r} id {token_id}, config.json says image_token_index="
            f"{config.image_token_id}."
        )
    if getattr(hf_processor, "patch_size", None):
        count = hf_image_token_count(hf_processor)
        if count != config.image_seq_length:
            raise ConversionError(
                f"{src}: its processor writes {count} image tokens per image (patch_size {hf_processor.patch_size}, "
                f"strategy {hf_processor.vision_feature_select_strategy!r}, "
                f"num_additional_image_tokens {hf_processor.num_additional_image_tokens}) but the model takes "
                f"{config.image_seq_length}."
            )
    source_pads = bool(getattr(image_processor, "do_pad", False))
    image_aspect_ratio = image_aspect_ratio or ("pad" if source_pads else "crop")
    if is_clip_like(image_processor):
        image_processor = clip_image_processor(image_processor)
    elif source_pads:
        raise ConversionError(f"{src}: {type(image_processor).__name__} pads images itself; expected a CLIP or Llava one.")

    if chat_template is not None:
        template = get_chat_template(chat_template)
    elif hf_processor.chat_template:
        template = hf_processor.chat_template
        if not _GENERATION_TAG.search(template):
            report.notes.append(
                "the source's chat template has no {% generation %} block (llava-hf's own template also omits the "
                "'</s>' after answers): fine for inference; to fine-tune with assistant-only loss pass "
                "--chat-template vicuna_v1."
            )
    else:
        template = get_chat_template("vicuna_v1")
        report.notes.append("the source has no chat template: using vicuna_v1 (LLaVA-1.5's).")
    report.notes.append(f"image_aspect_ratio={image_aspect_ratio!r} (source image processor pads: {source_pads}).")
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        image_seq_length=config.image_seq_length,
        image_aspect_ratio=image_aspect_ratio,
        image_token=image_token,
    )


def fold_vision_feature_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`vision_feature_norm` is an affine map before `linear_1`, so it folds into it exactly:
    W (x - m) / s + b = (W / s) x + (b - (W / s) m). llava-hf then computes the same projector without it."""
    prefix = next((k[: -len("feature_mean")] for k in state if k.endswith("multi_modal_projector.feature_mean")), None)
    if prefix is None:
        return state
    state = dict(state)
    mean, std = state.pop(prefix + "feature_mean").double(), state.pop(prefix + "feature_std").double()
    weight, bias = state[prefix + "linear_1.weight"], state.get(prefix + "linear_1.bias")
    folded = weight.double() / std
    shift = folded @ mean
    if bias is None:
        if shift.abs().max() > 0:
            raise ConversionError("vision_feature_norm with projector_bias=False cannot fold into llava-hf's projector.")
    else:
        state[prefix + "linear_1.bias"] = (bias.double() - shift).to(bias.dtype)
    state[prefix + "linear_1.weight"] = folded.to(weight.dtype)
    return state


def export_llava_hf(
    src: str | Path,
    dst: str | Path,
    *,
    layout: str = "hub",
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> ConversionReport:
    """Writes a llava-plugin checkpoint as a llava-hf folder: plain `LlavaForConditionalGeneration.from_pretrained`
    and `AutoProcessor.from_pretrained` load it, no `trust_remote_code`.

    Args:
        src: a llava-plugin checkpoint folder (`config.json` with model_type `llava_plugin`, weights, processor).
        dst: the folder to write; must not exist unless `overwrite`.
        layout: `hub` (the key names of published llava-hf repositories, default) or `current` (transformers >= 4.52).
        dtype: `auto` (keep the source's), `float32`, `float16` or `bfloat16`.

    Raises ConversionError for what llava-hf cannot express (projectors other than `mlp2x_gelu`, image-token
    pooling).
    """
    if layout not in LAYOUTS:
        raise ConversionError(f"Unknown layout {layout!r}: expected one of {LAYOUTS}.")
    src, report = Path(src), ConversionReport(str(src), str(dst))
    check_distinct(src, dst)
    raw = PreTrainedConfig.get_config_dict(str(src))[0]
    if raw.get("model_type") != LlavaConfig.model_type:
        raise ConversionError(
            f"{src / 'config.json'}: model_type is {raw.get('model_type')!r}, expected {LlavaConfig.model_type!r}."
        )
    config = load_our_config(src)
    source = fold_vision_feature_norm(read_state_dict(src))
    target_dtype = parse_dtype(dtype) or floating_dtype(source, _EMBED_KEY)
    hf_config = to_llava_hf_config(config, target_dtype)

    # Checked against the model transformers will build, under the names it holds in memory.
    expected = expected_shapes(LlavaForConditionalGeneration, hf_config)
    state, rows, ignored = map_state_dict(
        source, lambda key: key if key in expected else None, expected, source_name=str(src),
        ignore=tied_head_ignore(config.tie_word_embeddings, source.get(_EMBED_KEY)),
    )
    vision_type = config.vision_config.model_type
    on_disk = {memory_key_to_hf(key, layout, vision_type): tensor for key, tensor in cast(state, target_dtype).items()}
    report.tensors = [
        MappedTensor(r.source, memory_key_to_hf(r.target, layout, vision_type), r.shape,
                     str(target_dtype).removeprefix("torch."))
        for r in rows
    ]
    report.ignored = ignored

    processor = export_processor(src, config, report)
    generation_config = _generation_config(src, config)
    with atomic_output_dir(dst, overwrite) as out:
        save_safetensors(out, on_disk, max_shard_size)
        hf_config.save_pretrained(out)
        generation_config.save_pretrained(out)
        processor.save_pretrained(out)
    return report


def export_processor(src: Path, config: LlavaConfig, report: ConversionReport) -> HFLlavaProcessor:
    """transformers' LlavaProcessor writing the same prompts and image tokens as our processor in `src`."""
    ours = AutoProcessor.from_pretrained(src)  # our LlavaProcessor: this package registered it for llava_plugin
    strategy, additional = hf_strategy(config)
    image_processor = ours.image_processor
    pad = ours.image_aspect_ratio == "pad"
    if is_clip_like(image_processor):
        image_processor = llava_image_processor(image_processor, do_pad=pad)
        if pad:
            report.notes.append(
                "image_aspect_ratio='pad' -> LlavaImageProcessor(do_pad=True): pads to square with int(mean * 255), "
                "as original LLaVA. Published llava-hf processors (CLIPImageProcessor) and serving stacks that "
                "bring their own image preprocessing do NOT pad to square: check yours."
            )
    elif pad:
        report.notes.append(
            f"image_aspect_ratio='pad' cannot be expressed with {type(image_processor).__name__}: the exported "
            "processor does NOT pad to square; pad images yourself before calling it."
        )
    hf_processor = HFLlavaProcessor(
        image_processor=image_processor,
        tokenizer=ours.tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=ours.chat_template,
        image_token=ours.image_token,
        num_additional_image_tokens=additional,
    )
    count = hf_image_token_count(hf_processor)
    if count != config.image_seq_length:
        raise ConversionError(
            f"{src}: transformers' processor would write {count} image tokens per image, the model takes "
            f"{config.image_seq_length} (is the image processor's crop_size the tower's image_size?)."
        )
    report.notes.append(
        f"processor: patch_size={config.vision_config.patch_size}, vision_feature_select_strategy={strategy!r}, "
        f"num_additional_image_tokens={additional} -> {count} image tokens per image (= image_seq_length)."
    )
    return hf_processor


def _generation_config(src: Path, config) -> GenerationConfig:
    """The source's generation config, or one derived from its language model's config."""
    if (src / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(src)
    return GenerationConfig.from_model_config(config.text_config)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_llava.convert_llava_hf",
        description="Import a llava-hf checkpoint into llava-plugin, or export a llava-plugin checkpoint to llava-hf.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("import", "llava-hf folder (LlavaForConditionalGeneration) -> llava-plugin checkpoint"),
        ("export", "llava-plugin checkpoint -> llava-hf folder"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("src", type=Path)
        command.add_argument("dst", type=Path)
        command.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
        command.add_argument("--max-shard-size", default="5GB")
        command.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        if name == "import":
            command.add_argument(
                "--chat-template", default=None, choices=sorted(CHAT_TEMPLATES),
                help="replace the source's template (default: keep it)",
            )
            command.add_argument("--image-aspect-ratio", choices=["pad", "crop"], default=None)
        else:
            command.add_argument("--layout", choices=LAYOUTS, default="hub")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            report = import_llava_hf(
                args.src, args.dst, chat_template=args.chat_template, image_aspect_ratio=args.image_aspect_ratio,
                dtype=args.dtype, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
            )
        else:
            report = export_llava_hf(
                args.src, args.dst, layout=args.layout, dtype=args.dtype, overwrite=args.overwrite,
                max_shard_size=args.max_shard_size,
            )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
