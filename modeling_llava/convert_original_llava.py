"""Import original LLaVA checkpoints (haotian-liu/LLaVA's `LlavaLlamaForCausalLM`, e.g. llava-v1.5-7b) into llava-plugin.

    python -m modeling_llava.convert_original_llava SRC DST [--vision-tower PATH_OR_ID] [--chat-template vicuna_v1]
    python -m modeling_llava.convert_original_llava mm_projector.bin DST --base OUR_CHECKPOINT

A full checkpoint is a Llama folder whose flat config.json adds `mm_vision_tower`, `mm_projector_type`,
`mm_vision_select_layer`, `mm_vision_select_feature`, `mm_hidden_size` and `image_aspect_ratio`, with weights

    model.embed_tokens / model.layers.* / model.norm / lm_head      -> model.language_model.* / lm_head
    model.mm_projector.{0,2,...}.*  (linear: model.mm_projector.*)  -> model.multi_modal_projector.linear_{1,2,...}.*

The vision tower is not in these checkpoints (the code downloaded `mm_vision_tower`, a CLIP on the Hub): it is read
from `--vision-tower` (default: `mm_vision_tower`), with its image processor. A checkpoint that does carry tower
weights (`model.vision_tower.vision_tower.vision_model.*`, a tuned tower) uses them instead.

Original LLaVA spliced the image features at a placeholder id (-200) that the tokenizer never produced; here the
processor writes `image_seq_length` `<image>` tokens instead, so `<image>` is added to the tokenizer. Its new rows in
the embeddings (never read: image features replace them) and the LM head are zero, and generation suppresses it, so
greedy decoding is the original's. The chat template (`--chat-template`, default `vicuna_v1` = LLaVA-1.5's
`--version v1`; `llava_v1` is what its CLI picked for "v1" checkpoints) and `image_aspect_ratio` make the converted
processor prompt exactly as the original code did.

A stage-1 projector (`mm_projector.bin`, or its folder with the stage-1 config.json) holds the projector only: it is
attached to a llava-plugin checkpoint given with `--base`, whose tower, language model and processor it keeps. The
stage-1 config (when present) sets projector_type, vision_feature_layer and the select strategy; without it the
projector type is read off the keys.

`.bin` files are read with `torch.load(weights_only=True)`; safetensors (sharded or not) are preferred when present.
"""

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer, GenerationConfig, LlamaConfig

from processing.chat_templates import CHAT_TEMPLATES, get_chat_template
from processing.processing_llava import LlavaProcessor

from .configuration_llava import LlavaConfig, projector_depth
from .convert_llava_hf import (
    DTYPES,
    ConversionError,
    ConversionReport,
    WEIGHT_FILES,
    atomic_output_dir,
    cast,
    check_distinct,
    combine_ignores,
    expected_shapes,
    floating_dtype,
    load_our_config,
    map_state_dict,
    parse_dtype,
    position_ids_ignore,
    read_state_dict,
    save_ours,
    tied_head_ignore,
)
from .modeling_llava import LlavaForCausalLM


ORIGINAL_ARCHITECTURES = {"LlavaLlamaForCausalLM"}
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}  # original mm_vision_select_feature -> our strategy

# Llama fields of the flat config; everything else is LLaVA's (mm_*, training flags) or bookkeeping.
_LLAMA_FIELDS = {
    "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "head_dim", "hidden_act", "hidden_size",
    "initializer_range", "intermediate_size", "max_position_embeddings", "mlp_bias", "num_attention_heads",
    "num_hidden_layers", "num_key_value_heads", "pad_token_id", "pretraining_tp", "rms_norm_eps", "rope_parameters",
    "rope_theta", "rope_scaling", "tie_word_embeddings", "use_cache", "vocab_size",
}
_BOOKKEEPING_FIELDS = {"_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype"}

