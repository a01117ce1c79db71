"""Batched generation (left padding), resumable prediction files, and the scene-probe evaluator."""

import json

import pytest
import torch
from PIL import Image

from evaluation.generation import GenerationSettings, ImageLoadError, generate_batch, run_predictions, user_message
from evaluation.jsonl import read_done, read_jsonl
from evaluation.metrics.first_word_accuracy.first_word_accuracy import first_word, first_word_accuracy
from evaluation.scene_probe import evaluate_scene_probe

SETTINGS = GenerationSettings(max_new_tokens=6)


def greedy_alone(model, processor, conversation, max_new_tokens=6):
    """The oracle: one conversation, no padding, plain model.generate."""
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_batched_generation_equals_one_at_a_time(tiny_llava, red_image, blue_image):
    model, processor = tiny_llava
    conversations = [
        [user_message("What color is the circle?", red_image)],
        [user_message("How many shapes are in the image? Answer with one word please.", blue_image)],
        [user_message("hi")],  # text-only, in the same batch as image questions
        [user_message("Is there a red square in the image?", blue_image)],
    ]
    batched = generate_batch(model, processor, conversations, SETTINGS)
    assert batched == [greedy_alone(model, processor, c) for c in conversations]
    assert processor.tokenizer.padding_side == "right"  # left padding was asked per call, not left behind


def _requests(tmp_path, red_image, blue_image, n):
    red_image.save(tmp_path / "red.png")
    blue_image.save(tmp_path / "blue.png")
    questions = ["What color is the circle?", "How many shapes?", "Is there a blue square?", "Describe it.", "What is left?"]
    return [
        {"question_id": f"q{i}", "prompt": questions[i], "image": "red.png" if i % 2 else "blue.png", "category": f"c{i}"}
        for i in range(n)
    ]


def test_predictions_resume_without_regenerating(tiny_llava, tmp_path, red_image, blue_image, monkeypatch):
    model, processor = tiny_llava
    calls = []
    original = model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting_generate)
    out = tmp_path / "predictions.jsonl"
    requests = _requests(tmp_path, red_image, blue_image, 5)

    run_predictions(model, processor, requests[:3], out, settings=SETTINGS, batch_size=2, image_root=tmp_path, keep_fields=("category",), progress=False)
    assert calls == [2, 1]
    first_lines = out.read_text().splitlines()
    assert len(first_lines) == 3

    # A killed run leaves a torn last line; the rerun drops it and answers only what is missing.
    with open(out, "a") as f:
        f.write('{"question_id": "q3", "prompt": "Descr')
    calls.clear()
    result = run_predictions(model, processor, requests, out, settings=SETTINGS, batch_size=2, image_root=tmp_path, keep_fields=("category",), progress=False)
    assert calls == [2]  # q3 and q4 only
    lines = out.read_text().splitlines()
    assert lines[:3] == first_lines and len(lines) == 5
    assert list(result) == ["q0", "q1", "q2", "q3", "q4"]
    assert result["q4"]["category"] == "c4" and result["q4"]["prompt"] == "What is left?"

    # The resumed file equals a run from scratch.
    fresh = tmp_path / "fresh.jsonl"
    run_predictions(model, processor, requests, fresh, settings=SETTINGS, batch_size=5, image_root=tmp_path, keep_fields=("category",), progress=False)
    assert read_done(fresh, "question_id") == read_done(out, "question_id")

    calls.clear()
    run_predictions(model, processor, requests, out, settings=SETTINGS, image_root=tmp_path, progress=False)
    assert calls == []  # everything done: no generation at all


