"""Synthetic scene world, scene QA probe, COCO contexts."""

import hashlib
import json
import os
import re
import time
from collections import Counter

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from processing.coco import ImageContext, find_annotation_files, load_coco_contexts, normalise_box  # noqa: E402
from processing.llava_json import load_llava_json  # noqa: E402
from processing.synthetic import (  # noqa: E402
    CATEGORIES,
    COLORS,
    NUMBER_WORDS,
    load_scene_objects,
    make_probe_set,
    make_scene_world,
    scene_vqa_pairs,
    sample_scene,
    write_caption_data,
    write_color_questions,
    write_probe_set,
    write_scene_vqa,
)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return make_scene_world(root, 60, "train", seed=0), make_scene_world(root, 40, "eval", seed=0)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_scenes_follow_the_spec(worlds):
    train, _ = worlds
    files, scenes = load_scene_objects(train.instances_path)
    assert len(files) == 60
    counts = Counter(len(objects) for objects in scenes.values())
    assert set(counts) <= {1, 2, 3, 4} and len(counts) >= 3
    for image_id, objects in scenes.items():
        image = Image.open(train.images_dir / files[image_id]).convert("RGB")
        assert image.size == (64, 64)
        assert image.getpixel((0, 0)) == (255, 255, 255) or any(o.x == 0 and o.y == 0 for o in objects)
        for i, o in enumerate(objects):
            assert 12 <= o.size <= 24 and o.category in CATEGORIES
            assert 0 <= o.x <= 64 - o.size and 0 <= o.y <= 64 - o.size
            # The annotation matches the pixels: the shape's centre has the shape's color
            # (triangle: a bit below the centre, where it is wide).
            cy = o.y + (2 * o.size) // 3 if o.shape == "triangle" else o.y + o.size // 2
            assert image.getpixel((o.x + o.size // 2, cy)) == COLORS[o.color]
            for other in objects[i + 1 :]:  # boxes do not overlap
                assert o.x + o.size <= other.x or other.x + other.size <= o.x or o.y + o.size <= other.y or other.y + other.size <= o.y


def test_captions_are_varied_and_true(worlds):
    train, _ = worlds
    contexts = load_coco_contexts(train.captions_path, train.instances_path)
    phrasings = Counter()
    for ctx in contexts:
        assert len(ctx.captions) == 5 and len(set(ctx.captions)) == 5
        for caption in ctx.captions:
            phrasings[caption.split()[0]] += 1
            # Every caption names every category of the image and no other one.
            mentioned = {name for name in CATEGORIES if re.search(rf"\b{name}s?\b", caption)}
            assert mentioned == ctx.categories, (caption, ctx.boxes)
    assert len(phrasings) >= 5


def test_world_is_deterministic_and_splits_are_disjoint(tmp_path, worlds):
    train, evaluation = worlds
    again = make_scene_world(tmp_path / "again", 60, "train", seed=0)
    other = make_scene_world(tmp_path / "other", 60, "train", seed=1)
    names = sorted(p.name for p in train.images_dir.iterdir())
    assert [digest(train.images_dir / n) for n in names] == [digest(again.images_dir / n) for n in names]
    assert train.instances_path.read_text() == again.instances_path.read_text()
    assert train.captions_path.read_text() == again.captions_path.read_text()
    assert sum(digest(train.images_dir / n) != digest(other.images_dir / n) for n in names) > 50

    train_files, _ = load_scene_objects(train.instances_path)
    eval_files, _ = load_scene_objects(evaluation.instances_path)
    assert not set(train_files) & set(eval_files)
    assert not set(train_files.values()) & set(eval_files.values())
    train_pixels = {digest(train.images_dir / f) for f in train_files.values()}
    assert not train_pixels & {digest(evaluation.images_dir / f) for f in eval_files.values()}


def test_world_is_fast_enough(tmp_path):
    # The spec asks for 10,000 images in about a minute; demand at least 100 images/s here.
    start = time.perf_counter()
    make_scene_world(tmp_path, 300, "train", seed=5)
    assert time.perf_counter() - start < 3.0


def test_image_size_and_format_are_configurable(tmp_path):
    world = make_scene_world(tmp_path, 5, "test", image_size=128, image_format="jpg")
    files, scenes = load_scene_objects(world.instances_path)
    assert all(f.endswith(".jpg") for f in files.values())
    assert Image.open(world.images_dir / files[min(files)]).size == (128, 128)
    assert all(24 <= o.size <= 48 for objects in scenes.values() for o in objects)
    with pytest.raises(ValueError, match="split"):
        make_scene_world(tmp_path, 1, "validation")


PROBE_PATTERNS = {
    "color": re.compile(r"^What color is the (circle|square|triangle)\?$"),
    "count": re.compile(r"^How many shapes are in the image\?$"),
    "exists": re.compile(r"^Is there a (red|green|blue|yellow) (circle|square|triangle) in the image\?$"),
}


def test_probe_set_templates_answers_and_balance(worlds):
    _, evaluation = worlds
    _, scenes = load_scene_objects(evaluation.instances_path)
    probes = make_probe_set(evaluation.instances_path, seed=0)
    assert probes == make_probe_set(evaluation.instances_path, seed=0)
    by_template = Counter(p["template"] for p in probes)
    assert by_template["count"] == by_template["exists"] == 40 and 0 < by_template["color"] <= 40
    for p in probes:
        match = PROBE_PATTERNS[p["template"]].match(p["question"])
        assert match, p["question"]
        objects = scenes[p["image_id"]]
        if p["template"] == "color":
            same_shape = [o for o in objects if o.shape == match[1]]
            assert len(same_shape) == 1 and p["answer"] == same_shape[0].color
        elif p["template"] == "count":
            assert p["answer"] == NUMBER_WORDS[len(objects)] and p["answer"] in ("one", "two", "three", "four")
        else:
            present = f"{match[1]} {match[2]}" in {o.category for o in objects}
            assert p["answer"] == ("Yes" if present else "No")
    answers = Counter(p["answer"] for p in probes if p["template"] == "exists")
    assert answers["Yes"] == answers["No"] == 20


VQA_PATTERNS = {
    "color": re.compile(r"^(?:What color is the|What is the color of the|Which color does the) (\w+)(?: have)?\?$"),
    "exists": re.compile(r"^(?:Is there a|Do you see a|Is a) (\w+) (\w+)(?: in the image| present)?\?$"),
}


def test_scene_vqa_answers_are_true_and_not_given_away_by_other_turns():
    import random

    rng = random.Random(0)
    answers, near_misses, no_answers = Counter(), 0, 0
    after = {"more Yes so far": Counter(), "more No so far": Counter()}  # the next existence answer, by history
    for _ in range(2000):
        objects = sample_scene(rng)
        pairs = scene_vqa_pairs(objects, rng, turns=6)
        assert 1 <= len(pairs) <= 6 and len({q for q, _ in pairs}) == len(pairs)
        seen = Counter()
        for _, answer in pairs:
            if answer in ("Yes", "No"):
                if seen["Yes"] != seen["No"]:
                    after["more Yes so far" if seen["Yes"] > seen["No"] else "more No so far"][answer] += 1
                seen[answer] += 1
        categories, shapes = {o.category for o in objects}, Counter(o.shape for o in objects)
        colour_shapes, exists_shapes = set(), set()
        for question, answer in pairs:
            if answer in NUMBER_WORDS:
                assert answer == NUMBER_WORDS[len(objects)]
                answers["count"] += 1
            elif match := VQA_PATTERNS["color"].match(question):
                assert shapes[match[1]] == 1 and answer == next(o.color for o in objects if o.shape == match[1])
                colour_shapes.add(match[1])
                answers["color"] += 1
            else:
                match = VQA_PATTERNS["exists"].match(question)
                assert match, question
                category = f"{match[1]} {match[2]}"
                assert answer == ("Yes" if category in categories else "No")
                exists_shapes.add(match[2])
                answers[answer] += 1
                if answer == "No":
                    no_answers += 1
                    near_misses += bool({match[1], match[2]} & {part for c in categories for part in c.split()})
        # "Is there a red circle? Yes" would give away "What color is the circle?" in the same conversation.
        assert not colour_shapes & exists_shapes
    # Yes/no close to balanced, every question type frequent, and "no" often needs colour bound to shape.
    assert 0.8 < answers["Yes"] / answers["No"] < 1.25
    # Earlier answers do not predict the next one: after more yes than no, yes is as likely as after more no.
    share = {k: c["Yes"] / sum(c.values()) for k, c in after.items()}
    assert abs(share["more Yes so far"] - share["more No so far"]) < 0.06, share
    assert min(answers.values()) > 0.2 * max(answers.values())
    assert near_misses > 0.4 * no_answers


def test_scene_vqa_several_conversations_per_image(tmp_path, worlds):
    train, _ = worlds
    one = json.loads(write_scene_vqa(train.instances_path, tmp_path / "one.json", seed=0).read_text())
    three = json.loads(write_scene_vqa(train.instances_path, tmp_path / "three.json", seed=0, per_image=3).read_text())
    assert len(three) == 3 * len(one) == 3 * 60 and len({r["id"] for r in three}) == len(three)
    assert three[::3] == one  # the first conversation of an image is the one per_image=1 writes
    by_image = {}
    for record in three:
        by_image.setdefault(record["image"], []).append(json.dumps(record["conversations"]))
    # Each conversation asks its own questions (the point: more, and more varied, questions per image).
    assert sum(len(set(c)) == 3 for c in by_image.values()) > 0.9 * len(by_image)
    assert len(load_llava_json(tmp_path / "three.json", train.images_dir)) == len(three)


def test_color_questions_ask_every_once_occurring_shape_of_every_image(tmp_path, worlds):
    train, _ = worlds
    records = json.loads(write_color_questions(train.instances_path, tmp_path / "color.json", seed=0).read_text())
    files, scenes = load_scene_objects(train.instances_path)
    expected = {(files[i], o.shape, o.color) for i in files for o in scenes[i]
                if sum(p.shape == o.shape for p in scenes[i]) == 1}
    asked = set()
    for record in records:
        question, answer = (turn["value"] for turn in record["conversations"])
        shape = re.search(r"(circle|square|triangle)", question).group(1)
        asked.add((record["image"], shape, answer))
        assert record["type"] == "color" and question.count("<image>") == 1
    assert asked == expected and len(records) == len(expected)
    # The image before or after the question, both often, as the paper's first-turn rule.
    first = Counter(r["conversations"][0]["value"].startswith("<image>") for r in records)
    assert min(first.values()) > 0.3 * len(records)
    assert len(load_llava_json(tmp_path / "color.json", train.images_dir)) == len(records)


def test_probe_and_caption_data_load_as_llava_json(tmp_path, worlds):
    _, evaluation = worlds
    probes = make_probe_set(evaluation.instances_path)
    path = write_probe_set(probes, tmp_path / "probe.jsonl")
    ds = load_llava_json(path, evaluation.images_dir)
    assert len(ds) == len(probes)
    first = ds[0]
    assert first["messages"][0]["content"][1]["text"] == probes[0]["question"]
    assert first["messages"][1]["content"][0]["text"] == probes[0]["answer"]
    assert json.loads(first["llava_meta"])["extra"]["template"] == probes[0]["template"]

    captions = load_llava_json(write_caption_data(evaluation, tmp_path / "captions.json"), evaluation.images_dir)
    assert len(captions) == 40
    orders = Counter(tuple(p["type"] for p in m[0]["content"]) for m in captions["messages"])
    assert set(orders) == {("image", "text"), ("text", "image")}
    contexts = {str(c.image_id): c for c in load_coco_contexts(evaluation.captions_path)}
    assert all(m[1]["content"][0]["text"] in contexts[i].captions for i, m in zip(captions["id"], captions["messages"]))


def test_coco_context_rendering():
    assert normalise_box([10, 20, 30, 40], 100, 200) == [0.1, 0.1, 0.4, 0.3]
    assert normalise_box([90, 0, 30, 10], 100, 100) == [0.9, 0.0, 1.0, 0.1]  # clipped to the image
    ctx = ImageContext(7, "x.jpg", 100, 100, ["A dog on a sofa.", "A sleepy dog."], [("dog", [0.1, 0.2, 0.5, 0.6]), ("couch", [0.0, 0.3, 1.0, 1.0])])
    text = ctx.to_prompt()
    assert "dog: [0.10, 0.20, 0.50, 0.60]" in text and "couch: [0.00, 0.30, 1.00, 1.00]" in text
    parsed = ImageContext.from_prompt(text + "\n\nTask: write a conversation about this image.")
    assert (parsed.captions, parsed.boxes) == (ctx.captions, ctx.boxes)


def test_real_coco_files_are_found_and_read(tmp_path):
    images = [{"id": 42, "file_name": "000000000042.jpg", "width": 640, "height": 480}]
    (tmp_path / "captions_train2017.json").write_text(json.dumps({"images": images, "annotations": [
        {"id": 2, "image_id": 42, "caption": "A man riding a horse. "}, {"id": 1, "image_id": 42, "caption": "A horse\nand rider."}]}))
    (tmp_path / "instances_train2017.json").write_text(json.dumps({"images": images, "categories": [
        {"id": 1, "name": "person"}, {"id": 19, "name": "horse"}], "annotations": [
        {"id": 5, "image_id": 42, "category_id": 19, "bbox": [64, 48, 320, 240]},
        {"id": 6, "image_id": 42, "category_id": 1, "bbox": [128, 0, 128, 240]}]}))
    captions, instances = find_annotation_files(tmp_path, "train2017")
    (ctx,) = load_coco_contexts(captions, instances)
    assert ctx.captions == ["A horse and rider.", "A man riding a horse."]
    assert ctx.boxes == [("horse", [0.1, 0.1, 0.6, 0.6]), ("person", [0.2, 0.0, 0.4, 0.5])]
    (tmp_path / "captions_train2014.json").write_text("{}")
    with pytest.raises(ValueError, match="several captions files"):
        find_annotation_files(tmp_path, "train")
    with pytest.raises(FileNotFoundError):
        find_annotation_files(tmp_path, "val2017")