_LM_KEY = re.compile(r"^model\.(embed_tokens|layers|norm)\.")
_PROJECTOR_KEY = re.compile(r"^(?:model\.)?mm_projector\.(?:(\d+)\.)?(weight|bias)$")
_TOWER_KEY = re.compile(r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?")
_ROTARY_KEY = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def projector_key(key: str, projector_type: str) -> str | None:
    """Our name for an original projector key: `mm_projector.{2i}.*` -> `linear_{i+1}.*` (linear: no index)."""
    match = _PROJECTOR_KEY.match(key)
    if not match:
        return None
    index, kind = match.groups()
    if projector_type == "linear":
        return f"model.multi_modal_projector.linear_1.{kind}" if index is None else None
    if index is None or int(index) % 2:  # odd indices are the GELUs, which hold no weights
        return None
    return f"model.multi_modal_projector.linear_{int(index) // 2 + 1}.{kind}"


def projector_type_of(keys) -> str:
    """The projector type a set of projector weights implies: no index -> linear, 0,2,...,2(N-1) -> mlpNx_gelu."""
    indices = {m.group(1) for m in map(_PROJECTOR_KEY.match, keys) if m}
    if indices == {None}:
        return "linear"
    if None not in indices and {int(i) for i in indices} == set(range(0, 2 * len(indices), 2)):
        return f"mlp{len(indices)}x_gelu"
    raise ConversionError(f"Cannot tell the projector type from the keys {sorted(keys)}.")


def strategy_of(select_feature: str, where: str) -> str:
    if select_feature not in SELECT_FEATURES:
        raise ConversionError(
            f"{where}: mm_vision_select_feature={select_feature!r}; expected one of {sorted(SELECT_FEATURES)}."
        )
    return SELECT_FEATURES[select_feature]


def aspect_ratio_of(value, where: str) -> str:
    """Original `image_aspect_ratio`: `pad` pads to square; anything but `anyres` (LLaVA-NeXT) resizes and crops."""
    if value == "pad":
        return "pad"
    if value in (None, "", "square", "crop", "resize"):
        return "crop"
    raise ConversionError(f"{where}: image_aspect_ratio={value!r} (LLaVA-NeXT's tiling) is not supported.")


def read_original_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src}: no config.json.")
    raw = json.loads(path.read_text())
    architectures = set(raw.get("architectures") or [])
    if not architectures & ORIGINAL_ARCHITECTURES or "mm_vision_tower" not in raw:
        raise ConversionError(
            f"{path}: not an original LLaVA-Llama checkpoint (architectures {sorted(architectures)}, "
            f"mm_vision_tower {'present' if 'mm_vision_tower' in raw else 'absent'}); expected "
            f"{sorted(ORIGINAL_ARCHITECTURES)} with mm_vision_tower."
        )
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if raw.get(flag):
            raise ConversionError(
                f"{path}: {flag}=true (LLaVA v0 wraps images in <im_start>/<im_end>/<im_patch> tokens), which "
                "llava-plugin's processor does not write."
            )
    return raw


def load_vision_tower(name_or_path: str, dtype: torch.dtype):
    """The vision tower (a `CLIPVisionModel` for CLIP) and its image processor from a Hub id or a local folder."""
    try:
        tower = AutoModel.from_pretrained(name_or_path)
        image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ConversionError(f"Cannot load the vision tower {name_or_path!r} (--vision-tower): {error}") from None
    if hasattr(tower.config, "vision_config"):  # a full CLIP/SigLIP: keep its vision half only
        tower = tower.vision_model
    return tower.to(dtype), image_processor


def add_image_token(tokenizer, image_token: str = "<image>") -> tuple[int, bool]:
    """Adds `<image>` as a special token when absent (original LLaVA never tokenized it); returns (id, added)."""
    added = image_token not in tokenizer.get_vocab()
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(image_token), added


