"""Bad-input matrix over the real entry points.

Entry points: `training.sft.prepare_dataset` (which reads through `processing.llava_json.load_llava_json`), `training/
sft.py`'s `main`, the generation pipeline (`processing.generate.generate_from_annotations`), the chat command
(`evaluation.chat.main`) and both converters. Every case ends in one of:

- an error naming the file, the record and the field (policy `error`), or a counted skip (policy `skip`) with the
  good records kept;
- for image modes that are merely unusual (grayscale, RGBA, CMYK, palette, 16-bit): converted, not failed;
- for whatever the entry point had already written (a previous generation output, a converted folder, a chat
  conversation, a training output folder): left intact.

The per-reason record checks of `load_llava_json` itself live in tests/test_data_llava_json.py (BAD_RECORDS); this
module reuses its record shapes through the training entry point and adds the byte-level cases.
"""

import io
import json
import random
import shutil
import struct
import sys
import zlib

import pytest
import torch
from conftest import REPO
from PIL import Image

from processing.llava_json import LlavaDataError, load_llava_json
from training import sft

sys.path.insert(0, str(REPO / "examples"))

GOOD_IMAGE = "good.png"


def turn(speaker, value):
    return {"from": speaker, "value": value}


def record(rid, image=GOOD_IMAGE, conversations=None):
    rec = {"id": rid, "conversations": conversations or [turn("human", "<image>\nWhat is it?"), turn("gpt", "A red square.")]}
    if image is not None:
        rec["image"] = image
    return rec


