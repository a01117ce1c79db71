"""Ask one question about every image of a folder; answers appended to a JSONL file, resumable.

    python examples/batch_inference.py --model ckpt --images photos/ --output answers.jsonl \\
        --question "Describe the image briefly." --batch-size 8

Each line: `{"question_id": <image path relative to the folder>, "prompt": ..., "text": <answer>, "image": ...}`.
Rerunning skips the images already answered, so a killed run (or a folder that grew) continues where it stopped.
Images that cannot be read are reported and skipped, not fatal.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from evaluation.generation import (  # noqa: E402
    add_generation_arguments,
    add_model_arguments,
    load_model,
    run_predictions,
    settings_from_args,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def find_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files under `folder` (by suffix), sorted, as paths relative to it."""
    pattern = "**/*" if recursive else "*"
    return sorted(p.relative_to(folder) for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--output", required=True, type=Path, help="JSONL file of answers (appended to; resumable)")
    parser.add_argument("--question", default="Describe the image briefly.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-recursive", action="store_true", help="only the folder itself, not its sub-folders")
    add_generation_arguments(parser, max_new_tokens=128)
    args = parser.parse_args(argv)

    if not args.images.is_dir():
        parser.exit(2, f"error: image folder not found: {args.images}\n")
    requests = [
        {"question_id": relative.as_posix(), "image": relative.as_posix(), "prompt": args.question}
        for relative in find_images(args.images, recursive=not args.no_recursive)
    ]
    if not requests:
        parser.exit(1, f"error: no image files in {args.images}\n")

    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    predictions = run_predictions(
        model, processor, requests, args.output, settings=settings_from_args(args), batch_size=args.batch_size,
        image_root=args.images, model_id=str(args.model), keep_fields=("image",), on_bad_image="skip", desc="answer",
    )
    print(f"{len(predictions)} of {len(requests)} images answered in {args.output}")
    return predictions


if __name__ == "__main__":
    main()
