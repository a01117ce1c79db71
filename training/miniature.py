"""Stand-ins for the pretrained parts of the miniature recipe, trained here because nothing can be downloaded.

LLaVA starts from a pretrained CLIP ViT and a pretrained LLM. The miniature recipe gets both from the synthetic
scene world: a tiny `CLIPModel` trained contrastively on image-caption pairs, then its vision half aligned to the
annotated boxes (`align_clip_regions`; it becomes the frozen tower), and a tiny `LlamaForCausalLM` trained on the
captions and descriptions with a tokenizer trained locally. Each is saved as an ordinary transformers folder, so
stage 1 loads them exactly as it would load `openai/clip-vit-large-patch14` and `lmsys/vicuna-7b-v1.5`.
"""

import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

from modeling_llava.builders import make_image_processor
from processing.chat_templates import VICUNA_V1_SYSTEM
from processing.coco import load_json
from processing.tokenization import train_tokenizer


# vicuna_v1's role names, which precede every turn the LM reads in stage 2.
ROLE_NAMES = {"human": "USER", "gpt": "ASSISTANT"}


@dataclass
class PartsConfig:
    """Sizes and budgets of the stand-ins (defaults: the quickstart's)."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden_size: int = 128
    vision_layers: int = 4
    clip_steps: int = 300
    clip_batch_size: int = 128
    clip_lr: float = 1e-3
    clip_vocab_size: int = 512  # the caption tokenizer's (captions use a few dozen words)
    # Region alignment after the contrastive steps (`align_clip_regions`): each patch token of the hidden state the
    # recipe reads (`vision_feature_layer`, LlavaConfig's default -2) learns to name the annotated box under it and
    # whether it holds the box's centre.
    region_steps: int = 300
    region_batch_size: int = 64
    region_lr: float = 1e-3
    vision_feature_layer: int = -2
    text_hidden_size: int = 128
    text_intermediate_size: int = 256  # 2x, not LLaMA's ~2.7x: the MLP is most of the FLOPs at this width
    text_layers: int = 3
    # At hidden size 128 LLaMA's default 0.02 leaves attention uniform and the LM never reads the image tokens;
    # 0.08 is what made the miniature recipe learn (0.15 was no better).
    text_initializer_range: float = 0.08
    lm_steps: int = 100
    lm_batch_size: int = 32
    lm_max_length: int = 48
    lm_lr: float = 3e-3
    vocab_size: int = 1024
    seed: int = 0


def _captions_by_file(annotations_dir: Path, split: str) -> dict[str, list[str]]:
    data = json.loads((annotations_dir / f"captions_{split}.json").read_text())
    files = {image["id"]: image["file_name"] for image in data["images"]}
    captions: dict[str, list[str]] = {}
    for annotation in data["annotations"]:
        captions.setdefault(files[annotation["image_id"]], []).append(annotation["caption"])
    return captions


def corpus_texts(annotations_dir, split: str, instruction_json=None) -> list[str]:
    """Text the stand-in tokenizer and LM learn from: captions, plus instruction data answers when given."""
    texts = [c for captions in _captions_by_file(Path(annotations_dir), split).values() for c in captions]
    if instruction_json is not None:
        for record in json.loads(Path(instruction_json).read_text()):
            # Each turn as the chat template lays it out ("ASSISTANT: Yes"), not bare ("Yes"): trained on bare turns
            # the tokenizer has no " Yes" token, so a yes/no answer became " " + "Yes", decided at a content-free
            # space token (ideal object tokens in place of the tower, VQA only: existence 0.51 split, 0.71 whole).
            texts += [
                f"{ROLE_NAMES[turn['from']]}: {turn['value'].replace('<image>', '').strip()}"
                for turn in record["conversations"]
            ]
    return texts


def build_tokenizer(texts: list[str], vocab_size: int):
    # The chat template's fixed text goes in too, so the prompt scaffolding costs few tokens per sample.
    scaffold = [VICUNA_V1_SYSTEM, "USER: ASSISTANT:"] * 50
    return train_tokenizer(texts + scaffold, vocab_size=vocab_size)


def _pixel_values(image_processor, paths: list[Path]) -> torch.Tensor:
    images = [Image.open(p).convert("RGB") for p in paths]
    return image_processor(images, return_tensors="pt")["pixel_values"]


def region_labels(instances: dict, image_size: int, patch_size: int) -> dict[str, torch.Tensor]:
    """`{file_name: (patches, 2) long tensor}` from a loaded COCO instances file, patches row-major: column 0 the
    category id of the box under the patch centre (0: background; where boxes overlap the later annotation wins),
    column 1 whether the patch holds a box's centre (1) or not (0)."""
    grid = image_size // patch_size
    centres = (torch.arange(grid) * patch_size + patch_size / 2).tolist()
    labels = {image["id"]: torch.zeros(2, grid, grid, dtype=torch.long) for image in instances["images"]}
    for annotation in instances["annotations"]:
        x, y, w, h = annotation["bbox"]
        rows = [r for r, c in enumerate(centres) if y <= c < y + h]
        cols = [k for k, c in enumerate(centres) if x <= c < x + w]
        label = labels[annotation["image_id"]]
        if rows and cols:
            label[0, rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1] = annotation["category_id"]
        label[1, min(grid - 1, int((y + h / 2) // patch_size)), min(grid - 1, int((x + w / 2) // patch_size))] = 1
    return {image["file_name"]: labels[image["id"]].flatten(1).T for image in instances["images"]}


def align_regions(vision_model, pixels: torch.Tensor, labels: torch.Tensor, num_categories: int, cfg: PartsConfig,
                  rng: random.Random) -> float:
    """Trains the tower so that each patch token of hidden state `cfg.vision_feature_layer` names the annotated box
    under it and says whether it holds the box's centre (`region_labels`; a linear head, discarded afterwards).
    `num_categories` counts the background (id 0). Returns the last batch's patch accuracy on the category.

    Why: LLaVA's LM answers "what colour is the circle?" by finding the image tokens of the circle and reading their
    colour, which needs patch tokens that say what is at their place. A real CLIP ViT's penultimate-layer patch tokens
    do; the tiny contrastive stand-in's do not: a one-head lookup of a shape's colour on them is at chance (0.51 on
    scenes of two or more colours; `python -m evaluation binding-probe`), and so was the colour template end to end.
    Region-level alignment after contrastive pretraining is what RegionCLIP-style training does; here the COCO boxes
    of the scene world supervise it. The centre flag marks each object once, whatever the number of patches it
    covers, which is what counting needs (count 0.77 vs 0.72 without it, one run each)."""
    head = torch.nn.Linear(vision_model.config.hidden_size, num_categories + 1)
    optimizer = torch.optim.AdamW([*vision_model.parameters(), *head.parameters()], lr=cfg.region_lr, weight_decay=0.0)
    accuracy = 0.0
    for _ in tqdm(range(cfg.region_steps), desc="CLIP stand-in (regions)"):
        index = rng.sample(range(len(pixels)), min(cfg.region_batch_size, len(pixels)))
        hidden = vision_model(pixel_values=pixels[index], output_hidden_states=True).hidden_states
        logits = head(hidden[cfg.vision_feature_layer][:, 1:])  # patch tokens, CLS dropped as the recipe does
        category, centre = labels[index].unbind(-1)
        loss = torch.nn.functional.cross_entropy(logits[..., :-1].flatten(0, 1), category.flatten())
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(logits[..., -1], centre.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        accuracy = float((logits[..., :-1].argmax(-1) == category).float().mean())
    return accuracy


def train_clip_standin(images_dir, annotations_dir, split: str, out_dir, cfg: PartsConfig) -> Path:
    """Trains a tiny CLIP contrastively on (image, caption) pairs and saves it with its image processor and its own
    caption tokenizer. Its own, as CLIP's is not the LLM's: the tower then stays the same when the LM's corpus
    (the instruction data) changes."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    captions = _captions_by_file(Path(annotations_dir), split)
    files = sorted(captions)
    tokenizer = train_tokenizer([c for file in files for c in captions[file]], vocab_size=cfg.clip_vocab_size)
    image_processor = make_image_processor(cfg.image_size)
    pixels = _pixel_values(image_processor, [Path(images_dir) / f for f in files])

    heads = max(1, cfg.vision_hidden_size // 32)
    config = CLIPConfig(
        vision_config=dict(
            image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_hidden_size,
            intermediate_size=4 * cfg.vision_hidden_size, num_hidden_layers=cfg.vision_layers,
            num_attention_heads=heads,
        ),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=cfg.vision_hidden_size, intermediate_size=4 * cfg.vision_hidden_size,
            num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=64,
            # CLIP pools the text at its eos; with eos_token_id == 2 it would take the highest token id instead.
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        projection_dim=cfg.vision_hidden_size,
    )
    model = CLIPModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, cfg.clip_steps))))
    for _ in tqdm(range(cfg.clip_steps), desc="CLIP stand-in (contrastive)"):
        index = rng.sample(range(len(files)), min(cfg.clip_batch_size, len(files)))
        texts = [rng.choice(captions[files[i]]) + tokenizer.eos_token for i in index]
        text = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        loss = model(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels[index],
            return_loss=True,
        ).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def align_clip_regions(clip_dir, images_dir, annotations_dir, split: str, out_dir, cfg: PartsConfig) -> dict:
    """Loads the CLIP stand-in from `clip_dir`, aligns its vision half to the annotated regions (`align_regions`) and
    saves the whole CLIP folder to `out_dir` (written beside it, then renamed, so a killed run leaves no half folder),
    with `region_alignment.json` (steps, last patch accuracy), which it returns.

    The image-text alignment is not kept: only the tower's patch tokens are what LLaVA uses, and the contrastive loss
    beside the region loss undid the lookup (one-head colour-of-shape probe 0.69 on scenes of two or more colours
    against 0.94 without it; README stop 19)."""
    torch.manual_seed(cfg.seed)
    model = CLIPModel.from_pretrained(clip_dir).train()
    image_processor = AutoImageProcessor.from_pretrained(clip_dir)
    instances = load_json(Path(annotations_dir) / f"instances_{split}.json")  # errors name the file
    regions = region_labels(instances, cfg.image_size, cfg.patch_size)
    files = sorted(regions)
    pixels = _pixel_values(image_processor, [Path(images_dir) / f for f in files])
    labels = torch.stack([regions[f] for f in files])
    num_categories = 1 + max(c["id"] for c in instances["categories"])
    accuracy = align_regions(model.vision_model, pixels, labels, num_categories, cfg, random.Random(cfg.seed))
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(clip_dir, tmp)  # tokenizer and image processor as they are
    model.save_pretrained(tmp)
    summary = {"region_steps": cfg.region_steps, "vision_feature_layer": cfg.vision_feature_layer,
               "patch_accuracy": round(accuracy, 4)}
    (tmp / "region_alignment.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return summary


def train_lm_standin(texts: list[str], tokenizer, out_dir, cfg: PartsConfig) -> Path:
    """Trains a tiny LLaMA on `texts` (captions, descriptions) and saves it with the tokenizer."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    heads = max(1, cfg.text_hidden_size // 32)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden_size, intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=1024, initializer_range=cfg.text_initializer_range,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lm_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, cfg.lm_steps))))
    for _ in tqdm(range(cfg.lm_steps), desc="LM stand-in (captions)"):
        batch = [tokenizer.bos_token + rng.choice(texts) + tokenizer.eos_token for _ in range(cfg.lm_batch_size)]
        # Truncated here, not by the tokenizer: a fast tokenizer called with truncation keeps that setting in its
        # backend and saves it, and every later user of the saved tokenizer would be cut at lm_max_length.
        enc = tokenizer(batch, padding=True, return_tensors="pt", add_special_tokens=False)
        input_ids = enc["input_ids"][:, : cfg.lm_max_length]
        attention_mask = enc["attention_mask"][:, : cfg.lm_max_length]
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def clip_retrieval_accuracy(clip_dir, images_dir, annotations_dir, split: str, n: int = 256) -> float:
    """Image -> caption top-1 accuracy among `n` held-out pairs: a check that the stand-in tower learned."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    image_processor = make_image_processor(model.config.vision_config.image_size)
    captions = _captions_by_file(Path(annotations_dir), split)
    files = sorted(captions)[:n]
    pixels = _pixel_values(image_processor, [Path(images_dir) / f for f in files])
    text = tokenizer([captions[f][0] + tokenizer.eos_token for f in files], padding=True, return_tensors="pt",
                     add_special_tokens=False)
    with torch.no_grad():
        logits = model(**text, pixel_values=pixels).logits_per_image
    return float((logits.argmax(-1) == torch.arange(len(files))).float().mean())


__all__ = [
    "PartsConfig", "align_clip_regions", "align_regions", "build_tokenizer", "clip_retrieval_accuracy", "corpus_texts",
    "region_labels", "train_clip_standin", "train_lm_standin",
]
