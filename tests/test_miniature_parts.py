"""The quickstart's stand-ins for the pretrained parts (training/miniature.py): what their tokenizers make of the text
stage 2 trains on, and the CLIP stand-in saved as a complete CLIP folder."""

import pytest
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from processing.chat_templates import CHAT_TEMPLATES
from processing.generate import generate_from_annotations, jsonl_to_llava_json
from processing.synthetic import make_scene_world
from processing.teachers import SymbolicTeacher
from training.miniature import (
    PartsConfig, align_clip_regions, align_regions, build_tokenizer, clip_retrieval_accuracy, corpus_texts,
    region_labels, train_clip_standin,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    make_scene_world(root, 60, "train", seed=0)
    make_scene_world(root, 8, "eval", seed=0)
    jsonl = root / "instruct.jsonl"
    generate_from_annotations(root / "annotations", "train", SymbolicTeacher(seed=0), jsonl, types=["conversation"],
                              seed=0, concurrency=1, progress=False)
    jsonl_to_llava_json(jsonl, root / "instruct.json")
    return root


def test_lm_tokenizer_keeps_one_word_answers_whole_after_the_role_name(world):
    """vicuna_v1 renders an answer as "ASSISTANT: Yes</s>"; the answer word must be one token (" Yes"), not a bare
    space followed by "Yes": the model then decides at a token that carries the answer, not at a space."""
    tokenizer = build_tokenizer(corpus_texts(world / "annotations", "train", world / "instruct.json"), vocab_size=600)
    tokenizer.chat_template = CHAT_TEMPLATES["vicuna_v1"]
    for answer in ("Yes", "No"):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Is there a red circle in the image?"},
             {"role": "assistant", "content": answer}], tokenize=False,
        )
        tokens = tokenizer.tokenize(text)
        assert tokens[-1] == tokenizer.eos_token and tokens[-2] == "Ġ" + answer, tokens[-6:]


def test_clip_standin_is_a_complete_clip_folder_with_its_own_tokenizer(world, tmp_path):
    cfg = PartsConfig(vision_hidden_size=32, vision_layers=1, clip_steps=2, clip_batch_size=16, clip_vocab_size=300)
    out = train_clip_standin(world / "images" / "train", world / "annotations", "train", tmp_path / "clip", cfg)
    tokenizer = AutoTokenizer.from_pretrained(out)  # CLIP's own, from the captions only: the LM's corpus can change
    caption = "A green circle and a yellow circle drawn on a plain white background."
    assert tokenizer.decode(tokenizer(caption, add_special_tokens=False)["input_ids"]) == caption
    assert "Ġcircle" in tokenizer.get_vocab() and not any("ASSISTANT" in token for token in tokenizer.get_vocab())
    model = CLIPModel.from_pretrained(out)
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id  # CLIP pools the text at its eos
    accuracy = clip_retrieval_accuracy(out, world / "images" / "eval", world / "annotations", "eval", n=8)
    assert 0.0 <= accuracy <= 1.0


def test_region_labels_mark_each_box_and_its_centre_patch(world):
    import json

    from processing.synthetic import load_scene_objects

    instances = json.loads((world / "annotations" / "instances_train.json").read_text())
    labels = region_labels(instances, image_size=64, patch_size=8)
    files, scenes = load_scene_objects(world / "annotations" / "instances_train.json")
    categories = {c["name"]: c["id"] for c in instances["categories"]}
    for image_id, file_name in files.items():
        category, centre = labels[file_name].view(8, 8, 2).unbind(-1)
        assert int(centre.sum()) == len(scenes[image_id])  # one centre per object: what counting reads
        for o in scenes[image_id]:
            row, col = int((o.y + o.size / 2) // 8), int((o.x + o.size / 2) // 8)
            assert centre[row, col] == 1 and category[row, col] == categories[o.category]
        covered = {(r, c) for o in scenes[image_id] for r in range(8) for c in range(8)
                   if o.y <= 8 * r + 4 < o.y + o.size and o.x <= 8 * c + 4 < o.x + o.size}
        assert {(r, c) for r in range(8) for c in range(8) if category[r, c] > 0} == covered


def test_region_alignment_makes_patch_tokens_name_their_box(world):
    """The tower's patch tokens, at the layer the recipe reads, learn to name what is under them: better than always
    answering background, the majority of the patches."""
    import json
    import random

    import torch
    from PIL import Image

    from modeling_llava.builders import make_image_processor

    cfg = PartsConfig(vision_hidden_size=32, vision_layers=2, region_steps=80, region_batch_size=16, region_lr=3e-3)
    instances = json.loads((world / "annotations" / "instances_train.json").read_text())
    labels = region_labels(instances, cfg.image_size, cfg.patch_size)
    files = sorted(labels)
    pixels = make_image_processor(64)([Image.open(world / "images" / "train" / f).convert("RGB") for f in files],
                                      return_tensors="pt")["pixel_values"]
    stacked = torch.stack([labels[f] for f in files])
    background = float((stacked[..., 0] == 0).float().mean())
    torch.manual_seed(0)
    tower = CLIPModel(CLIPConfig(vision_config=dict(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=1))).vision_model
    accuracy = align_regions(tower, pixels, stacked, num_categories=13, cfg=cfg, rng=random.Random(0))
    assert accuracy > background + 0.05, (accuracy, background)


def test_region_aligned_clip_is_a_clip_folder_whose_vision_half_moved(world, tmp_path):
    import json

    import torch

    cfg = PartsConfig(vision_hidden_size=32, vision_layers=1, clip_steps=1, clip_batch_size=16, clip_vocab_size=300,
                      region_steps=2, region_batch_size=8)
    clip = train_clip_standin(world / "images" / "train", world / "annotations", "train", tmp_path / "clip", cfg)
    out = tmp_path / "clip_regions"
    summary = align_clip_regions(clip, world / "images" / "train", world / "annotations", "train", out, cfg)
    assert json.loads((out / "region_alignment.json").read_text()) == summary and summary["region_steps"] == 2
    assert not (tmp_path / "clip_regions.tmp").exists()
    before, after = CLIPModel.from_pretrained(clip).state_dict(), CLIPModel.from_pretrained(out).state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("vision_model.") for k in moved)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(clip).get_vocab()
