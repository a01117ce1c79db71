"""Dataset card for generated LLaVA instruction data, rendered with `huggingface_hub.DatasetCard`."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData

TEMPLATE_PATH = Path(__file__).resolve().parent / "dataset_card_template.md"


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def render_dataset_card(
    *,
    counts_per_type: dict[str, int],
    source: str,
    teacher: str,
    license: str = "cc-by-4.0",
    pretty_name: str = "LLaVA instruction data",
    description: str = "",
    filter_stats: dict[str, int] | None = None,
    text_only: int = 0,
    repo_id: str | None = None,
    llava_json_name: str = "train.json",
    include_images: bool = False,
    tags: list[str] | None = None,
) -> DatasetCard:
    """Render the card: metadata (license, `task_categories: image-text-to-text`, parquet config) plus
    source, teacher, counts per type, filter statistics and loading instructions."""
    total = sum(counts_per_type.values())
    card_data = DatasetCardData(
        license=license,
        pretty_name=pretty_name,
        task_categories=["image-text-to-text"],
        language=["en"],
        size_categories=[_size_category(total)],
        tags=tags or ["llava", "visual-instruction-tuning", "synthetic"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
    )
    return DatasetCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        pretty_name=pretty_name,
        description=description or f"{total} visual instruction samples generated from {source} by the {teacher} teacher.",
        source=source,
        teacher=teacher,
        license=license,
        counts_per_type=dict(sorted(counts_per_type.items())),
        total=total,
        text_only=text_only,
        filter_stats=filter_stats,
        has_type=any(kind != "unknown" for kind in counts_per_type),
        repo_id=repo_id,
        llava_json_name=llava_json_name,
        include_images=include_images,
    )
