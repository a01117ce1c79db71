"""The synthetic scene world: procedural shape images with COCO-format annotations.

The embedded default data of the miniature recipe and of the tests. Each image is a white canvas
(64x64 by default) with 1-4 non-overlapping shapes (circle, square, triangle) in red, green, blue or
yellow, 12-24 px wide at 64 px (scaled with the canvas). Everything is deterministic by seed: image `i`
of a split depends only on `(seed, split, i)`.

Layout written by `make_scene_world(out_dir, ...)`::

    out_dir/images/{split}/{split}_000001.png
    out_dir/annotations/captions_{split}.json     # COCO captions (5 per image)
    out_dir/annotations/instances_{split}.json    # COCO instances, categories "<color> <shape>"

Splits own disjoint image-id ranges and file names, so train and eval images never coincide.
`make_probe_set` builds the scene QA probe (three fixed templates, one-word answers).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
CATEGORIES = [f"{color} {shape}" for shape in SHAPES for color in COLORS]
CATEGORY_IDS = {name: i + 1 for i, name in enumerate(CATEGORIES)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_ID_OFFSETS = {"train": 0, "eval": 1_000_000, "test": 2_000_000}
# The instances file carries this description so that tools can tell the scene world from real COCO.
SCENE_WORLD_DESCRIPTION = "llava-plugin synthetic scene world"

PROBE_TEMPLATES = {
    "color": "What color is the {shape}?",
    "count": "How many shapes are in the image?",
    "exists": "Is there a {color} {shape} in the image?",
}


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    x: int
    y: int
    size: int

    @property
    def category(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class SceneWorld:
    """Paths of one generated split."""

    root: Path
    split: str
    images_dir: Path
    captions_path: Path
    instances_path: Path
    annotations_dir: Path
    num_images: int


# ---------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------


def sample_scene(rng: random.Random, image_size: int = 64, max_objects: int = 4) -> list[SceneObject]:
    """1..max_objects shapes whose boxes do not overlap (a 1 px gap keeps them visually apart)."""
    scale = image_size / 64
    low, high = max(3, round(12 * scale)), max(4, round(24 * scale))
    target = rng.randint(1, max_objects)
    objects: list[SceneObject] = []
    for _ in range(200):  # bounded rejection sampling; a crowded canvas just ends with fewer shapes
        if len(objects) == target:
            break
        size = rng.randint(low, high)
        x, y = rng.randint(0, image_size - size), rng.randint(0, image_size - size)
        if all(x + size + 1 <= o.x or o.x + o.size + 1 <= x or y + size + 1 <= o.y or o.y + o.size + 1 <= y for o in objects):
            objects.append(SceneObject(rng.choice(list(COLORS)), rng.choice(SHAPES), x, y, size))
    return objects


def draw_scene(objects: list[SceneObject], image_size: int = 64) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for o in objects:
        x1, y1, x2, y2 = o.x, o.y, o.x + o.size - 1, o.y + o.size - 1
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x1, y1, x2, y2), fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    return image


def region_name(cx: float, cy: float) -> str:
    """Coarse position of a point given in 0-1 coordinates, e.g. 'top left' or 'center'."""
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return " ".join(p for p in (vertical, horizontal) if p) or "center"


def describe_objects(categories: list[str]) -> str:
    """['red circle', 'red circle', 'blue square'] -> 'two red circles and a blue square'."""
    counts = Counter(categories)
    phrases = [f"a {name}" if n == 1 else f"{NUMBER_WORDS[n]} {name}s" for name, n in counts.items()]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def make_captions(objects: list[SceneObject], rng: random.Random, image_size: int, n: int = 5) -> list[str]:
    """Several captions with varied phrasing, all true of the scene."""
    names = [o.category for o in objects]
    shuffled = names[:]
    rng.shuffle(shuffled)
    listed = describe_objects(shuffled)
    count = len(objects)
    noun = "shape" if count == 1 else "shapes"
    left_to_right = describe_objects([o.category for o in sorted(objects, key=lambda o: o.x)])
    templates = [
        f"{NUMBER_WORDS[count].capitalize()} {noun} on a white background: {listed}.",
        f"A white canvas with {listed}.",
        f"There {'is' if count == 1 and listed.startswith('a ') else 'are'} {listed} in the picture.",
        f"A simple drawing showing {listed}.",
        f"{listed[0].upper()}{listed[1:]} drawn on a plain white background.",
        f"An image of {NUMBER_WORDS[count]} colored {noun}: {listed}.",
    ]
    if count == 1:
        o = objects[0]
        where = region_name((o.x + o.size / 2) / image_size, (o.y + o.size / 2) / image_size)
        templates.append(f"A {o.category} in the {where} of the image.")
    else:
        templates.append(f"From left to right: {left_to_right}.")
    rng.shuffle(templates)
    return templates[:n]


# ---------------------------------------------------------------------------------------------------
# Writing a split
# ---------------------------------------------------------------------------------------------------


def make_scene_world(
    out_dir: str | os.PathLike,
    num_images: int,
    split: str = "train",
    seed: int = 0,
    image_size: int = 64,
    image_format: str = "png",
) -> SceneWorld:
    """Draw `num_images` scenes and write images plus COCO `captions_{split}.json` / `instances_{split}.json`.

    Deterministic by `(seed, split)`; splits use disjoint image ids and file names.
    Returns the paths as a `SceneWorld`.
    """
    if split not in SPLIT_ID_OFFSETS:
        raise ValueError(f"split must be one of {list(SPLIT_ID_OFFSETS)}, got {split!r}")
    if image_format not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image_format must be png or jpg, got {image_format!r}")
    root = Path(out_dir)
    images_dir = root / "images" / split
    annotations_dir = root / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    annotations_dir.mkdir(parents=True, exist_ok=True)

    images, captions, instances = [], [], []
    extension = "jpg" if image_format in ("jpg", "jpeg") else "png"
    for i in range(1, num_images + 1):
        rng = random.Random(f"scene/{seed}/{split}/{i}")
        image_id = SPLIT_ID_OFFSETS[split] + i
        file_name = f"{split}_{i:06d}.{extension}"
        objects = sample_scene(rng, image_size)
        image = draw_scene(objects, image_size)
        # compress_level=1: the files are tiny either way and the fast setting keeps 10k images quick.
        if extension == "png":
            image.save(images_dir / file_name, format="PNG", compress_level=1)
        else:
            image.save(images_dir / file_name, format="JPEG", quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for caption in make_captions(objects, rng, image_size):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": caption})
        for o in objects:
            instances.append(
                {
                    "id": len(instances) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[o.category],
                    "bbox": [o.x, o.y, o.size, o.size],
                    "area": o.size * o.size,
                    "iscrowd": 0,
                }
            )
    info = {"description": SCENE_WORLD_DESCRIPTION, "split": split, "seed": seed, "image_size": image_size}
    categories = [{"id": CATEGORY_IDS[n], "name": n, "supercategory": n.split()[1]} for n in CATEGORIES]
    captions_path = annotations_dir / f"captions_{split}.json"
    instances_path = annotations_dir / f"instances_{split}.json"
    _write_json(captions_path, {"info": info, "images": images, "annotations": captions})
    _write_json(instances_path, {"info": info, "images": images, "annotations": instances, "categories": categories})
    return SceneWorld(root, split, images_dir, captions_path, instances_path, annotations_dir, num_images)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)  # never leave a half-written annotation file behind


def load_scene_objects(instances_path: str | os.PathLike) -> tuple[dict[int, str], dict[int, list[SceneObject]]]:
    """Read an instances file back into `{image_id: file_name}` and `{image_id: [SceneObject]}`."""
    with open(instances_path, encoding="utf-8") as f:
        data = json.load(f)
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    objects: dict[int, list[SceneObject]] = {image_id: [] for image_id in files}
    for ann in data["annotations"]:
        color, shape = names[ann["category_id"]].split()
        x, y, w, _ = ann["bbox"]
        objects[ann["image_id"]].append(SceneObject(color, shape, int(x), int(y), int(w)))
    return files, objects


# ---------------------------------------------------------------------------------------------------
# Scene QA probe
# ---------------------------------------------------------------------------------------------------


def make_probe_set(instances_path: str | os.PathLike, seed: int = 0) -> list[dict]:
    """Scene QA probe for evaluation: per image one count, at most one color, one yes/no question.

    Templates (exact) and answers:
    - `What color is the {shape}?` -> color, only for a shape that occurs once in the image;
    - `How many shapes are in the image?` -> `one` ... `four`;
    - `Is there a {color} {shape} in the image?` -> `Yes` / `No`, exactly balanced (half of the images
      get a present object, the other half an absent one).

    Each item: `{"image_id", "image" (file name), "question", "answer", "template"}`.
    """
    files, scenes = load_scene_objects(instances_path)
    rng = random.Random(f"probe/{seed}")
    ids = sorted(files)
    order = ids[:]
    rng.shuffle(order)
    say_yes = set(order[: len(order) // 2 + len(order) % 2 * rng.randint(0, 1)])
    probes = []
    for image_id in ids:
        objects = scenes[image_id]
        item = {"image_id": image_id, "image": files[image_id]}
        shape_counts = Counter(o.shape for o in objects)
        unique = sorted(s for s, n in shape_counts.items() if n == 1)
        if unique:
            shape = rng.choice(unique)
            color = next(o.color for o in objects if o.shape == shape)
            probes.append({**item, "question": PROBE_TEMPLATES["color"].format(shape=shape), "answer": color, "template": "color"})
        probes.append({**item, "question": PROBE_TEMPLATES["count"], "answer": NUMBER_WORDS[len(objects)], "template": "count"})
        present = sorted({o.category for o in objects})
        if image_id in say_yes:
            color, shape = rng.choice(present).split()
            answer = "Yes"
        else:
            color, shape = rng.choice([c for c in CATEGORIES if c not in present]).split()
            answer = "No"
        probes.append({**item, "question": PROBE_TEMPLATES["exists"].format(color=color, shape=shape), "answer": answer, "template": "exists"})
    return probes


def write_probe_set(probes: list[dict], path: str | os.PathLike) -> Path:
    """Write the probe as LLaVA records (`.json` list or `.jsonl`), loadable with `load_llava_json`.

    Each record: `id`, `image`, `conversations` (`<image>\\n{question}` -> answer), plus `template` and
    `image_id` so that scores can be split per template.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [
        {
            "id": f"{p['image_id']}_{p['template']}",
            "image": p["image"],
            "conversations": [
                {"from": "human", "value": f"<image>\n{p['question']}"},
                {"from": "gpt", "value": p["answer"]},
            ],
            "template": p["template"],
            "image_id": p["image_id"],
        }
        for p in probes
    ]
    with open(path, "w", encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f, indent=1)
    return path


