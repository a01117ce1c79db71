"""LLaVA JSON reader/writer: TRL-ready rows, lossless round trip, first-turn rule, validation."""

import copy
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import datasets  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from processing.llava_json import LlavaDataError, SkipReport, load_llava_json, write_llava_json  # noqa: E402


def turn(speaker, value):
    return {"from": speaker, "value": value}


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name, color in (("a.png", "red"), ("b.jpg", "blue"), ("sub/c.png", "green")):
        Image.new("RGB", (8, 6), color).save(folder / name)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return folder


# Records as users have them: Instruct-150K style, CC3M chat.json (<image> after the text),
# mix665k text-only (no `image`), an int id, extra fields, key order, unusual whitespace.
RECORDS = [
    {"id": "000000033471", "image": "a.png", "conversations": [
        turn("human", "<image>\nWhat color is the square?"), turn("gpt", "It is red."),
        turn("human", "Is it large?"), turn("gpt", "No, it is small.")]},
    {"id": "GCC_train_002582585", "image": "b.jpg", "conversations": [
        turn("human", "Give a brief description of the image.\n<image>"), turn("gpt", "a blue background")]},
    {"id": "sharegpt_42", "conversations": [turn("human", "What is 2 + 2?"), turn("gpt", "4")], "model": ""},
    {"id": 17, "image": "sub/c.png", "conversations": [turn("human", "<image>What is this?"), turn("gpt", "Green.")]},
    {"image": "a.png", "id": "reordered", "conversations": [turn("human", "Q first\n\n<image>"), turn("gpt", "A")], "source": "x"},
]


