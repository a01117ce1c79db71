"""COCO-format annotations -> the symbolic image context the LLaVA paper feeds its text-only teacher.

Per image the paper gives the teacher two kinds of symbolic representation:
captions (five per COCO image) and boxes `category: [x1, y1, x2, y2]` normalised to 0-1 with two
decimals. `ImageContext.to_prompt()` renders exactly that; `ImageContext.from_prompt()` reads it back
(the offline symbolic teacher works from this text, like an LLM teacher would).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

CAPTIONS_HEADER = "Captions:"
BOXES_HEADER = "Objects (category: [x1, y1, x2, y2], normalised to 0-1, origin at the top left):"
_BOX_LINE = re.compile(r"^(?P<name>.+?): \[(?P<coords>[-\d., ]+)\]$")


@dataclass
class ImageContext:
    """Symbolic context of one image: its captions and normalised boxes."""

    image_id: int
    file_name: str
    width: int
    height: int
    captions: list[str] = field(default_factory=list)
    boxes: list[tuple[str, list[float]]] = field(default_factory=list)

    @property
    def categories(self) -> set[str]:
        """Category names present in the image."""
        return {name for name, _ in self.boxes}

    def to_prompt(self) -> str:
        """Text given to the teacher: captions, then one `category: [x1, y1, x2, y2]` line per object."""
        lines = [CAPTIONS_HEADER, *self.captions, "", BOXES_HEADER]
        lines += [f"{name}: [{', '.join(f'{v:.2f}' for v in box)}]" for name, box in self.boxes]
        return "\n".join(lines)

    @classmethod
    def from_prompt(cls, text: str, image_id: int = -1, file_name: str = "", width: int = 0, height: int = 0) -> "ImageContext":
        """Parse the text of `to_prompt()` back (anything after the box lines is ignored)."""
        captions: list[str] = []
        boxes: list[tuple[str, list[float]]] = []
        section = None
        for line in text.splitlines():
            stripped = line.strip()
            if stripped == CAPTIONS_HEADER:
                section = "captions"
            elif stripped == BOXES_HEADER:
                section = "boxes"
            elif not stripped:
                if section == "boxes" and boxes:
                    section = None  # a blank line ends the box list
            elif section == "captions":
                captions.append(stripped)
            elif section == "boxes":
                match = _BOX_LINE.match(stripped)
                if match is None:
                    section = None
                    continue
                coords = [float(v) for v in match["coords"].split(",")]
                if len(coords) == 4:
                    boxes.append((match["name"], coords))
        return cls(image_id, file_name, width, height, captions, boxes)


def normalise_box(bbox_xywh: list[float], width: int, height: int) -> list[float]:
    """COCO `[x, y, w, h]` in pixels -> `[x1, y1, x2, y2]` in 0-1, rounded to 2 decimals as in the paper."""
    x, y, w, h = bbox_xywh
    coords = [x / width, y / height, (x + w) / width, (y + h) / height]
    return [round(min(max(v, 0.0), 1.0), 2) for v in coords]


def find_annotation_files(annotations_dir: str | os.PathLike, split: str) -> tuple[Path, Path | None]:
    """Locate `captions_{split}*.json` (required) and `instances_{split}*.json` (optional) in a folder.

    `split="train2017"` finds COCO's `captions_train2017.json`; `split="train"` finds the synthetic
    world's `captions_train.json`. Several matches are an error so that 2014 and 2017 never mix.
    """
    folder = Path(annotations_dir)

    def one(prefix: str, required: bool) -> Path | None:
        exact = folder / f"{prefix}_{split}.json"
        if exact.is_file():
            return exact
        matches = sorted(folder.glob(f"{prefix}_{split}*.json"))
        if len(matches) > 1:
            raise ValueError(f"{folder}: several {prefix} files match split {split!r}: {[m.name for m in matches]}; name one exactly")
        if not matches:
            if required:
                raise FileNotFoundError(f"{folder}: no {prefix}_{split}*.json found")
            return None
        return matches[0]

    return one("captions", True), one("instances", False)  # type: ignore[return-value]


def load_json(path: str | os.PathLike) -> dict:
    data = Path(path).read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}: not valid UTF-8 at line {line} (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def load_categories(instances_path: str | os.PathLike) -> list[str]:
    """Category names of an instances file (the 80 COCO names for real COCO)."""
    return [c["name"] for c in load_json(instances_path).get("categories", [])]


def load_coco_contexts(
    captions_path: str | os.PathLike, instances_path: str | os.PathLike | None = None
) -> list[ImageContext]:
    """One `ImageContext` per image listed in the captions (and instances) file, sorted by image id."""
    captions_data = load_json(captions_path)
    instances_data = load_json(instances_path) if instances_path is not None else {}
    images: dict[int, dict] = {}
    for image in captions_data.get("images", []) + instances_data.get("images", []):
        images.setdefault(image["id"], image)
    captions: dict[int, list[str]] = defaultdict(list)
    for ann in sorted(captions_data.get("annotations", []), key=lambda a: a.get("id", 0)):
        captions[ann["image_id"]].append(" ".join(ann["caption"].split()))
    names = {c["id"]: c["name"] for c in instances_data.get("categories", [])}
    boxes: dict[int, list[tuple[str, list[float]]]] = defaultdict(list)
    for ann in sorted(instances_data.get("annotations", []), key=lambda a: a.get("id", 0)):
        image = images.get(ann["image_id"])
        if image is None:
            raise ValueError(f"{instances_path}: annotation {ann.get('id')} refers to unknown image {ann['image_id']}")
        boxes[ann["image_id"]].append((names[ann["category_id"]], normalise_box(ann["bbox"], image["width"], image["height"])))
    return [
        ImageContext(
            image_id=image_id,
            file_name=image["file_name"],
            width=image["width"],
            height=image["height"],
            captions=captions.get(image_id, []),
            boxes=boxes.get(image_id, []),
        )
        for image_id, image in sorted(images.items())
    ]