def write_caption_data(
    world: SceneWorld, path: str | os.PathLike, seed: int = 0, instructions: list[str] | None = None
) -> Path:
    """Stage-1 (feature alignment) data as LLaVA JSON, like CC3M-595K `chat.json`.

    One record per image: a brief-description instruction (from `processing/prompts/brief_questions.txt`)
    with `<image>` before or after it at random, answered by one of the image's captions.
    """
    from processing.prompts import load_instructions

    instructions = instructions or load_instructions("brief")
    with open(world.captions_path, encoding="utf-8") as f:
        data = json.load(f)
    by_image: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    records = []
    for image in data["images"]:
        rng = random.Random(f"caption/{seed}/{image['id']}")
        question = rng.choice(instructions)
        value = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        records.append(
            {
                "id": str(image["id"]),
                "image": image["file_name"],
                "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": rng.choice(by_image[image["id"]])}],
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return path


# ---------------------------------------------------------------------------------------------------
# Short-answer VQA (the role VQAv2/GQA play in LLaVA-1.5's mix665k)
# ---------------------------------------------------------------------------------------------------

VQA_QUESTIONS = {
    "color": ("What color is the {shape}?", "What is the color of the {shape}?", "Which color does the {shape} have?"),
    "count": ("How many shapes are in the image?", "How many objects can you see?", "Count the shapes in the picture."),
    "exists": ("Is there a {color} {shape} in the image?", "Do you see a {color} {shape}?", "Is a {color} {shape} present?"),
}


