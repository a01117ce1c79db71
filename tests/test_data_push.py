"""Dataset packaging (LLaVA JSON + parquet + card) and the push, against a local stand-in for the Hub."""

import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import datasets  # noqa: E402
from http_fixtures import FakeHub  # noqa: E402
import pytest  # noqa: E402
from huggingface_hub import DatasetCard  # noqa: E402

from processing.generate import generate_from_annotations  # noqa: E402
from processing.llava_json import load_llava_json  # noqa: E402
from processing.push_dataset import main, prepare_dataset_folder, push_dataset_folder  # noqa: E402
from processing.synthetic import make_scene_world  # noqa: E402
from processing.teachers import SymbolicTeacher  # noqa: E402


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A small scene world, its symbolic instruction data (JSONL + stats), plus one text-only record."""
    root = tmp_path_factory.mktemp("push")
    world = make_scene_world(root / "world", 8, "train", seed=3)
    output = root / "instruct.jsonl"
    generate_from_annotations(world.annotations_dir, "train", SymbolicTeacher(), output, progress=False)
    with open(output, "a") as f:
        f.write(json.dumps({"id": "text-only-1", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}) + "\n")
    return world, output


def load_parquet(folder, cache):
    return datasets.load_dataset("parquet", data_files=str(Path(folder) / "data" / "*.parquet"), split="train", cache_dir=str(cache))


def test_prepared_folder_loads_back(generated, tmp_path):
    world, source = generated
    images = tmp_path / "images"
    shutil.copytree(world.images_dir, images)
    folder = prepare_dataset_folder(
        source, tmp_path / "hub", image_folder=images, source_description="synthetic scene world (seed 3)",
        license="cc-by-4.0", repo_id="me/scene-instruct",
    )
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "README.md", "data/train-00000-of-00001.parquet", "llava/train.json"]

    # LLaVA JSON: the source records unchanged.
    source_records = [json.loads(line) for line in source.read_text().splitlines()]
    assert json.loads((folder / "llava" / "train.json").read_text()) == source_records

    # Parquet: same messages as the loader gives, images embedded (the image folder is gone).
    expected = load_llava_json(source, images)
    shutil.rmtree(images)
    ds = load_parquet(folder, tmp_path / "cache")
    assert ds.column_names == ["id", "type", "messages", "images"]
    assert ds["id"] == expected["id"] and ds["messages"] == expected["messages"]
    assert ds["type"].count("conversation") == 8 and ds["type"].count("unknown") == 1
    assert ds[0]["images"][0].size == (64, 64) and ds[-1]["images"] == []

    # Card: metadata and the numbers.
    card = DatasetCard.load(folder / "README.md")
    assert card.data.task_categories == ["image-text-to-text"] and card.data.license == "cc-by-4.0"
    assert card.data.configs[0]["data_files"][0]["path"] == "data/train-*.parquet"
    text = card.text
    for line in ("| conversation | 8 |", "| detail | 8 |", "| complex | 8 |", "| unknown | 1 |", "| **total** | **25** |",
                 "| written | 24 |", "| unparsable | 0 |", "| ungrounded | 0 |"):
        assert line in text, line
    assert "**Teacher:** symbolic" in text and "synthetic scene world (seed 3)" in text
    assert '"me/scene-instruct"' in text and "1 of the 25 records are text-only" in text


def test_cli_prepares_folder_with_images(generated, tmp_path):
    world, source = generated
    folder = main(["--source", str(source), "--image-folder", str(world.images_dir), "--folder", str(tmp_path / "hub"), "--include-images", "--teacher", "my-teacher"])
    assert len(list((folder / "images").iterdir())) == 8
    assert "**Teacher:** my-teacher" in (folder / "README.md").read_text()
    ds = load_llava_json(folder / "llava" / "train.json", folder / "images")
    assert len(ds) == 25


def test_push_uploads_exactly_the_prepared_folder(generated, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # HF_HUB_OFFLINE=1 blocks all huggingface_hub requests; lift it for this test only, in which the
    # only server contacted is the local stand-in on 127.0.0.1 (passed explicitly as the endpoint).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    world, source = generated
    folder = prepare_dataset_folder(source, tmp_path / "hub", image_folder=world.images_dir)
    hub = FakeHub(tmp_path / "received")
    try:
        url = push_dataset_folder(folder, "me/scene", token="hf_fake_token", endpoint=hub.url)
    finally:
        hub.close()
    assert url.endswith("/commit/" + "a" * 40)
    assert (hub.created["type"], hub.created["organization"], hub.created["name"]) == ("dataset", "me", "scene")
    assert all(auth == "Bearer hf_fake_token" for path, auth in hub.calls if path.startswith("/api/"))
    assert any("/api/datasets/me/scene/commit/main" == path for path, _ in hub.calls)

    sent = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    received = tmp_path / "received"
    assert sorted(p.relative_to(received).as_posix() for p in received.rglob("*") if p.is_file()) == sent
    assert all((received / name).read_bytes() == (folder / name).read_bytes() for name in sent)

    # What the Hub would serve loads like the original.
    ds = load_parquet(received, tmp_path / "cache")
    assert len(ds) == 25 and ds[0]["images"][0].size == (64, 64)
    assert DatasetCard.load(received / "README.md").data.task_categories == ["image-text-to-text"]
