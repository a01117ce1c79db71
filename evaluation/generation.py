"""Batched generation for evaluation: (image, prompt) requests in, answers out, resumable.

A request is a dict `{"question_id", "prompt", "image"}` (`image`: a path, a PIL image or None for a text-only
question). `run_predictions` answers the requests in batches (left padding, so every sequence of a batch ends
where generation starts), shows a progress bar, and appends one JSONL line per answer:

    {"question_id": ..., "prompt": ..., "text": <answer>, "model_id": ...}

keyed by `question_id`: a rerun skips the ids already in the file, so a killed evaluation resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from evaluation.jsonl import JsonlAppender, read_done


class ImageLoadError(ValueError):
    """An image file is missing or cannot be decoded; the message names the file."""


@dataclass
class GenerationSettings:
    """Decoding settings. Greedy by default: evaluation numbers should not depend on a seed."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:  # passing them under greedy decoding only earns a warning
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> the GPU when there is one, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on a GPU that supports it, float32 elsewhere (CPU half precision is slow)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}: expected auto, float32, bfloat16 or float16.") from None


def load_model(model_name_or_path: str | os.PathLike, *, device: str = "auto", dtype: str = "auto"):
    """A LLaVA checkpoint folder (or Hub id) -> `(model, processor)`, in eval mode on `device`.

    Loads with `trust_remote_code=True`: a saved checkpoint carries its own modeling and processing code.
    """
    from transformers import AutoModelForCausalLM, AutoProcessor

    path = str(model_name_or_path)
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1  # not `org/name`
    if looks_local and not os.path.exists(path):
        raise FileNotFoundError(f"Model folder not found: {path}")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is not a model folder: it has no config.json")
    torch_device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=resolve_dtype(dtype, torch_device))
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    return model.to(torch_device).eval(), processor


def load_image(image: Any, root: str | os.PathLike | None = None) -> Image.Image:
    """A PIL image or a file path (relative to `root` when given) -> an RGB PIL image.

    Raises `ImageLoadError` naming the file when it is missing or not an image.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise ImageLoadError(f"expected an image file path or a PIL image, got {type(image).__name__}")
    path = Path(root, image) if root is not None and not os.path.isabs(image) else Path(image)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")  # convert() forces the decode, so a truncated file fails here
    # DecompressionBombError: a header claiming more than 2x Image.MAX_IMAGE_PIXELS, refused before decoding.
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def user_message(prompt: str, image: Image.Image | None = None) -> dict:
    """A user turn in typed-content form; the image (when any) comes first, as `<image>\\n{prompt}`."""
    content = [{"type": "text", "text": prompt}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return {"role": "user", "content": content}


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_batch(model, processor, conversations: list[list[dict]], settings: GenerationSettings | None = None) -> list[str]:
    """Generate one answer per conversation (each ends with a user turn), in one left-padded batch.

    Returns the decoded new tokens, special tokens removed, whitespace stripped.
    """
    settings = settings or GenerationSettings()
    inputs = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    ).to(model.device)
    tokenizer = processor.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**inputs, **settings.generate_kwargs(), pad_token_id=pad_token_id)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def batched(items: list, size: int) -> Iterator[list]:
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _request_conversation(request: dict, image_root, source: str) -> list[dict]:
    where = f"{source}: request {request.get('question_id')!r}"
    prompt = request.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}, field 'prompt': expected a non-empty string, got {prompt!r}")
    image = None
    if request.get("image") is not None:
        try:
            image = load_image(request["image"], image_root)
        except ImageLoadError as e:
            raise ImageLoadError(f"{where}, field 'image': {e}") from None
    return [user_message(prompt, image)]


def run_predictions(
    model,
    processor,
    requests: Iterable[dict],
    output_path: str | os.PathLike,
    *,
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    image_root: str | os.PathLike | None = None,
    model_id: str | None = None,
    keep_fields: tuple[str, ...] = (),
    on_bad_image: str = "error",
    progress: bool = True,
    desc: str = "generate",
) -> dict[str, dict]:
    """Answer every request not yet in `output_path` and append the answers to it (JSONL, one line per answer).

    Args:
        requests: dicts with `question_id` (unique), `prompt` and optionally `image` (path relative to
            `image_root`, absolute path, PIL image or None).
        output_path: the predictions file; ids already in it are skipped (resume).
        keep_fields: request fields copied into each prediction line (e.g. `category`, `label`).
        model_id: written into each line, to tell predictions of different checkpoints apart.
        on_bad_image: `"error"` raises `ImageLoadError` (naming the request and file) on a missing or corrupt
            image; `"skip"` reports it on stderr and goes on (nothing is written, so a rerun tries it again).
    Returns every answered request's prediction record by `str(question_id)`, in request order.
    """
    from tqdm.auto import tqdm

    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    requests = list(requests)
    source = str(output_path)
    seen: set[str] = set()
    for request in requests:
        if "question_id" not in request:
            raise ValueError(f"{source}: a request has no 'question_id': {request!r}"[:300])
        qid = str(request["question_id"])
        if qid in seen:
            raise ValueError(f"{source}: question_id {qid!r} appears twice among the requests; ids must be unique")
        seen.add(qid)

    done = read_done(output_path, "question_id")
    pending = [r for r in requests if str(r["question_id"]) not in done]
    bar = tqdm(total=len(requests), initial=len(requests) - len(pending), desc=desc, unit="q", disable=not progress)
    skipped = []
    with JsonlAppender(output_path) as out:
        for batch in batched(pending, batch_size):
            conversations, kept = [], []
            for request in batch:
                try:
                    conversations.append(_request_conversation(request, image_root, source))
                    kept.append(request)
                except ImageLoadError as e:
                    if on_bad_image == "error":
                        raise
                    skipped.append(str(e))
                    print(f"skipped: {e}", file=sys.stderr)
            answers = generate_batch(model, processor, conversations, settings) if conversations else []
            for request, answer in zip(kept, answers):
                record = {"question_id": request["question_id"], "prompt": request["prompt"], "text": answer}
                if model_id is not None:
                    record["model_id"] = model_id
                record.update({k: request[k] for k in keep_fields if k in request})
                out.write(record)
                done[str(request["question_id"])] = record
            bar.update(len(batch))
    bar.close()
    if skipped:
        print(f"{len(skipped)} request(s) skipped for unreadable images; a rerun retries them", file=sys.stderr)
    return {str(r["question_id"]): done[str(r["question_id"])] for r in requests if str(r["question_id"]) in done}


# ---------------------------------------------------------------------------------------------------
# Command-line helpers shared by the evaluation and chat commands
# ---------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help="checkpoint folder (or Hub id) to load with trust_remote_code")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, mps, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--do-sample", action="store_true", help="sample (default: greedy decoding)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --do-sample; default 1.0)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (with --do-sample; default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seeds sampling")


def settings_from_args(args: argparse.Namespace, warn=print) -> GenerationSettings:
    """GenerationSettings from the flags of `add_generation_arguments`; sampling flags without --do-sample warn."""
    if not args.do_sample and (args.temperature is not None or args.top_p is not None):
        warn("note: --temperature/--top-p only apply with --do-sample; decoding greedily")
    torch.manual_seed(args.seed)
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_p=1.0 if args.top_p is None else args.top_p,
    )