def scene_vqa_pairs(objects: list[SceneObject], rng: random.Random, turns: int = 6) -> list[tuple[str, str]]:
    """Up to `turns` short-answer questions about one scene, none repeated: the number of shapes, the colour of a shape
    that occurs once, and existence of distinct colour-shape pairs. Answers are single words, like the probe's.

    No answer can be read off the other turns of the same conversation, or the LM learns that instead of looking at
    the image: an existence question never names the shape whose colour is asked, and each existence answer is its
    own fair coin, "Yes" or "No" whatever the turns before it said. (Balancing yes and no within a conversation, as
    this did before, let the LM answer the last ones by counting the earlier ones: existence stayed at chance on the
    single-question probe.) Half of the "no" questions name a colour or a shape that is in the scene, so that
    answering them needs the colour bound to the shape.
    """
    shape_counts = Counter(o.shape for o in objects)
    unique = [o for o in objects if shape_counts[o.shape] == 1]
    pairs = [(rng.choice(VQA_QUESTIONS["count"]), NUMBER_WORDS[len(objects)])]
    asked_shape = None
    # Half the conversations ask no colour, so that their existence questions may name every shape, the scene's only
    # object too: otherwise a one-object scene would only ever be asked about what is not there.
    if unique and rng.random() < 0.5:
        asked = rng.choice(unique)
        asked_shape = asked.shape
        pairs.append((rng.choice(VQA_QUESTIONS["color"]).format(shape=asked.shape), asked.color))
    present_categories = {o.category for o in objects}
    present = sorted(c for c in present_categories if c.split()[1] != asked_shape)
    absent = sorted(c for c in CATEGORIES if c not in present_categories and c.split()[1] != asked_shape)
    present_parts = {part for c in present_categories for part in c.split()}
    near_misses = [c for c in absent if set(c.split()) & present_parts]
    rng.shuffle(present)
    # At most as many existence questions as the scene has "yes" answers for, so every coin can be honoured.
    for _ in range(min(turns - len(pairs), len(present))):
        if rng.random() < 0.5:
            category, answer = present.pop(), "Yes"
        else:
            pool = near_misses if near_misses and rng.random() < 0.5 else absent
            category, answer = pool[rng.randrange(len(pool))], "No"
            absent.remove(category)
            if category in near_misses:
                near_misses.remove(category)
        color, shape = category.split()
        pairs.append((rng.choice(VQA_QUESTIONS["exists"]).format(color=color, shape=shape), answer))
    rng.shuffle(pairs)
    return pairs


