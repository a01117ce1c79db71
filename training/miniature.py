"""Stand-ins for the pretrained parts of the miniature recipe, trained here because nothing can be downloaded.

LLaVA starts from a pretrained CLIP ViT and a pretrained LLM. The miniature recipe gets both from the synthetic
scene world: a tiny `CLIPModel` trained contrastively on image-caption pairs (its vision half becomes the frozen
tower) and a tiny `LlamaForCausalLM` trained on the captions and descriptions with a tokenizer trained locally.
Each is saved as an ordinary transformers folder, so stage 1 loads them exactly as it would load
`openai/clip-vit-large-patch14` and `lmsys/vicuna-7b-v1.5`.
"""

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

from modeling_llava.builders import make_image_processor
from processing.chat_templates import VICUNA_V1_SYSTEM
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
    "PartsConfig", "build_tokenizer", "clip_retrieval_accuracy", "corpus_texts", "train_clip_standin",
    "train_lm_standin",
]