def grow_vocab(state: dict, vocab_size: int, report: ConversionReport) -> None:
    """Appends zero rows to the embeddings and the LM head up to `vocab_size` (room for `<image>`)."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state and state[key].shape[0] < vocab_size:
            old = state[key]
            state[key] = torch.cat([old, old.new_zeros(vocab_size - old.shape[0], old.shape[1])])
            report.notes.append(f"{key}: {old.shape[0]} -> {vocab_size} rows (zero rows for <image>).")


def rotary_check(text_config) -> Callable[[str, torch.Tensor], str | None]:
    """`ignore` hook: old checkpoints saved each layer's `rotary_emb.inv_freq`; it is recomputed from the config,
    after checking that the stored one is what the config gives (else the config misdescribes the RoPE)."""
    head_dim = text_config.head_dim
    theta = text_config.rope_parameters["rope_theta"]
    expected = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))

    def ignore(key: str, tensor: torch.Tensor) -> str | None:
        if not _ROTARY_KEY.match(key):
            return None
        if tensor.shape != expected.shape or not torch.allclose(tensor.float(), expected, rtol=1e-3):
            raise ConversionError(
                f"{key}: the stored RoPE frequencies differ from those of rope_theta={theta}, head_dim={head_dim}."
            )
        return f"recomputed from the config (rope_theta={theta})"

    return ignore


def convert_original_llava(
    src: str | Path,
    dst: str | Path,
    *,
    vision_tower: str | None = None,
    chat_template: str | None = None,
    image_aspect_ratio: str | None = None,
    dtype: str | None = None,
    base: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> ConversionReport:
    """Converts an original LLaVA checkpoint folder, or attaches a stage-1 `mm_projector.bin` to `base`.

    Args:
        src: an original LLaVA folder (flat config.json, tokenizer, weights), or a stage-1 projector (the
            `mm_projector.bin` file, or a folder holding it and no full weights).
        dst: the llava-plugin checkpoint folder to write; must not exist unless `overwrite`.
        vision_tower: Hub id or folder of the CLIP tower; defaults to the config's `mm_vision_tower`.
        chat_template: a name from `processing.chat_templates`; None: `vicuna_v1` (LLaVA-1.5's training format),
            or for a projector the base's template.
        image_aspect_ratio: `pad` or `crop`; defaults to the config's `image_aspect_ratio` (`pad` -> pad, else crop).
        dtype: `auto` (the language model's), `float32`, `float16` or `bfloat16`; the tower is cast to it too.
        base: for a projector: the llava-plugin checkpoint to attach it to.
    """
    src = Path(src)
    if is_projector_only(src):
        if base is None:
            raise ConversionError(
                f"{src} holds only a projector (stage 1); pass --base OUR_CHECKPOINT to attach it to a tower and LM."
            )
        return attach_projector(
            src, dst, base=base, chat_template=chat_template, image_aspect_ratio=image_aspect_ratio, dtype=dtype,
            overwrite=overwrite, max_shard_size=max_shard_size,
        )
    if base is not None:
        raise ConversionError(f"{src} is a full checkpoint; --base is only for a lone stage-1 projector.")
    check_distinct(src, dst)
    chat_template = chat_template or "vicuna_v1"
    report = ConversionReport(str(src), str(dst))
    raw = read_original_config(src)
    where = str(src / "config.json")
    projector_type = raw.get("mm_projector_type", "linear")  # the original default
    try:  # before any weights are read: a resampler or other projector cannot be converted
        projector_depth(projector_type)
    except ValueError as error:
        raise ConversionError(f"{where}: field 'mm_projector_type': {error}") from None
    if "mm_vision_select_layer" not in raw:
        raise ConversionError(f"{where}: no mm_vision_select_layer.")
    strategy = strategy_of(raw.get("mm_vision_select_feature", "patch"), where)
    aspect = image_aspect_ratio or aspect_ratio_of(raw.get("image_aspect_ratio"), where)

    source = read_state_dict(src)
    target_dtype = parse_dtype(dtype) or floating_dtype(source, "model.embed_tokens.weight")
    vision_tower = vision_tower or raw["mm_vision_tower"]
    tower, image_processor = load_vision_tower(vision_tower, target_dtype)
    if raw.get("mm_hidden_size", tower.config.hidden_size) != tower.config.hidden_size:
        raise ConversionError(
            f"{where}: mm_hidden_size={raw['mm_hidden_size']} but the tower {vision_tower!r} has hidden_size "
            f"{tower.config.hidden_size}: wrong --vision-tower?"
        )

    tokenizer = AutoTokenizer.from_pretrained(src)
    image_token_id, added = add_image_token(tokenizer)
    if tokenizer.pad_token is None:  # what the original training did for its v1 conversations
        tokenizer.pad_token = tokenizer.unk_token
        report.notes.append(f"pad token = unk token {tokenizer.unk_token!r}, as original LLaVA set it.")
    text_config = llama_config(raw, report)
    text_config.vocab_size = max(text_config.vocab_size, image_token_id + 1)
    text_config.pad_token_id = tokenizer.pad_token_id
    grow_vocab(source, text_config.vocab_size, report)

    config = LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=text_config.to_dict(),
        projector_type=projector_type,
        vision_feature_layer=raw["mm_vision_select_layer"],
        vision_feature_select_strategy=strategy,
        image_token_id=image_token_id,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    expected = expected_shapes(LlavaForCausalLM, config)

    tower_in_checkpoint = any(_TOWER_KEY.match(key) for key in source)
    if tower_in_checkpoint:
        report.notes.append(f"the checkpoint carries its own vision tower weights: used instead of {vision_tower!r}.")
    else:
        source.update({f"{vision_tower}::{key}": value for key, value in tower.state_dict().items()})

    def rename(key: str) -> str | None:
        if _LM_KEY.match(key):
            return "model.language_model." + key[len("model."):]
        if key == "lm_head.weight":
            return key
        if _TOWER_KEY.match(key):
            return "model.vision_tower." + _TOWER_KEY.sub("", key)
        if key.startswith(f"{vision_tower}::"):
            return "model.vision_tower." + key.split("::", 1)[1]
        return projector_key(key, projector_type)

    ignore = combine_ignores(
        rotary_check(config.text_config),
        position_ids_ignore,
        tied_head_ignore(config.tie_word_embeddings, source.get("model.embed_tokens.weight")),
    )
    state, report.tensors, report.ignored = map_state_dict(source, rename, expected, source_name=str(src), ignore=ignore)
    state = cast(state, target_dtype)

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=get_chat_template(chat_template),
        image_seq_length=config.image_seq_length,
        image_aspect_ratio=aspect,
    )
    generation_config = original_generation_config(src, config, image_token_id if added else None)
    report.notes.append(
        f"chat template {chat_template!r}, image_aspect_ratio={aspect!r}, {config.image_seq_length} image tokens per "
        f"image, dtype {str(target_dtype).removeprefix('torch.')}."
    )
    with atomic_output_dir(dst, overwrite) as out:
        save_ours(out, config, state, processor, generation_config, max_shard_size)
    return report


def llama_config(raw: dict, report: ConversionReport) -> LlamaConfig:
    """The Llama half of the flat config; LLaVA's own fields are dropped (and named in the report)."""
    fields = {k: v for k, v in raw.items() if k in _LLAMA_FIELDS}
    dropped = sorted(k for k in raw if k not in _LLAMA_FIELDS and k not in _BOOKKEEPING_FIELDS)
    if dropped:
        report.notes.append(f"config fields not carried to the language model's config: {', '.join(dropped)}.")
    return LlamaConfig(**fields)


def original_generation_config(src: Path, config: LlavaConfig, suppress_id: int | None) -> GenerationConfig:
    """The source's generation config (or one from the Llama config), suppressing `<image>` when we added it."""
    if (src / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(src)
    else:
        generation_config = GenerationConfig.from_model_config(config.text_config)
    generation_config.pad_token_id = config.text_config.pad_token_id
    if suppress_id is not None:
        # The original vocabulary had no such token; a zero LM-head row must never win a greedy step.
        generation_config.suppress_tokens = sorted({*(generation_config.suppress_tokens or []), suppress_id})
    return generation_config


# ---------------------------------------------------------------------------------------------------------------------
# A stage-1 projector attached to one of our checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def is_projector_only(src: Path) -> bool:
    """A weight file, or a folder with `mm_projector.bin`/`.safetensors` and none of the full-checkpoint files."""
    if src.is_file():
        return True
    has_projector = any((src / name).is_file() for name in ("mm_projector.bin", "mm_projector.safetensors"))
    return has_projector and not any((src / name).is_file() for name in WEIGHT_FILES)


def attach_projector(
    src: Path,
    dst: str | Path,
    *,
    base: str | Path,
    chat_template: str | None = None,
    image_aspect_ratio: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> ConversionReport:
    """Our checkpoint `base` with its projector replaced by a stage-1 `mm_projector.bin` (see the module docstring)."""
    base = Path(base)
    check_distinct(base, dst)
    check_distinct(src, dst)
    report = ConversionReport(f"{src} + base {base}", str(dst))
    file = src if src.is_file() else next(p for p in (src / "mm_projector.safetensors", src / "mm_projector.bin")
                                          if p.is_file())
    projector = read_state_dict(file)
    stage1_config_path = (src if src.is_dir() else src.parent) / "config.json"
    stage1 = json.loads(stage1_config_path.read_text()) if stage1_config_path.is_file() else {}

    base_config = load_our_config(base)
    fields = base_config.to_dict()
    inferred = projector_type_of(projector)
    projector_type = stage1.get("mm_projector_type", inferred)
    if projector_type != inferred:
        raise ConversionError(
            f"{stage1_config_path}: mm_projector_type={projector_type!r} but {file} holds a {inferred!r} projector."
        )
    fields.update(projector_type=projector_type, image_seq_length=None)
    if "mm_vision_select_layer" in stage1:
        fields["vision_feature_layer"] = stage1["mm_vision_select_layer"]
    if "mm_vision_select_feature" in stage1:
        fields["vision_feature_select_strategy"] = strategy_of(stage1["mm_vision_select_feature"], str(stage1_config_path))
    sizes = {"mm_hidden_size": base_config.vision_config.hidden_size, "hidden_size": base_config.text_config.hidden_size}
    for name, size in sizes.items():
        if name in stage1 and stage1[name] != size:
            raise ConversionError(f"{stage1_config_path}: {name}={stage1[name]} but the base {base} has {size}.")
    config = LlavaConfig.from_dict(fields)
    for name in ("projector_type", "vision_feature_layer", "vision_feature_select_strategy"):
        if getattr(config, name) != getattr(base_config, name):
            report.notes.append(f"{name}: {getattr(base_config, name)!r} (base) -> {getattr(config, name)!r} (stage 1).")

    base_state = read_state_dict(base)
    base_dtype = floating_dtype(base_state, "model.language_model.embed_tokens.weight")
    target_dtype = parse_dtype(dtype) or base_dtype
    source = {f"base::{k}": v for k, v in base_state.items() if not k.startswith("model.multi_modal_projector.")}
    source.update({f"{file.name}::{k}": v for k, v in projector.items()})

    def rename(key: str) -> str | None:
        origin, name = key.split("::", 1)
        return name if origin == "base" else projector_key(name, projector_type)

    state, report.tensors, report.ignored = map_state_dict(
        source, rename, expected_shapes(LlavaForCausalLM, config), source_name=str(file)
    )
    state = cast(state, target_dtype)

    base_processor = AutoProcessor.from_pretrained(base)
    aspect = image_aspect_ratio or (
        aspect_ratio_of(stage1["image_aspect_ratio"], str(stage1_config_path)) if "image_aspect_ratio" in stage1
        else base_processor.image_aspect_ratio
    )
    processor = LlavaProcessor(
        image_processor=base_processor.image_processor,
        tokenizer=base_processor.tokenizer,
        chat_template=get_chat_template(chat_template) if chat_template else base_processor.chat_template,
        image_seq_length=config.image_seq_length,
        image_aspect_ratio=aspect,
        image_token=base_processor.image_token,
    )
    generation_config = GenerationConfig.from_pretrained(base) if (base / "generation_config.json").is_file() else None
    with atomic_output_dir(dst, overwrite) as out:
        save_ours(out, config, state, processor, generation_config, max_shard_size)
    return report


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_llava.convert_original_llava",
        description="Convert an original LLaVA checkpoint (LlavaLlamaForCausalLM) or a stage-1 mm_projector.bin "
        "into a llava-plugin checkpoint.",
    )
    parser.add_argument("src", type=Path, help="original LLaVA folder, or mm_projector.bin (with --base)")
    parser.add_argument("dst", type=Path)
    parser.add_argument("--vision-tower", default=None, help="CLIP Hub id or folder (default: mm_vision_tower)")
    parser.add_argument("--base", type=Path, default=None, help="our checkpoint to attach a stage-1 projector to")
    parser.add_argument(
        "--chat-template", default=None, choices=sorted(CHAT_TEMPLATES),
        help="default: vicuna_v1 (LLaVA-1.5's --version v1); with --base, the base's template",
    )
    parser.add_argument("--image-aspect-ratio", choices=["pad", "crop"], default=None, help="default: from the config")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        report = convert_original_llava(
            args.src, args.dst, vision_tower=args.vision_tower, chat_template=args.chat_template,
            image_aspect_ratio=args.image_aspect_ratio, dtype=args.dtype, base=args.base, overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