def write_scene_vqa(
    instances_path: str | os.PathLike, path: str | os.PathLike, seed: int = 0, turns: int = 6, per_image: int = 1
) -> Path:
    """Short-answer VQA as LLaVA JSON: `per_image` multi-turn records per image, each with its own questions,
    `<image>` before or after the first question at random, like LLaVA-1.5 groups VQAv2/GQA questions of an image
    into one conversation. Records carry `"type": "vqa"` beside the teacher's `conversation`/`detail`/`complex`,
    for `--group_batches_by type`."""
    files, scenes = load_scene_objects(instances_path)
    records = []
    for image_id in sorted(files):
        for k in range(per_image):
            rng = random.Random(f"vqa/{seed}/{image_id}" + (f"/{k}" if k else ""))
            conversations = []
            for i, (question, answer) in enumerate(scene_vqa_pairs(scenes[image_id], rng, turns)):
                if i == 0:
                    question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
                conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            record_id = f"{image_id}_vqa" + (str(k) if k else "")
            records.append({"id": record_id, "image": files[image_id], "conversations": conversations, "type": "vqa"})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, records)
    return path


def write_color_questions(instances_path: str | os.PathLike, path: str | os.PathLike, seed: int = 0) -> Path:
    """One single-question record per shape that occurs once in an image ("What color is the {shape}?" -> "red"),
    `"type": "color"`, `<image>` before or after the question at random.

    Why beside `write_scene_vqa`: there at most one question in two conversations asks a colour, and the LM first
    learns to name a colour that is anywhere in the scene, which answers every one-object scene and half of the
    rest; finding the asked shape's tokens and reading their colour took ~600 steps of colour questions alone, and
    in the VQA mix colour stayed at that guess (README, stop 19).
    """
    files, scenes = load_scene_objects(instances_path)
    records = []
    for image_id in sorted(files):
        rng = random.Random(f"color/{seed}/{image_id}")
        shape_counts = Counter(o.shape for o in scenes[image_id])
        for o in scenes[image_id]:
            if shape_counts[o.shape] != 1:
                continue
            question = rng.choice(VQA_QUESTIONS["color"]).format(shape=o.shape)
            question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
            records.append({"id": f"{image_id}_color_{o.shape}", "image": files[image_id], "type": "color",
                            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": o.color}]})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, records)
    return path
