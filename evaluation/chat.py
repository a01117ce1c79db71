"""Chat with a LLaVA checkpoint in the terminal; the reply's tokens are printed as they are generated.

    llava-chat --model ckpt --image photo.jpg
    python -m evaluation.chat --model ckpt --image photo.jpg --do-sample --temperature 0.2 --top-p 0.9

Type a message and press Enter. Commands:

    /image PATH   use another image (starts a new conversation: LLaVA is trained on one image per conversation)
    /reset        clear the conversation, keep the image
    /exit         quit (so does end of input, Ctrl-D)

The image goes into the first user turn (`<image>\\n{message}`), as in training. Replies go to stdout as
`ASSISTANT: ...` lines; notes and errors go to stderr, so piped output holds the replies only. Decoding is greedy
unless `--do-sample`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from threading import Thread

import torch

from evaluation.generation import (
    GenerationSettings,
    ImageLoadError,
    add_generation_arguments,
    add_model_arguments,
    load_image,
    load_model,
    settings_from_args,
    user_message,
)

COMMANDS_HELP = "commands: /image PATH, /reset, /exit"


def stream_reply(model, processor, messages: list[dict], settings: GenerationSettings | None = None) -> Iterator[str]:
    """Yield the reply to `messages` (ending with a user turn) piece by piece while `model.generate` runs.

    Generation runs in a thread feeding a `TextIteratorStreamer`; an error in that thread is raised here.
    The pieces joined equal the decoded reply (special tokens skipped).
    """
    from transformers import TextIteratorStreamer

    settings = settings or GenerationSettings(max_new_tokens=512)
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    tokenizer = processor.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def generate():
        try:
            with torch.inference_mode():  # thread-local: must be entered in the generating thread
                model.generate(**inputs, **settings.generate_kwargs(), streamer=streamer, pad_token_id=pad_token_id)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consuming thread below
            errors.append(e)
            streamer.end()  # unblocks the consumer

    thread = Thread(target=generate, daemon=True)
    thread.start()
    for piece in streamer:
        if piece:
            yield piece
    thread.join()
    if errors:
        raise errors[0]


class ChatSession:
    """A multi-turn conversation about (at most) one image."""

    def __init__(self, model, processor, settings: GenerationSettings | None = None, image=None):
        self.model, self.processor = model, processor
        self.settings = settings or GenerationSettings(max_new_tokens=512)
        self.image = None
        self.messages: list[dict] = []
        if image is not None:
            self.set_image(image)

    def set_image(self, image) -> None:
        """Use `image` (path or PIL image) from now on and start a new conversation. Raises ImageLoadError."""
        self.image = load_image(image)
        self.reset()

    def reset(self) -> None:
        self.messages = []

    def stream(self, text: str) -> Iterator[str]:
        """Send a user message; yield the reply's pieces; the reply joins the history once it is complete."""
        # A typed "<image>" would become image tokens without an image behind them.
        text = text.replace(getattr(self.processor, "image_token", "<image>"), "").strip()
        image = self.image if not self.messages else None
        self.messages.append(user_message(text, image))
        pieces = []
        try:
            for piece in stream_reply(self.model, self.processor, self.messages, self.settings):
                pieces.append(piece)
                yield piece
        except BaseException:
            self.messages.pop()  # the turn failed or was abandoned: leave the history as it was
            raise
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": "".join(pieces).strip()}]})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--image", help="image file to talk about (change it later with /image PATH)")
    add_generation_arguments(parser, max_new_tokens=512)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def note(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    image = None
    if args.image:  # fail on a bad image before spending time on the model
        try:
            image = load_image(args.image)
        except ImageLoadError as e:
            parser.exit(2, f"llava-chat: error: {e}\n")
    try:
        model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    except (OSError, ValueError) as e:
        parser.exit(2, f"llava-chat: error: cannot load model {args.model}: {e}\n")
    session = ChatSession(model, processor, settings_from_args(args, warn=note), image)
    interactive = sys.stdin.isatty()
    if interactive:
        note(f"llava-chat: {args.model} on {model.device}" + (f", image {args.image}" if args.image else "") + f"; {COMMANDS_HELP}")

    while True:
        if interactive:
            print("USER: ", end="", flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            note("(conversation cleared)")
            continue
        if text == "/image" or text.startswith("/image "):
            path = text[len("/image") :].strip().strip("'\"")
            if not path:
                note("usage: /image PATH")
                continue
            try:
                session.set_image(path)
            except ImageLoadError as e:
                note(f"error: {e} (keeping the current image and conversation)")
                continue
            note(f"(image {path}; new conversation)")
            continue
        if text.startswith("/"):
            note(f"unknown command {text.split()[0]}; {COMMANDS_HELP}")
            continue
        print("ASSISTANT: ", end="", flush=True)
        try:
            for piece in session.stream(text):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            note("\n(interrupted)")
            return 130
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
