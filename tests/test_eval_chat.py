"""Everyday use: the chat command end to end, streaming, the Gradio chat function, batch inference over a folder."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from PIL import Image

sys.path.insert(0, str(REPO / "examples"))

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint written by examples/make_tiny_checkpoint.py, and the model + processor loaded from it."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    make_tiny_checkpoint.main([str(folder), "--seed", "3"])  # seed 3: replies depend on text, history and image
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    return folder, model, processor


def greedy_reply(model, processor, messages, max_new_tokens=MAX_NEW_TOKENS):
    """The oracle: plain `model.generate`, greedy, decoded without special tokens."""
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def user(text, image=None):
    content = [{"type": "text", "text": text}]
    return {"role": "user", "content": ([{"type": "image", "image": image}] if image is not None else []) + content}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_chat_command_streams_what_generate_produces(checkpoint, tmp_path):
    folder, model, processor = checkpoint
    red = Image.new("RGB", (40, 30), (220, 30, 30))
    blue = Image.new("RGB", (32, 48), (20, 40, 220))
    red.save(tmp_path / "red.png")
    blue.save(tmp_path / "blue.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    stdin = (
        "What color is the shape?\n"
        "And how many shapes are there?\n"
        f"/image {tmp_path / 'corrupt.png'}\n"  # refused: the conversation goes on unchanged
        f"/image {tmp_path / 'blue.png'}\n"  # a new image starts a new conversation
        "Describe the image briefly.\n"
    )  # then end of input
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TOKENIZERS_PARALLELISM="false", PYTHONIOENCODING="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "evaluation.chat", "--model", str(folder), "--image", str(tmp_path / "red.png"),
         "--device", "cpu", "--max-new-tokens", str(MAX_NEW_TOKENS)],
        input=stdin.encode(), capture_output=True, cwd=REPO, env=env, timeout=300,
    )
    stdout, stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8", "replace")  # bytes: no newline translation
    assert result.returncode == 0, stderr[-3000:]

    first = greedy_reply(model, processor, [user("What color is the shape?", red)])
    history = [user("What color is the shape?", red), assistant(first.strip()), user("And how many shapes are there?")]
    second = greedy_reply(model, processor, history)
    third = greedy_reply(model, processor, [user("Describe the image briefly.", blue)])
    # The oracle replies depend on what the command must get right: history, and the image of the conversation.
    assert second != greedy_reply(model, processor, [user("And how many shapes are there?", red)])
    assert third != greedy_reply(model, processor, [user("Describe the image briefly.", red)])
    assert stdout == f"ASSISTANT: {first}\nASSISTANT: {second}\nASSISTANT: {third}\n"
    assert "cannot read image" in stderr and "corrupt.png" in stderr
    assert "new conversation" in stderr


def test_chat_command_rejects_a_missing_image_before_loading(tmp_path, capsys):
    from evaluation import chat

    with pytest.raises(SystemExit) as exit_info:
        chat.main(["--model", str(tmp_path / "no-model"), "--image", str(tmp_path / "nope.jpg")])
    assert exit_info.value.code == 2
    assert f"image file not found: {tmp_path / 'nope.jpg'}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        chat.main(["--model", str(tmp_path / "no-model")])
    assert exit_info.value.code == 2
    assert "Model folder not found" in capsys.readouterr().err


def test_chat_session_streams_pieces_and_keeps_history(checkpoint, red_image):
    from evaluation.chat import ChatSession
    from evaluation.generation import GenerationSettings

    _, model, processor = checkpoint
    session = ChatSession(model, processor, GenerationSettings(max_new_tokens=MAX_NEW_TOKENS), image=red_image)
    pieces = list(session.stream("What is <image> this?"))  # a typed placeholder is dropped, not expanded
    expected = greedy_reply(model, processor, [user("What is  this?", red_image)])
    assert "".join(pieces) == expected
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[0]["content"][0]["type"] == "image" and session.messages[1]["content"][0]["text"] == expected.strip()
    list(session.stream("And then?"))
    assert len(session.messages) == 4 and all(p["type"] == "text" for p in session.messages[2]["content"])  # image once
    session.reset()
    assert session.messages == [] and session.image is not None


# ---------------------------------------------------------------------------------------------------
# Gradio app (gradio is an optional extra)
# ---------------------------------------------------------------------------------------------------


def test_gradio_app_imports_without_gradio(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if gradio were not installed
    import gradio_app

    gradio_app = importlib.reload(gradio_app)
    with pytest.raises(ImportError, match=r"pip install .*demo"):
        gradio_app.build_demo(model_dir="unused")


def test_gradio_history_to_messages_across_formats(tmp_path):
    from gradio_app import history_to_messages

    red, blue = str(tmp_path / "red.png"), str(tmp_path / "blue.png")
    gradio6 = [  # Chatbot.preprocess: typed parts, the file and the text in one user message
        {"role": "user", "content": [{"type": "file", "file": {"path": red, "mime_type": "image/png"}}, {"type": "text", "text": "color?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    ]
    gradio5 = [  # older: the file and the text as separate user entries
        {"role": "user", "content": {"path": red}},
        {"role": "user", "content": "color?"},
        {"role": "assistant", "content": "Red."},
    ]
    for history in (gradio6, gradio5):
        messages, image = history_to_messages({"text": "and the shape?", "files": []}, history)
        assert image == red
        assert [(m["role"], [p["text"] for p in m["content"]]) for m in messages] == [
            ("user", ["color?"]), ("assistant", ["Red."]), ("user", ["and the shape?"])
        ]
    # A new image starts a new conversation about it.
    messages, image = history_to_messages({"text": "what is it?", "files": [blue]}, gradio6)
    assert image == blue and len(messages) == 1 and messages[0]["content"][0]["text"] == "what is it?"
    # An image without a question: the messages end with no user turn.
    messages, image = history_to_messages({"text": "", "files": [{"path": blue}]}, [])
    assert image == blue and messages == []


def test_gradio_respond_streams_the_reply(checkpoint, tmp_path):
    from evaluation.generation import GenerationSettings
    from gradio_app import NO_QUESTION, make_respond

    _, model, processor = checkpoint
    red = Image.new("RGB", (40, 30), (220, 30, 30))
    red.save(tmp_path / "red.png")
    respond = make_respond(model, processor, GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    first = list(respond({"text": "color?", "files": [str(tmp_path / "red.png")]}, []))
    assert first[-1] == greedy_reply(model, processor, [user("color?", red)])
    assert all(first[-1].startswith(partial) for partial in first)  # each yield is the reply so far
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": str(tmp_path / "red.png")}}, {"type": "text", "text": "color?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": first[-1]}]},
    ]
    second = list(respond({"text": "why?", "files": []}, history))
    assert second[-1] == greedy_reply(model, processor, [user("color?", red), assistant(first[-1].strip()), user("why?")])
    assert second[-1] != greedy_reply(model, processor, [user("why?", red)])  # so the history did reach the model
    assert list(respond({"text": "", "files": [str(tmp_path / "red.png")]}, [])) == [NO_QUESTION]


def test_gradio_demo_builds_when_gradio_is_installed(checkpoint):
    gr = pytest.importorskip("gradio")
    from gradio_app import build_demo

    _, model, processor = checkpoint
    demo = build_demo(model, processor)
    assert isinstance(demo, gr.ChatInterface) and isinstance(demo.textbox, gr.MultimodalTextbox)


# ---------------------------------------------------------------------------------------------------
# Batch inference over a folder
# ---------------------------------------------------------------------------------------------------


def test_batch_inference_is_resumable(checkpoint, tmp_path, monkeypatch, capsys):
    import batch_inference

    import evaluation.generation as generation

    folder, model, processor = checkpoint
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (30, 30), (220, 30, 30)).save(images / "a.png")
    Image.new("RGB", (30, 40), (20, 200, 30)).save(images / "sub" / "b.jpg")
    (images / "broken.png").write_bytes(b"garbage")
    (images / "notes.txt").write_text("not an image")
    batches = []
    original = generation.generate_batch

    def counting(model_, processor_, conversations, settings=None):
        batches.append(len(conversations))
        return original(model_, processor_, conversations, settings)

    monkeypatch.setattr(generation, "generate_batch", counting)
    out = tmp_path / "answers.jsonl"
    args = ["--model", str(folder), "--images", str(images), "--output", str(out), "--question", "What color is it?",
            "--max-new-tokens", "6", "--batch-size", "4", "--device", "cpu"]
    batch_inference.main(args)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in records] == ["a.png", "sub/b.jpg"] and batches == [2]
    assert "broken.png" in capsys.readouterr().err  # reported and skipped, not fatal
    red = Image.open(images / "a.png").convert("RGB")
    assert records[0]["text"] == greedy_reply(model, processor, [user("What color is it?", red)], max_new_tokens=6).strip()

    Image.new("RGB", (30, 30), (20, 30, 220)).save(images / "c.png")  # the folder grew
    batches.clear()
    batch_inference.main(args)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in records] == ["a.png", "sub/b.jpg", "c.png"] and batches == [1]