def png_claiming(width, height):
    """A tiny PNG whose header claims `width` x `height` pixels: what a decompression bomb looks like to PIL."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def encoded(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    red = Image.new("RGB", (24, 16), (220, 30, 30))
    red.save(folder / GOOD_IMAGE)
    # Noise compresses badly, so cutting the file in half really loses pixel data.
    noise = Image.frombytes("RGB", (48, 32), bytes(random.Random(0).randrange(256) for _ in range(48 * 32 * 3)))
    jpeg, png = encoded(noise, "JPEG"), encoded(noise, "PNG")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg at all" * 4)
    (folder / "zero.png").write_bytes(b"")
    (folder / "bomb.png").write_bytes(png_claiming(100_000, 100_000))  # 10^10 pixels, > 2 x Image.MAX_IMAGE_PIXELS
    Image.new("L", (24, 16), 90).save(folder / "gray.png")
    Image.new("RGBA", (24, 16), (10, 200, 30, 0)).save(folder / "rgba.png")
    Image.new("CMYK", (24, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    red.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(folder / "palette.png")
    Image.new("I;16", (24, 16), 3000).save(folder / "gray16.png")
    (folder.parent / "outside.png").write_bytes(png)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Records through the training entry point: error names file/record/field; skip counts it and keeps the rest
# ---------------------------------------------------------------------------------------------------------------------

# case -> (bad record, reason, field, text in the message)
BAD = {
    "corrupt JPEG bytes": (record("bad", "truncated.jpg"), "unreadable_image", "image", "truncated.jpg"),
    "corrupt PNG bytes": (record("bad", "truncated.png"), "unreadable_image", "image", "truncated.png"),
    "garbage with a JPEG magic": (record("bad", "garbage.jpg"), "unreadable_image", "image", "garbage.jpg"),
    "zero-byte file": (record("bad", "zero.png"), "unreadable_image", "image", "zero.png"),
    "decompression bomb": (record("bad", "bomb.png"), "unreadable_image", "image", "decompression bomb"),
    "missing image file": (record("bad", "nope.png"), "missing_image", "image", "not found"),
    "path traversal": (record("bad", "../outside.png"), "unsafe_image_path", "image", "escapes the image folder"),
    "absolute path": (record("bad", "/etc/hostname"), "unsafe_image_path", "image", "absolute path"),
    "<image> zero times": (record("bad", conversations=[turn("human", "What?"), turn("gpt", "A.")]),
                           "image_placeholder_count", "conversations", "found 0"),
    "<image> twice": (record("bad", conversations=[turn("human", "<image>\nWhat?"), turn("gpt", "A."),
                                                   turn("human", "<image>\nAgain?"), turn("gpt", "B.")]),
                      "image_placeholder_count", "conversations", "found 2"),
    "non-alternating roles": (record("bad", conversations=[turn("human", "<image>\nQ?"), turn("human", "Q2?")]),
                              "bad_role", "conversations[1].from", "expected 'gpt'"),
    "empty turn": (record("bad", conversations=[turn("human", "<image>\nQ?"), turn("gpt", "")]),
                   "empty_value", "conversations[1].value", "empty text"),
}


def data_args(path, image_dir, policy="error", **kwargs):
    return sft.DataArguments(data_path=str(path), image_folder=str(image_dir), data_policy=policy, **kwargs)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_record_through_prepare_dataset(case, tmp_path, image_dir, tiny_llava, capsys):
    _, processor = tiny_llava
    bad, reason, field, text = BAD[case]
    path = tmp_path / "train.json"
    path.write_text(json.dumps([record("before"), bad, record("after")]))

    with pytest.raises(LlavaDataError) as info:
        sft.prepare_dataset(path, data_args(path, image_dir), processor, 512, 0)
    error = info.value
    assert (error.file, error.record_id, error.field, error.reason) == (str(path), "bad", field, reason)
    message = str(error)
    assert str(path) in message and "'bad'" in message and f"field '{field}'" in message and text in message

    dataset = sft.prepare_dataset(path, data_args(path, image_dir, "skip"), processor, 512, 0)
    assert dataset["id"] == ["before", "after"]
    assert f"kept 2 of 3 records, skipped 1\n  {reason}: 1" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "cmyk.jpg", "palette.png", "gray16.png"])
def test_unusual_image_modes_are_converted_not_failed(name, tmp_path, image_dir, tiny_llava):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    _, processor = tiny_llava
    path = tmp_path / "train.json"
    path.write_text(json.dumps([record("odd", name)]))
    dataset = sft.prepare_dataset(path, data_args(path, image_dir), processor, 512, 0)
    batch = DataCollatorForVisionLanguageModeling(processor)([dict(row) for row in dataset])
    # The pixels are those of the image converted to RGB first: converted, not zeroed or garbled.
    rgb = Image.open(image_dir / name).convert("RGB")
    expected = processor.image_processor(processor.pad_to_square(rgb), return_tensors="pt")["pixel_values"]
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    torch.testing.assert_close(batch["pixel_values"], expected)


# ---------------------------------------------------------------------------------------------------------------------
# Whole-file problems
# ---------------------------------------------------------------------------------------------------------------------

GOOD_LINE = json.dumps(record("r1")).encode()


@pytest.mark.parametrize(
    "case, suffix, content, line, reason",
    [
        ("invalid UTF-8 in a JSON file", ".json", b'[\n' + GOOD_LINE + b',\n{"id": "r2\xff\xfe"}\n]', "line 3", "invalid_utf8"),
        ("truncated JSON", ".json", b"[\n" + GOOD_LINE + b",\n" + GOOD_LINE[:40], "line 3", "invalid_json"),
    ],
)
def test_broken_json_file_is_an_error_naming_file_and_line(case, suffix, content, line, reason, tmp_path, image_dir, tiny_llava):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(content)
    for policy in ("error", "skip"):  # the file as a whole is unreadable: no policy can skip past it
        with pytest.raises(LlavaDataError) as info:
            sft.prepare_dataset(path, data_args(path, image_dir, policy), tiny_llava[1], 512, 0)
        assert (info.value.file, info.value.field, info.value.reason) == (str(path), line, reason)
        assert str(path) in str(info.value) and line in str(info.value)


@pytest.mark.parametrize(
    "case, broken, reason",
    [("JSONL with one broken line", b'{"id": "r2", "image": "good.png", "conv', "invalid_json"),
     ("JSONL with one invalid UTF-8 line", b'{"id": "r2\xff", "image": "good.png"}', "invalid_utf8")],
)
def test_jsonl_with_one_bad_line_names_it_or_skips_it(case, broken, reason, tmp_path, image_dir):
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD_LINE + b"\n" + broken + b"\n" + json.dumps(record("r3")).encode() + b"\n")
    with pytest.raises(LlavaDataError) as info:
        load_llava_json(path, image_dir)
    assert (info.value.field, info.value.reason) == ("line 2", reason) and str(path) in str(info.value)
    dataset, report = load_llava_json(path, image_dir, policy="skip", return_report=True)
    assert dataset["id"] == ["r1", "r3"] and report.skipped == {reason: 1} and report.total == 3


# ---------------------------------------------------------------------------------------------------------------------
# Sequences longer than max_length: text truncated, image tokens never cut
# ---------------------------------------------------------------------------------------------------------------------


def test_overlong_text_is_truncated_but_image_tokens_are_never_cut(tmp_path, image_dir, tiny_llava, capsys):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    _, processor = tiny_llava
    long_answer = " ".join(["red square"] * 80)
    image_first = record("image-first", conversations=[turn("human", "<image>\nDescribe it."), turn("gpt", long_answer)])
    image_last = record("image-last", conversations=[turn("human", long_answer + "\n<image>"), turn("gpt", "Red.")])
    path = tmp_path / "train.json"
    path.write_text(json.dumps([image_first, image_last]))
    max_length = 64

    with pytest.raises(ValueError, match=r"train\.json: record 'image-last' \(field 'conversations'\) needs \d+ tokens"):
        sft.prepare_dataset(path, data_args(path, image_dir), processor, max_length, 0)
    dataset = sft.prepare_dataset(path, data_args(path, image_dir, overlong_policy="skip"), processor, max_length, 0)
    assert dataset["id"] == ["image-first"] and dataset["length"] == [max_length]
    assert "skipped 1 record(s) whose image tokens would not fit max_length=64" in capsys.readouterr().out

    batch = DataCollatorForVisionLanguageModeling(processor, max_length=max_length)([dict(row) for row in dataset])
    ids = batch["input_ids"][0]
    assert ids.shape[0] == max_length  # the text was cut...
    assert int((ids == processor.image_token_id).sum()) == processor.image_seq_length  # ...the image tokens were not
    full = DataCollatorForVisionLanguageModeling(processor)([dict(row) for row in dataset])["input_ids"][0]
    assert len(full) > max_length and ids.tolist() == full[:max_length].tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint folders: a missing shard, an unknown projector type
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory, tiny_llava):
    model, processor = tiny_llava
    folder = tmp_path_factory.mktemp("ckpt") / "sharded"
    model.save_pretrained(folder, max_shard_size="200KB")
    processor.save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


def broken_checkpoint(sharded_checkpoint, tmp_path, case):
    folder = tmp_path / f"ckpt-{case}"
    shutil.copytree(sharded_checkpoint, folder)
    if case == "missing shard":
        shard = sorted(folder.glob("model-*.safetensors"))[1]
        shard.unlink()
        return folder, [shard.name]
    config = json.loads((folder / "config.json").read_text())
    config["projector_type"] = "resampler"
    (folder / "config.json").write_text(json.dumps(config))
    return folder, ["projector_type", "'resampler'"]


CHECKPOINT_CASES = ["missing shard", "unknown projector type"]


def tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoint_through_sft_main(case, sharded_checkpoint, tmp_path, image_dir):
    folder, names = broken_checkpoint(sharded_checkpoint, tmp_path, case)
    data = tmp_path / "train.json"
    data.write_text(json.dumps([record("r1")]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("from an earlier run")
    argv = ["--stage", "stage2", "--model_name_or_path", str(folder), "--data_path", str(data), "--image_folder",
            str(image_dir), "--output_dir", str(out), "--max_steps", "1", "--report_to", "none", "--save_strategy", "no"]
    with pytest.raises((OSError, ValueError)) as info:
        sft.main(argv)
    message = str(info.value)
    assert str(folder) in message and all(name in message for name in names), message
    assert tree(out) == {out.joinpath("notes.txt").relative_to(out): b"from an earlier run"}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoint_through_chat(case, sharded_checkpoint, tmp_path, monkeypatch, capsys):
    from evaluation import chat

    folder, names = broken_checkpoint(sharded_checkpoint, tmp_path, case)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello?\n"))
    with pytest.raises(SystemExit) as info:
        chat.main(["--model", str(folder), "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot load model {folder}" in err and all(name in err for name in names), err


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoint_through_llava_hf_export(case, sharded_checkpoint, tmp_path, capsys):
    from modeling_llava.convert_llava_hf import main

    folder, names = broken_checkpoint(sharded_checkpoint, tmp_path, case)
    dst = tmp_path / "exported"
    assert main(["export", str(sharded_checkpoint), str(dst), "--max-shard-size", "200KB"]) == 0
    before = tree(dst)
    # Overwriting an earlier good export with a broken source fails and leaves the earlier export as it was.
    assert main(["export", str(folder), str(dst), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert str(folder) in err and all(name in err for name in names), err
    assert tree(dst) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".exported")] == []  # no temporary left over

    if case == "missing shard":  # and the other direction: a llava-hf folder with a missing shard
        from modeling_llava.convert_llava_hf import import_llava_hf, ConversionError

        shard = sorted(dst.glob("model-*.safetensors"))[0]
        shard.unlink()
        with pytest.raises(ConversionError, match=shard.name):
            import_llava_hf(dst, tmp_path / "imported")
        assert not (tmp_path / "imported").exists()


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_original_checkpoint_through_original_converter(case, tmp_path, capsys):
    """Original LLaVA (LlavaLlamaForCausalLM) folders: both faults are reported before any tower is loaded."""
    from modeling_llava.convert_original_llava import main

    src = tmp_path / "llava-v1.5"
    src.mkdir()
    config = {"architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": "openai/clip-vit-large-patch14-336",
              "mm_vision_select_layer": -2, "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad"}
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    if case == "missing shard":
        from safetensors.torch import save_file

        save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, src / "model-00001-of-00002.safetensors")
        expected = "model-00002-of-00002.safetensors"
    else:
        config["mm_projector_type"] = "resampler"
        expected = "field 'mm_projector_type'"
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main([str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert expected in err and str(src) in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The chat command: bad images refused by name, the conversation so far kept
# ---------------------------------------------------------------------------------------------------------------------

CHAT_IMAGE_CASES = {
    "corrupt JPEG bytes": ("truncated.jpg", "cannot read image"),
    "corrupt PNG bytes": ("truncated.png", "cannot read image"),
    "zero-byte file": ("zero.png", "cannot read image"),
    "decompression bomb": ("bomb.png", "decompression bomb"),
    "missing image file": ("nope.png", "image file not found"),
}


@pytest.mark.parametrize("case", list(CHAT_IMAGE_CASES))
def test_bad_image_through_chat(case, sharded_checkpoint, image_dir, monkeypatch, capsys):
    from evaluation import chat

    name, text = CHAT_IMAGE_CASES[case]
    bad = image_dir / name
    # At start-up: refused before the model is loaded, exit status 2, the file named.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello?\n"))
    with pytest.raises(SystemExit) as info:
        chat.main(["--model", str(sharded_checkpoint), "--image", str(bad), "--device", "cpu"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and str(bad) in err and text in err, err

    # Mid-conversation (`/image`): refused, and the conversation goes on with the earlier image and history.
    script = f"What is it?\n/image {bad}\nAnd now?\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    args = ["--model", str(sharded_checkpoint), "--image", str(image_dir / "cmyk.jpg"), "--device", "cpu",
            "--max-new-tokens", "4"]
    assert chat.main(args) == 0
    captured = capsys.readouterr()
    assert str(bad) in captured.err and "keeping the current image and conversation" in captured.err
    assert captured.out.count("ASSISTANT: ") == 2  # both questions answered: the CMYK start image was converted


# ---------------------------------------------------------------------------------------------------------------------
# The generation pipeline: bad annotation files named, the output of earlier runs intact
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, corrupt, expected",
    [
        ("invalid UTF-8", lambda data: data.replace(b'"file_name": "', b'"file_name": "\xff', 1), "not valid UTF-8 at line"),
        ("truncated JSON", lambda data: data[: len(data) // 2], "invalid JSON at line"),
    ],
)
def test_bad_annotations_through_generation(case, corrupt, expected, tmp_path):
    from processing.generate import generate_from_annotations
    from processing.synthetic import make_scene_world
    from processing.teachers import SymbolicTeacher

    world = make_scene_world(tmp_path / "world", 3, "train", seed=0)
    output = tmp_path / "out.jsonl"
    stats = generate_from_annotations(world.annotations_dir, "train", SymbolicTeacher(), output, types=["detail"], progress=False)
    assert stats.written == 3
    before = output.read_bytes()
    world.captions_path.write_bytes(corrupt(world.captions_path.read_bytes()))
    with pytest.raises(ValueError) as info:
        generate_from_annotations(world.annotations_dir, "train", SymbolicTeacher(), output, types=["detail"], progress=False)
    assert str(world.captions_path) in str(info.value) and expected in str(info.value)
    assert output.read_bytes() == before  # the samples generated before are untouched
