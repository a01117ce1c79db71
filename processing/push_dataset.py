"""Package generated LLaVA instruction data as a Hub dataset folder (LLaVA JSON + parquet + card) and push it.

    python -m processing.push_dataset --source data/instruct.jsonl --image-folder world/images/train \\
        --folder out/hub_dataset [--push-to user/scene-instruct]

Folder layout (what is uploaded):

    README.md                              dataset card (hub_cards/dataset_card_template.md)
    data/train-00000-of-00001.parquet      id, [type], messages, images (image bytes embedded)
    llava/train.json                       the same records as LLaVA JSON
    images/...                             only with include_images=True
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import datasets

from processing.llava_json import load_llava_json, write_llava_json

LLAVA_JSON_NAME = "train.json"


def _types_of(dataset: datasets.Dataset) -> list[str] | None:
    """Per-record instruction type kept from the source's `type` field, or None when no record has one."""
    types = [json.loads(meta).get("extra", {}).get("type") for meta in dataset["llava_meta"]]
    if all(t is None for t in types):
        return None
    return [t if isinstance(t, str) else "unknown" for t in types]


def _filter_stats(stats_path: Path | None, skipped: Counter) -> tuple[dict[str, int] | None, list[str]]:
    stats: dict[str, int] = {}
    teachers: list[str] = []
    if stats_path is not None and stats_path.exists():
        data = json.loads(stats_path.read_text(encoding="utf-8"))
        totals = data.get("totals", {})
        teachers = data.get("teachers", [])
        for name in ("written", "unparsable", "ungrounded", "teacher_errors"):
            if name in totals:
                stats[name] = totals[name]
    for reason, count in sorted(skipped.items()):
        stats[f"skipped at packaging ({reason})"] = count
    return (stats or None), teachers


def prepare_dataset_folder(
    source: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    image_folder: str | os.PathLike | None = None,
    stats_path: str | os.PathLike | None = None,
    teacher: str | None = None,
    source_description: str | None = None,
    license: str = "cc-by-4.0",
    pretty_name: str = "LLaVA instruction data",
    repo_id: str | None = None,
    include_images: bool = False,
    policy: str = "error",
    rows_per_shard: int = 20_000,
) -> Path:
    """Write everything a Hub dataset repo needs into `folder` and return it.

    Args:
        source: LLaVA JSON or JSONL (e.g. the output of `processing.generate`; its `type` field is kept).
        folder: output folder (created; existing `data/`, `llava/`, `images/` are replaced).
        image_folder: folder the `image` paths are relative to (default: the source's folder).
        stats_path: generation statistics for the card (default: `{source}.stats.json` if present).
        teacher: teacher name for the card (default: from the statistics file).
        source_description: where images and annotations come from, for the card.
        license: license identifier written to the card metadata.
        repo_id: the target repo, only used in the card's loading snippet.
        include_images: also copy the image files (the parquet embeds them either way).
        policy: `load_llava_json` policy for bad records ("error" or "skip"; skipped ones go in the card).
        rows_per_shard: parquet shard size in records.
    """
    from datasets.table import embed_table_storage

    from hub_cards.dataset_card import render_dataset_card

    source = Path(source)
    folder = Path(folder)
    image_root = Path(image_folder) if image_folder is not None else source.parent
    dataset, report = load_llava_json(source, image_root, policy=policy, return_report=True)
    for sub in ("data", "llava", "images"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    (folder / "data").mkdir(parents=True, exist_ok=True)

    write_llava_json(dataset, folder / "llava" / LLAVA_JSON_NAME)

    types = _types_of(dataset)
    table = dataset.select_columns(["id", "messages", "images"])
    if types is not None:
        table = table.add_column("type", types).select_columns(["id", "type", "messages", "images"])
    # Embed the image bytes (as push_to_hub does) so that the parquet does not depend on local paths.
    table = table.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True).with_format(None)
    num_shards = max(1, math.ceil(len(table) / rows_per_shard))
    for index in range(num_shards):
        shard = table.shard(num_shards=num_shards, index=index, contiguous=True)
        shard.to_parquet(str(folder / "data" / f"train-{index:05d}-of-{num_shards:05d}.parquet"))

    if include_images:
        for relative in dataset["image_file"]:
            if relative is not None:
                target = folder / "images" / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(image_root / relative, target)

    stats_file = Path(stats_path) if stats_path is not None else Path(f"{source}.stats.json")
    filter_stats, teachers = _filter_stats(stats_file, report.skipped)
    counts = Counter(types) if types is not None else Counter({"unknown": len(dataset)})
    card = render_dataset_card(
        counts_per_type=dict(counts),
        source=source_description or source.name,
        teacher=teacher or (", ".join(teachers) if teachers else "unknown"),
        license=license,
        pretty_name=pretty_name,
        filter_stats=filter_stats,
        text_only=sum(1 for image in dataset["image_file"] if image is None),
        repo_id=repo_id,
        llava_json_name=LLAVA_JSON_NAME,
        include_images=include_images,
    )
    card.save(folder / "README.md")
    return folder


def push_dataset_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
    commit_message: str = "Upload LLaVA instruction data",
) -> str:
    """Create the dataset repo (if needed) and upload the folder; returns the commit URL.

    `token=None` uses the saved login / `HF_TOKEN`; the token is never printed.
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset", commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Package LLaVA instruction data for the Hub (and optionally push it).")
    parser.add_argument("--source", required=True, help="LLaVA JSON/JSONL, e.g. the output of processing.generate")
    parser.add_argument("--image-folder", help="folder the image paths are relative to")
    parser.add_argument("--folder", required=True, help="output folder")
    parser.add_argument("--stats", help="generation statistics (default: SOURCE.stats.json)")
    parser.add_argument("--teacher")
    parser.add_argument("--source-description")
    parser.add_argument("--license", default="cc-by-4.0")
    parser.add_argument("--pretty-name", default="LLaVA instruction data")
    parser.add_argument("--include-images", action="store_true")
    parser.add_argument("--policy", default="error", choices=("error", "skip"))
    parser.add_argument("--push-to", metavar="REPO_ID", help="upload the folder to this dataset repo")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    folder = prepare_dataset_folder(
        args.source, args.folder, image_folder=args.image_folder, stats_path=args.stats, teacher=args.teacher,
        source_description=args.source_description, license=args.license, pretty_name=args.pretty_name,
        repo_id=args.push_to, include_images=args.include_images, policy=args.policy,
    )
    print(f"prepared {folder}")
    if args.push_to:
        print(f"pushed: {push_dataset_folder(folder, args.push_to, private=args.private)}")
    return folder


if __name__ == "__main__":
    main()
