"""Can the image tokens be looked up by shape? A one-head attention probe on frozen tower features.

Stage 2 answers `What color is the {shape}?` by attending from the question to the image tokens of that shape and
reading their colour, so the features LLaVA reads have to let a shape be *keyed*. That is measured here without the
LM, in seconds: one attention head whose query is a learned vector per shape and whose keys and values are small
MLPs of the (standardized) image tokens is trained to name the colour of a shape that occurs once in a scene, and is
scored on held-out scenes. `multi_colour` counts only scenes with two or more colours, where naming a colour that is
present is not enough: there it reads ~0.5 when the features do not bind colour to shape, 1.0 on ideal object codes.

    python -m evaluation binding-probe --tower runs/quickstart/parts/clip_regions --world runs/quickstart/world
    python -m evaluation binding-probe --tower runs/quickstart/parts/clip --world runs/quickstart/world  # before alignment
    python -m evaluation binding-probe --tower runs/quickstart/stage1 --world runs/quickstart/world --layer 0

`--tower` is a CLIP folder (the stand-in) or a llava_plugin checkpoint (its tower); the features are those LLaVA
reads: hidden state `--layer`, CLS dropped, `--pooling` x `--pooling` average pooling of the patch grid.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from processing.synthetic import COLORS, SHAPES, load_scene_objects


def colour_lookup_items(instances_path, limit: int | None = None) -> tuple[list[str], list[tuple[int, int, int, bool]]]:
    """File names of the first `limit` images (sorted by id) and one item per once-occurring shape:
    `(image index, shape index, colour index, whether the scene has two or more colours)`."""
    files, scenes = load_scene_objects(instances_path)
    ids = sorted(files)[:limit]
    colours = list(COLORS)
    items = []
    for index, image_id in enumerate(ids):
        objects = scenes[image_id]
        counts = Counter(o.shape for o in objects)
        multi = len({o.color for o in objects}) > 1
        items += [(index, SHAPES.index(o.shape), colours.index(o.color), multi) for o in objects if counts[o.shape] == 1]
    return [files[i] for i in ids], items


def _keyed_lookup(feature_size: int, key_size: int = 32, hidden_size: int = 256):
    """The probe's parameters: a query per shape, MLP keys and MLP values (colour logits) of the image tokens."""
    from torch import nn

    def mlp(out_size):
        return nn.Sequential(nn.Linear(feature_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, out_size))

    return nn.ModuleDict({"query": nn.Embedding(len(SHAPES), key_size), "key": mlp(key_size), "value": mlp(len(COLORS))})


def _lookup(probe, tokens, shapes):
    query = probe["query"](shapes)
    scores = (probe["key"](tokens) @ query.unsqueeze(-1)).squeeze(-1) / query.shape[-1] ** 0.5
    return (scores.softmax(-1).unsqueeze(-1) * probe["value"](tokens)).sum(1)


def keyed_lookup_accuracy(
    train_features, train_items: list, eval_features, eval_items: list,
    steps: int = 1000, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
) -> dict:
    """Trains the one-head probe on `train_features` `(images, tokens, dim)` and returns its held-out accuracy,
    overall and on multi-colour scenes. Features are standardized per channel with the training statistics (the tiny
    towers' features share one large common vector)."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    mean, std = train_features.mean((0, 1)), train_features.std((0, 1)) + 1e-6
    train_features, eval_features = (train_features - mean) / std, (eval_features - mean) / std
    probe = _keyed_lookup(train_features.shape[-1])
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)

    def logits(features, items):
        return _lookup(probe, features[[i[0] for i in items]], torch.tensor([i[1] for i in items]))

    for _ in range(steps):
        batch = rng.sample(train_items, min(batch_size, len(train_items)))
        loss = torch.nn.functional.cross_entropy(logits(train_features, batch), torch.tensor([i[2] for i in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        right = logits(eval_features, eval_items).argmax(-1) == torch.tensor([i[2] for i in eval_items])
    multi = torch.tensor([i[3] for i in eval_items])
    return {"all": float(right.float().mean()), "multi_colour": float(right[multi].float().mean()),
            "eval_items": len(eval_items), "multi_colour_items": int(multi.sum())}


def _load_tower(path):
    """The vision tower of a CLIP folder or of a llava_plugin checkpoint, and the image processor saved with it."""
    import modeling_llava  # noqa: F401  (registers llava_plugin with the Auto classes)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, CLIPModel

    if AutoConfig.from_pretrained(path).model_type == "clip":
        tower = CLIPModel.from_pretrained(path).vision_model
    else:
        tower = AutoModelForCausalLM.from_pretrained(path).model.vision_tower
    return tower.eval(), AutoProcessor.from_pretrained(path).image_processor


def tower_features(tower, image_processor, paths: list[Path], layer: int = -2, pooling: int = 2, batch_size: int = 256):
    """The features LLaVA reads: hidden state `layer`, CLS dropped, `pooling` x `pooling` average pooling."""
    import torch
    from PIL import Image

    side = tower.config.image_size // tower.config.patch_size
    out = []
    for start in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
        pixels = image_processor(images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            patches = tower(pixels, output_hidden_states=True).hidden_states[layer][:, -side * side :]
        if pooling > 1:
            grid = patches.transpose(1, 2).reshape(len(patches), -1, side, side)
            patches = torch.nn.functional.avg_pool2d(grid, pooling).flatten(2).transpose(1, 2)
        out.append(patches)
    return torch.cat(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tower", type=Path, required=True, help="CLIP folder or llava_plugin checkpoint")
    parser.add_argument("--world", type=Path, required=True, help="scene world folder (images/, annotations/)")
    parser.add_argument("--layer", type=int, default=-2)
    parser.add_argument("--pooling", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the result here as JSON")


def run(args: argparse.Namespace) -> dict:
    tower, image_processor = _load_tower(args.tower)
    split_features, split_items = {}, {}
    for split, limit in (("train", args.train_images), ("eval", None)):
        files, split_items[split] = colour_lookup_items(args.world / "annotations" / f"instances_{split}.json", limit)
        paths = [args.world / "images" / split / f for f in files]
        split_features[split] = tower_features(tower, image_processor, paths, args.layer, args.pooling)
    result = keyed_lookup_accuracy(split_features["train"], split_items["train"], split_features["eval"],
                                   split_items["eval"], steps=args.steps, seed=args.seed)
    result = {"tower": str(args.tower), "layer": args.layer, "pooling": args.pooling, **result}
    print(json.dumps(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result
