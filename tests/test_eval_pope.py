"""POPE: the three negative strategies on a COCO fixture worked out by hand, determinism, scoring, the command."""

import json

import pytest
from PIL import Image

from evaluation.__main__ import main as evaluation_main
from evaluation.pope import build_pope_questions, load_coco_objects, negative_objects, score_pope

# image id -> objects. Frequencies (images holding it): person 3, car 3, bus 2, tree 2, boat 2, dog 1, cat 0.
# Co-occurrence: person-car 2, person-bus 1, person-dog 1, car-bus 2, car-tree 1, bus-tree 1, tree-boat 1.
SCENES = {
    1: ["person", "dog"],
    2: ["person", "car", "bus"],
    3: ["person", "car"],
    4: ["car", "bus", "tree"],
    5: ["boat"],
    6: ["boat", "tree"],
}
CATEGORIES = ["person", "dog", "car", "bus", "tree", "boat", "cat"]


@pytest.fixture
def instances(tmp_path):
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CATEGORIES)]
    ids = {c["name"]: c["id"] for c in categories}
    images = [{"id": i, "file_name": f"{i:03d}.png", "width": 32, "height": 32} for i in SCENES]
    annotations = [
        {"id": len(images) * 10 + k, "image_id": i, "category_id": ids[name], "bbox": [1, 1, 5, 5]}
        for i, names in SCENES.items()
        for k, name in enumerate(names)
    ]
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    for image in images:
        Image.new("RGB", (32, 32), (200, 200, 200)).save(tmp_path / image["file_name"])
    return path


def negatives(objects, strategy, image_id, k, seed=0):
    import random

    return negative_objects(strategy, objects, image_id, k, random.Random(seed))


def test_popular_negatives_are_the_most_frequent_absent_objects(instances):
    objects = load_coco_objects(instances)
    assert objects.frequency["person"] == 3 and objects.frequency["boat"] == 2 and objects.frequency["cat"] == 0
    # Image 1 {person, dog}: absent car 3, then boat/bus/tree 2 (by name), cat 0.
    assert negatives(objects, "popular", 1, 2) == ["car", "boat"]
    assert negatives(objects, "popular", 5, 1) == ["car"]  # car and person both 3: by name
    assert negatives(objects, "popular", 4, 3) == ["person", "boat", "dog"]


def test_adversarial_negatives_are_the_most_cooccurring_absent_objects(instances):
    objects = load_coco_objects(instances)
    assert objects.cooccurrence["person"]["car"] == 2 and objects.cooccurrence["tree"]["boat"] == 1
    # Image 1 {person, dog}: car co-occurs 2x with person, bus 1x; popular would pick boat second instead.
    assert negatives(objects, "adversarial", 1, 2) == ["car", "bus"]
    # Image 5 {boat}: tree co-occurs with boat (1); then ties at 0 go by popularity (car 3).
    assert negatives(objects, "adversarial", 5, 2) == ["tree", "car"]
    # The rule in general: no absent object left out co-occurs more than one chosen.
    for image_id, present in SCENES.items():
        chosen = negatives(objects, "adversarial", image_id, 2)
        score = {c: sum(objects.cooccurrence[p][c] for p in present) for c in CATEGORIES if c not in present}
        assert min(score[c] for c in chosen) >= max((s for c, s in score.items() if c not in chosen), default=0)


def test_random_negatives_are_absent_and_seeded(instances):
    objects = load_coco_objects(instances)
    for image_id, present in SCENES.items():
        picked = negatives(objects, "random", image_id, 3)
        assert len(picked) == 3 and len(set(picked)) == 3 and not set(picked) & set(present)
        assert negatives(objects, "random", image_id, 3) == picked  # same seed, same draw
    draws = {tuple(negatives(objects, "random", 1, 3, seed)) for seed in range(10)}
    assert len(draws) > 1  # the seed matters


