"""The keyed-lookup probe (evaluation/binding_probe.py) tells features that bind colour to shape from features that
only say which colours and shapes are present, and its command line reads a real tower."""

import json

import pytest
import torch

from evaluation.__main__ import main
from evaluation.binding_probe import colour_lookup_items, keyed_lookup_accuracy
from processing.synthetic import COLORS, SHAPES, load_scene_objects, make_scene_world
from training.miniature import PartsConfig, train_clip_standin


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    make_scene_world(root, 400, "train", seed=0)
    make_scene_world(root, 80, "eval", seed=0)
    return root


def object_codes(world, split, bound: bool) -> tuple[torch.Tensor, list]:
    """One token per object with its colour and shape one-hot; `bound=False` gives the same colours and shapes as a bag
    instead, shapes in tokens 0-3 and colours in tokens 4-7: what is present is there, which colour is whose is not."""
    instances = world / "annotations" / f"instances_{split}.json"
    _, items = colour_lookup_items(instances)
    _, scenes = load_scene_objects(instances)
    features = torch.zeros(len(scenes), 8, len(COLORS) + len(SHAPES))
    for row, image_id in enumerate(sorted(scenes)):  # the items' image order
        for t, o in enumerate(scenes[image_id]):
            features[row, t if bound else t + 4, list(COLORS).index(o.color)] = 1
            features[row, t, len(COLORS) + SHAPES.index(o.shape)] = 1
    return features, items


def test_probe_reads_the_colour_of_the_asked_shape_only_where_the_tokens_bind_them(world):
    train, train_items = object_codes(world, "train", bound=True)
    test, test_items = object_codes(world, "eval", bound=True)
    bound = keyed_lookup_accuracy(train, train_items, test, test_items, steps=300)
    assert bound["multi_colour_items"] >= 20
    assert bound["multi_colour"] >= 0.9

    train, _ = object_codes(world, "train", bound=False)
    test, _ = object_codes(world, "eval", bound=False)
    unbound = keyed_lookup_accuracy(train, train_items, test, test_items, steps=300)
    # Colours present but not bound to their shapes: on multi-colour scenes no better than naming one of them.
    assert unbound["multi_colour"] <= 0.7
    assert bound["multi_colour"] - unbound["multi_colour"] >= 0.25


def test_command_line_probes_a_clip_tower_at_the_layer_asked(world, tmp_path):
    cfg = PartsConfig(vision_hidden_size=32, vision_layers=2, clip_steps=2, clip_batch_size=16, clip_vocab_size=300)
    clip = train_clip_standin(world / "images" / "train", world / "annotations", "train", tmp_path / "clip", cfg)
    out = tmp_path / "binding.json"
    result = main(["binding-probe", "--tower", str(clip), "--world", str(world), "--layer", "0", "--train-images", "100",
                   "--steps", "20", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["layer"] == 0 and result["pooling"] == 2
    _, items = colour_lookup_items(world / "annotations" / "instances_eval.json")
    assert result["eval_items"] == len(items)
    assert 0.0 <= result["multi_colour"] <= 1.0