def write(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_rows_are_trl_messages_with_lazy_images(tmp_path, images):
    ds = load_llava_json(write(tmp_path / "data.json", RECORDS), images)
    assert ds.column_names[:3] == ["id", "messages", "images"]
    assert ds.features["images"] == datasets.List(datasets.Image())
    assert ds["id"] == ["000000033471", "GCC_train_002582585", "sharegpt_42", "17", "reordered"]

    first = ds[0]["messages"]
    assert first[0] == {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What color is the square?"}]}
    assert first[1] == {"role": "assistant", "content": [{"type": "text", "text": "It is red."}]}
    assert first[2]["content"] == [{"type": "text", "text": "Is it large?"}]
    # <image> after the text stays after it; the adjacent newline is stripped.
    assert ds[1]["messages"][0]["content"] == [{"type": "text", "text": "Give a brief description of the image."}, {"type": "image", "text": None}]
    # Text-only mix665k record: kept, with no images.
    assert ds[2]["images"] == [] and ds[2]["image_file"] is None
    for row in ds:
        for message in row["messages"]:
            assert all(set(part) == {"type", "text"} for part in message["content"])

    # Lazily decoded: the column stores the file path, decoding happens on access.
    raw = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
    assert raw[0]["images"][0]["bytes"] is None
    assert raw[0]["images"][0]["path"] == str((images / "a.png").resolve())
    decoded = ds[0]["images"][0]
    assert decoded.size == (8, 6) and decoded.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_rows_feed_trl_prepare_multimodal_messages(tmp_path, images):
    from trl.data_utils import prepare_multimodal_messages

    ds = load_llava_json(write(tmp_path / "data.json", RECORDS), images)
    for row in ds:
        filled = prepare_multimodal_messages(row["messages"], row["images"])
        image_parts = [p for m in filled for p in m["content"] if p["type"] == "image"]
        assert len(image_parts) == len(row["images"])
        assert all(p["image"] is not None for p in image_parts)


def test_rows_go_through_trl_vision_collator(tmp_path, images, tiny_llava):
    """The dataset feeds TRL's SFTTrainer collator as is, text-only records mixed in."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    _, processor = tiny_llava
    ds = load_llava_json(write(tmp_path / "data.json", RECORDS), images)
    # An `image` column would be taken by TRL as a single image and replace `images`.
    assert "image" not in ds.column_names
    batch = DataCollatorForVisionLanguageModeling(processor)([dict(row) for row in ds])
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    per_row = (batch["input_ids"] == image_token).sum(dim=1).tolist()
    assert per_row[2] == 0 and per_row[0] == per_row[1] == per_row[3] == per_row[4] > 0  # row 2 is text-only
    assert batch["pixel_values"].shape[0] == 4
    # The image-after-text record keeps its order through the chat template.
    text = processor.tokenizer.decode(batch["input_ids"][1])
    assert text.index("Give a brief description of the image.") < text.index(processor.image_token)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_round_trip_is_lossless(tmp_path, images, suffix):
    source = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    else:
        write(source, RECORDS)
    ds = load_llava_json(source, images)
    out = tmp_path / f"back{suffix}"
    assert write_llava_json(ds, out) == len(RECORDS)
    text = out.read_text(encoding="utf-8")
    back = [json.loads(line) for line in text.splitlines()] if suffix == ".jsonl" else json.loads(text)
    assert back == RECORDS
    assert [list(r) for r in back] == [list(r) for r in RECORDS]  # key order too
    # Row dicts work as input as well, and the result reads back to the same dataset.
    write_llava_json(list(ds), tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == RECORDS


def test_random_first_turn_placement_is_seeded(tmp_path, images):
    records = [
        {"id": str(i), "image": "a.png", "conversations": [turn("human", f"<image>\nQuestion {i}?"), turn("gpt", "A.")]}
        for i in range(40)
    ]
    path = write(tmp_path / "data.json", records)

    def order(ds):
        return [tuple(p["type"] for p in m[0]["content"]) for m in ds["messages"]]

    as_is = order(load_llava_json(path, images))
    assert set(as_is) == {("image", "text")}
    seeded = order(load_llava_json(path, images, image_placement="random", seed=3))
    assert set(seeded) == {("image", "text"), ("text", "image")}
    assert 8 <= seeded.count(("text", "image")) <= 32
    assert seeded == order(load_llava_json(path, images, image_placement="random", seed=3))
    assert seeded != order(load_llava_json(path, images, image_placement="random", seed=4))
    # The question text itself is untouched.
    ds = load_llava_json(path, images, image_placement="random", seed=3)
    texts = [next(p["text"] for p in m[0]["content"] if p["type"] == "text") for m in ds["messages"]]
    assert texts == [f"Question {i}?" for i in range(40)]


GOOD = {"id": "r1", "image": "a.png", "conversations": [turn("human", "<image>\nQ?"), turn("gpt", "A.")]}


def mutated(**changes):
    record = copy.deepcopy(GOOD)
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    return record


# (record, reason, field named in the message, text in the message)
BAD_RECORDS = {
    "missing image file": (mutated(image="nope.png"), "missing_image", "image", "not found"),
    "corrupt image": (mutated(image="corrupt.jpg"), "unreadable_image", "image", "cannot read image"),
    "path escapes folder": (mutated(image="../secret.png"), "unsafe_image_path", "image", "escapes the image folder"),
    "nested escape": (mutated(image="sub/../../x.png"), "unsafe_image_path", "image", "escapes the image folder"),
    "absolute path": (mutated(image="/etc/passwd"), "unsafe_image_path", "image", "absolute path"),
    "no <image> with image": (mutated(conversations=[turn("human", "Q?"), turn("gpt", "A.")]), "image_placeholder_count", "conversations", "found 0"),
    "two <image>": (mutated(conversations=[turn("human", "<image>\nQ?"), turn("gpt", "A."), turn("human", "<image>\nAnd?"), turn("gpt", "B.")]), "image_placeholder_count", "conversations", "found 2"),
    "two <image> in one turn": (mutated(conversations=[turn("human", "<image><image>\nQ?"), turn("gpt", "A.")]), "image_placeholder_count", "conversations", "found 2"),
    "<image> without image": (mutated(image=None), "placeholder_without_image", "conversations[0].value", "without 'image'"),
    "gpt first": (mutated(conversations=[turn("gpt", "A."), turn("human", "<image>\nQ?")]), "bad_role", "conversations[0].from", "expected 'human'"),
    "human twice": (mutated(conversations=[turn("human", "<image>\nQ?"), turn("human", "Q2?")]), "bad_role", "conversations[1].from", "expected 'gpt'"),
    "unknown role": (mutated(conversations=[turn("human", "<image>\nQ?"), turn("assistant", "A.")]), "bad_role", "conversations[1].from", "'assistant'"),
    "unanswered last turn": (mutated(conversations=[turn("human", "<image>\nQ?"), turn("gpt", "A."), turn("human", "More?")]), "bad_role", "conversations[2].from", "no gpt answer"),
    "empty value": (mutated(conversations=[turn("human", "<image>\nQ?"), turn("gpt", "   ")]), "empty_value", "conversations[1].value", "empty text"),
    "missing conversations": (mutated(conversations=None), "missing_field", "conversations", "non-empty list"),
}


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_bad_record_error_names_file_record_and_field(tmp_path, images, name):
    record, reason, field, text = BAD_RECORDS[name]
    path = write(tmp_path / "bad.json", [GOOD | {"id": "fine"}, record])
    with pytest.raises(LlavaDataError) as info:
        load_llava_json(path, images)
    error = info.value
    assert (error.reason, error.field, error.record_id) == (reason, field, "r1")
    message = str(error)
    assert str(path) in message and "'r1'" in message and f"field '{field}'" in message and text in message


def test_invalid_json_file_names_line(tmp_path, images):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a", "image": "a.png",\n   "conversations": [}\n]', encoding="utf-8")
    with pytest.raises(LlavaDataError, match=r"broken\.json: file, field 'line 3': invalid JSON at line 3") as info:
        load_llava_json(path, images)
    assert info.value.reason == "invalid_json"
    with pytest.raises(LlavaDataError, match="expected a JSON list"):
        load_llava_json(write(tmp_path / "obj.json", {"id": "x"}), images)


def test_broken_jsonl_line_names_line(tmp_path, images):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"id": "r2", "image": "a.png", "conv\n' + json.dumps(GOOD | {"id": "r3"}) + "\n")
    with pytest.raises(LlavaDataError, match=r"data\.jsonl: file, field 'line 2': broken JSONL line 2"):
        load_llava_json(path, images)
    ds, report = load_llava_json(path, images, policy="skip", return_report=True)
    assert ds["id"] == ["r1", "r3"] and report.skipped == {"invalid_json": 1} and report.total == 3


def test_skip_policy_counts_every_reason_and_prints_summary(tmp_path, images, capsys):
    records = [GOOD | {"id": "good-0"}]
    for i, (record, _, _, _) in enumerate(BAD_RECORDS.values()):
        records.append(record | {"id": f"bad-{i}"} if isinstance(record, dict) else record)
    records += [GOOD | {"id": "good-1"}, "not an object"]
    path = write(tmp_path / "mixed.json", records)
    ds, report = load_llava_json(path, images, policy="skip", return_report=True)
    assert isinstance(report, SkipReport)
    assert ds["id"] == ["good-0", "good-1"]
    expected = {}
    for _, reason, _, _ in BAD_RECORDS.values():
        expected[reason] = expected.get(reason, 0) + 1
    expected["not_an_object"] = 1
    assert dict(report.skipped) == expected
    # Nothing silently dropped: every record is either kept or counted.
    assert report.total == len(records) == report.kept + report.num_skipped
    out = capsys.readouterr().out
    assert f"kept 2 of {len(records)} records, skipped {len(records) - 2}" in out
    assert "missing_image: 1" in out and "unsafe_image_path: 3" in out and "bad_role: 4" in out
    # The default policy raises on the very same file.
    with pytest.raises(LlavaDataError):
        load_llava_json(path, images)


def test_image_folder_defaults_to_json_folder_and_symlinks_inside_are_fine(tmp_path, images):
    write(images / "data.json", [GOOD])
    assert load_llava_json(images / "data.json")["image_file"] == ["a.png"]
    (images / "linked").symlink_to(images / "sub")
    ds = load_llava_json(write(tmp_path / "d.json", [mutated(image="linked/c.png")]), images)
    assert ds[0]["images"][0].size == (8, 6)


def test_check_images_can_be_turned_off(tmp_path, images):
    path = write(tmp_path / "d.json", [mutated(image="corrupt.jpg")])
    with pytest.raises(LlavaDataError, match="unreadable_image"):
        load_llava_json(path, images)
    assert len(load_llava_json(path, images, check_images=False)) == 1