def test_bad_requests_name_the_request_and_field(tiny_llava, tmp_path, red_image, blue_image):
    model, processor = tiny_llava
    requests = _requests(tmp_path, red_image, blue_image, 2)
    requests[1]["image"] = "missing.png"
    with pytest.raises(ImageLoadError, match=r"request 'q1', field 'image': image file not found: .*missing\.png"):
        run_predictions(model, processor, requests, tmp_path / "p.jsonl", image_root=tmp_path, progress=False)
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    requests[1]["image"] = "corrupt.png"
    with pytest.raises(ImageLoadError, match=r"request 'q1', field 'image': cannot read image .*corrupt\.png"):
        run_predictions(model, processor, requests, tmp_path / "p.jsonl", image_root=tmp_path, progress=False)
    # Skipping instead: the good request is answered, the bad one is not written (a rerun retries it).
    out = tmp_path / "skip.jsonl"
    result = run_predictions(model, processor, requests, out, settings=SETTINGS, image_root=tmp_path, on_bad_image="skip", progress=False)
    assert list(result) == ["q0"] and [r["question_id"] for r in read_jsonl(out)] == ["q0"]
    with pytest.raises(ValueError, match="'q0' appears twice"):
        run_predictions(model, processor, [requests[0], requests[0]], tmp_path / "d.jsonl", progress=False)
    with pytest.raises(ValueError, match="field 'prompt'"):
        run_predictions(model, processor, [{"question_id": 1, "prompt": ""}], tmp_path / "e.jsonl", progress=False)


@pytest.fixture(scope="module")
def scene_probe(tmp_path_factory):
    from processing.synthetic import make_probe_set, make_scene_world, write_probe_set

    root = tmp_path_factory.mktemp("world")
    world = make_scene_world(root, 4, split="eval", seed=3)
    probes = make_probe_set(world.instances_path, seed=0)
    return world, probes, write_probe_set(probes, root / "probe.json")


def test_scene_probe_scores_greedy_first_words(tiny_llava, scene_probe):
    model, processor = tiny_llava
    world, probes, probe_file = scene_probe
    model.train()  # as between training steps: the evaluator must answer in eval mode and give the mode back
    result = evaluate_scene_probe(model, processor, probes, batch_size=8, image_root=world.images_dir, return_predictions=True)
    assert model.training
    model.eval()

    assert result["n"] == len(probes)
    expected_templates = sorted({p["template"] for p in probes})
    assert sorted(result["per_template"]) == expected_templates
    assert result["n_per_template"] == {t: sum(p["template"] == t for p in probes) for t in expected_templates}
    # The replies are the unbatched greedy answers, and the scores are their first-word accuracy.
    for probe, reply in list(zip(probes, result["predictions"]))[:4]:
        image = Image.open(world.images_dir / probe["image"]).convert("RGB")
        assert reply == greedy_alone(model, processor, [user_message(probe["question"], image)], max_new_tokens=5)
    answers = [p["answer"] for p in probes]
    assert result["overall"] == first_word_accuracy(result["predictions"], answers)["accuracy"]
    for template in expected_templates:
        index = [i for i, p in enumerate(probes) if p["template"] == template]
        expected = first_word_accuracy([result["predictions"][i] for i in index], [answers[i] for i in index])["accuracy"]
        assert result["per_template"][template] == expected

    # The LLaVA-record form written by processing.synthetic.write_probe_set scores the same.
    records = json.loads(probe_file.read_text())
    assert evaluate_scene_probe(model, processor, records, batch_size=16, image_root=world.images_dir) == {
        k: v for k, v in result.items() if k != "predictions"
    }


def test_scene_probe_knows_the_right_answers(tiny_llava, scene_probe):
    """Records given as PIL images with answers equal to the model's own replies score 100 %; wrong ones 0 %."""
    model, processor = tiny_llava
    world, probes, _ = scene_probe
    records = [{**p, "image": Image.open(world.images_dir / p["image"])} for p in probes[:5]]
    replies = evaluate_scene_probe(model, processor, records, return_predictions=True)["predictions"]
    right = [{**r, "answer": reply} for r, reply in zip(records, replies)]
    with_words = sum(first_word(reply) != "" for reply in replies)  # a reply of symbols only has no first word
    assert with_words > 0
    assert evaluate_scene_probe(model, processor, right)["overall"] == with_words / 5
    wrong = [{**r, "answer": "zzzz"} for r in records]
    assert evaluate_scene_probe(model, processor, wrong)["overall"] == 0.0