def test_question_sets_are_balanced_and_share_images_and_positives(instances):
    objects = load_coco_objects(instances)
    sets = {s: build_pope_questions(objects, s, num_images=6, num_positive=2, seed=0) for s in ("random", "popular", "adversarial")}
    for questions in sets.values():
        assert sum(q["label"] == "yes" for q in questions) == sum(q["label"] == "no" for q in questions) == 11  # 2 x 5 + 1
        for q in questions:
            assert q["text"] == f"Is there a {q['object']} in the image?"
            assert (q["object"] in SCENES[q["image_id"]]) == (q["label"] == "yes")
        assert [q["question_id"] for q in questions] == list(range(len(questions)))
    positives = {s: [(q["image_id"], q["object"]) for q in qs if q["label"] == "yes"] for s, qs in sets.items()}
    assert positives["random"] == positives["popular"] == positives["adversarial"]
    negatives_of_1 = {s: [q["object"] for q in qs if q["image_id"] == 1 and q["label"] == "no"] for s, qs in sets.items()}
    assert negatives_of_1["popular"] == ["car", "boat"] and negatives_of_1["adversarial"] == ["car", "bus"]
    assert build_pope_questions(objects, "random", num_images=6, num_positive=2, seed=0) == sets["random"]
    assert len(build_pope_questions(objects, "random", num_images=3, seed=0)) < len(sets["random"])
    assert {q["image_id"] for q in build_pope_questions(objects, "popular", min_objects=2)} == {1, 2, 3, 4, 6}


def test_score_pope_from_replies():
    questions = [{"question_id": i, "label": label} for i, label in enumerate(["yes", "yes", "no", "no"])]
    result = score_pope(questions, {"0": "Yes.", "1": "No, there is none.", "2": "Yes", "3": "Hmm, a dog"})
    # read: yes, no, yes, yes -> TP 1, FN 1, FP 2, TN 0
    assert result["accuracy"] == 0.25 and result["precision"] == pytest.approx(1 / 3) and result["recall"] == 0.5
    assert result["yes_ratio"] == 0.75 and result["n_unclear"] == 1
    with pytest.raises(ValueError, match="no reply for 1 question"):
        score_pope(questions, {"0": "Yes.", "1": "No", "2": "No"})


def test_bad_annotations_are_named(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "dog"}],
                                "annotations": [{"id": 7, "image_id": 2, "category_id": 1}]}))
    with pytest.raises(ValueError, match=r"instances\.json: annotation 7, field 'image_id': unknown image 2"):
        load_coco_objects(path)


def test_pope_command_offline(instances, tmp_path, tiny_llava):
    model, processor = tiny_llava
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    out = tmp_path / "pope"
    args = ["pope", "--annotations", str(instances), "--images", str(instances.parent), "--model", str(checkpoint),
            "--out", str(out), "--num-positive", "1", "--max-new-tokens", "3", "--strategies", "popular", "adversarial"]
    results = evaluation_main(args)
    assert sorted(results) == ["adversarial", "popular"]
    for strategy, result in results.items():
        questions = [json.loads(line) for line in (out / f"questions_{strategy}.jsonl").read_text().splitlines()]
        predictions = {str(p["question_id"]): p["text"] for p in map(json.loads, (out / f"predictions_{strategy}.jsonl").read_text().splitlines())}
        assert result == score_pope(questions, predictions) and result["n"] == 12
    # Published POPE question files (question_id, image, text, label) work too.
    again = evaluation_main(["pope", "--questions", str(out / "questions_popular.jsonl"), "--images", str(instances.parent),
                             "--model", str(checkpoint), "--out", str(out), "--max-new-tokens", "3"])
    assert again["questions_popular"]["n"] == 12


def test_scene_world_pope(tmp_path):
    from processing.synthetic import make_scene_world

    world = make_scene_world(tmp_path, 6, split="eval", seed=2)
    objects = load_coco_objects(world.instances_path)
    questions = build_pope_questions(objects, "adversarial", num_positive=2)
    assert questions and all(q["text"].startswith("Is there a ") for q in questions)
    assert all((world.images_dir / q["image"]).is_file() for q in questions)
    for q in questions:  # labels agree with the drawn scene
        assert (q["object"] in objects.present[q["image_id"]]) == (q["label"] == "yes")
