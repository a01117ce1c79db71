import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llava():
    """A tiny random (model, processor) pair: CLIP 32 px / patch 8 (16 image tokens), LLaMA 2 x 64."""
    import modeling_llava  # noqa: F401  (registers the Auto classes)
    from modeling_llava.builders import build_tiny_llava

    model, processor = build_tiny_llava("mlp2x_gelu")
    return model.eval(), processor


@pytest.fixture
def red_image():
    return Image.new("RGB", (40, 30), (220, 30, 30))


@pytest.fixture
def blue_image():
    image = Image.new("RGB", (32, 48), (255, 255, 255))
    image.paste((20, 40, 220), (4, 4, 28, 40))
    return image


def user(text, image=None, image_first=True):
    """A user message with typed content; `image` is a PIL image (or True for a placeholder)."""
    parts = [{"type": "text", "text": text}]
    if image is not None:
        part = {"type": "image"} if image is True else {"type": "image", "image": image}
        parts = [part, *parts] if image_first else [*parts, part]
    return {"role": "user", "content": parts}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The quickstart's tiny preset up to the parts: scene world, caption + instruction data, CLIP and LM stand-ins."""
    sys.path.insert(0, str(REPO / "examples"))
    import quickstart

    out = tmp_path_factory.mktemp("tiny_world")
    preset = quickstart.PRESETS["tiny"]
    world_dir, data_dir, probe_path = quickstart.make_data(out, preset, seed=0)
    clip_dir, lm_dir = quickstart.make_parts(out, world_dir, data_dir, preset, seed=0)
    return {
        "root": out, "images": world_dir / "images" / "train", "eval_images": world_dir / "images" / "eval",
        "captions": data_dir / "captions.json", "instruct": data_dir / "instruct.json", "probe": probe_path,
        "clip": clip_dir, "lm": lm_dir,
    }


@pytest.fixture(scope="session")
def tiny_stage1(tiny_world, tmp_path_factory):
    """A 2-step stage-1 checkpoint on the tiny world's parts: where the stage-2 tests start."""
    from training import sft

    out = tmp_path_factory.mktemp("tiny_stage1")
    sft.main([
        "--stage", "stage1", "--vision_model_name_or_path", str(tiny_world["clip"]),
        "--language_model_name_or_path", str(tiny_world["lm"]), "--data_path", str(tiny_world["captions"]),
        "--image_folder", str(tiny_world["images"]), "--output_dir", str(out), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--report_to", "none", "--gradient_checkpointing", "false",
        "--save_strategy", "no",
    ])
    return out
