"""A Gradio chat for a LLaVA checkpoint: drop an image into the message box, ask, watch the reply stream.

    pip install -e ".[demo]"            # gradio is an optional extra
    python examples/gradio_app.py --model ckpt [--port 7860] [--share]

Importing this file does not import gradio (only `build_demo` does), so the rest of the repository, and the
conversion of Gradio's chat history (`history_to_messages`, `make_respond`), work and are tested without it.

One image per conversation, as LLaVA is trained: a message that brings a new image starts a new conversation
about that image (the chat window keeps showing the old turns, but the model no longer sees them).
"""

import argparse
import inspect
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from evaluation.chat import stream_reply  # noqa: E402
from evaluation.generation import GenerationSettings, load_image, load_model, user_message  # noqa: E402

NO_QUESTION = "Got the image. What would you like to know about it?"


def _texts_and_files(content) -> tuple[list[str], list[str]]:
    """Texts and file paths of one Gradio message content, in any of the shapes Gradio 4-6 use."""
    if content is None:
        return [], []
    if isinstance(content, str):
        return ([content] if content.strip() else []), []
    if isinstance(content, (list, tuple)):
        texts, files = [], []
        for item in content:
            t, f = _texts_and_files(item)
            texts += t
            files += f
        return texts, files
    if isinstance(content, dict):
        if content.get("type") == "text" or ("text" in content and "files" not in content):
            return _texts_and_files(content.get("text"))
        if "files" in content:  # a MultimodalTextbox value: {"text": ..., "files": [...]}
            texts, _ = _texts_and_files(content.get("text"))
            return texts, _file_paths(content.get("files") or [])
        if content.get("type") == "component":  # e.g. an image component shown in the chat
            content = content.get("value") or {}
        file = content.get("file", content)
        path = file.get("path") if isinstance(file, dict) else file
        return [], ([str(path)] if path else [])
    path = getattr(content, "path", None) or getattr(content, "name", None)  # FileData-like objects
    return [], ([str(path)] if path else [])


def _file_paths(files) -> list[str]:
    """Paths of a MultimodalTextbox `files` value: path strings, FileData dicts or FileData-like objects."""
    paths = []
    for file in files if isinstance(files, (list, tuple)) else [files]:
        if isinstance(file, (str, Path)):
            paths.append(str(file))
        else:
            paths += _texts_and_files(file)[1]
    return paths


def history_to_messages(message, history: list) -> tuple[list[dict], str | None]:
    """Gradio's history (messages format) + the new MultimodalTextbox value -> (model messages, image path).

    Consecutive user entries (Gradio stores a file and its text as separate entries) merge into one turn; the
    latest image starts the conversation afresh and goes into its first user turn. Messages end with the new
    user turn, or with an assistant turn when the new message holds an image only.
    """
    if isinstance(message, dict):
        current = {"role": "user", "content": {"text": message.get("text", ""), "files": _file_paths(message.get("files") or [])}}
    else:
        current = {"role": "user", "content": message}
    turns: list[list] = []  # [role, [texts]]
    image_path = None
    for entry in [*history, current]:
        role = entry.get("role") if isinstance(entry, dict) else None
        if role not in ("user", "assistant"):
            continue
        texts, files = _texts_and_files(entry.get("content"))
        if role == "user" and files:
            image_path, turns = files[-1], []
        if not texts:
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1] += texts
        elif turns or role == "user":  # a conversation starts with the user
            turns.append([role, list(texts)])
    messages = []
    for role, texts in turns:
        text = "\n".join(texts)
        messages.append(user_message(text) if role == "user" else {"role": "assistant", "content": [{"type": "text", "text": text}]})
    return messages, image_path


def make_respond(model, processor, settings: GenerationSettings | None = None) -> Callable[..., Iterator[str]]:
    """The chat function for `gr.ChatInterface(multimodal=True)`: yields the reply so far as it streams."""

    def respond(message, history):
        messages, image_path = history_to_messages(message, history)
        if not messages or messages[-1]["role"] != "user":
            yield NO_QUESTION if image_path else "Ask me something (and upload an image to talk about it)."
            return
        if image_path is not None:
            messages[0]["content"].insert(0, {"type": "image", "image": load_image(image_path)})
        reply = ""
        for piece in stream_reply(model, processor, messages, settings):
            reply += piece
            yield reply

    return respond


def build_demo(model=None, processor=None, *, model_dir=None, device="auto", settings=None, title="LLaVA"):
    """A `gr.ChatInterface` with a `gr.MultimodalTextbox`; pass `(model, processor)` or `model_dir`. Not launched."""
    try:
        import gradio as gr
    except ImportError:
        raise ImportError('The demo needs gradio: pip install "llava-plugin[demo]" (or pip install gradio).') from None
    if model is None:
        if model_dir is None:
            raise ValueError("build_demo needs (model, processor) or model_dir")
        model, processor = load_model(model_dir, device=device)
    textbox = gr.MultimodalTextbox(
        file_types=["image"], file_count="single", sources=["upload"], placeholder="Upload an image and ask about it..."
    )
    kwargs = {"type": "messages"} if "type" in inspect.signature(gr.ChatInterface).parameters else {}  # gradio 5
    return gr.ChatInterface(
        fn=make_respond(model, processor, settings or GenerationSettings(max_new_tokens=512)),
        multimodal=True,
        textbox=textbox,
        title=title,
        description=f"{model_dir or type(model).__name__}: one image per conversation; a new image starts a new one.",
        **kwargs,
    )


def main(argv=None):
    from evaluation.generation import add_generation_arguments, add_model_arguments, settings_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_generation_arguments(parser, max_new_tokens=512)
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    args = parser.parse_args(argv)
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    demo = build_demo(model, processor, model_dir=args.model, settings=settings_from_args(args))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
