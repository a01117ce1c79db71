"""The processor: chat templates, image-token expansion, pad/crop, truncation guard, TRL's assistant-only labels."""

import copy

import pytest
import torch
from conftest import assistant, user
from PIL import Image
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from modeling_llava.builders import build_tiny_llava
from processing import ImageTokensTruncatedError, get_chat_template
from processing.chat_templates import VICUNA_V1_SYSTEM


def test_vicuna_v1_renders_the_original_format(tiny_llava):
    _, processor = tiny_llava
    conversation = [
        user("What is shown?", True),
        assistant("A red circle."),
        user("Where is it?"),
        assistant("In the middle."),
    ]
    text = processor.apply_chat_template(conversation)
    assert text == (
        f"<s>{VICUNA_V1_SYSTEM} USER: <image>\nWhat is shown? ASSISTANT: A red circle.</s>"
        "USER: Where is it? ASSISTANT: In the middle.</s>"
    )
    prompt = processor.apply_chat_template(conversation[:1], add_generation_prompt=True)
    assert prompt == f"<s>{VICUNA_V1_SYSTEM} USER: <image>\nWhat is shown? ASSISTANT:"


def test_image_after_the_question_and_system_override(tiny_llava):
    _, processor = tiny_llava
    conversation = [{"role": "system", "content": "Be brief."}, user("What is shown?", True, image_first=False)]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "<s>Be brief. USER: What is shown?\n<image> ASSISTANT:"
    )


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1", "llava_v0"])
def test_system_prompt_replaces_the_default_or_drops_it(tiny_llava, name):
    processor = copy.copy(tiny_llava[1])  # the session's processor keeps its template
    conversation = [user("What is shown?", True), assistant("A red circle.")]
    rendered = {}
    for system_prompt in (None, "", "Say it's short."):
        processor.chat_template = get_chat_template(name, system_prompt)
        rendered[system_prompt] = processor.apply_chat_template(conversation)
    # The default is the template itself; the others differ from it in the system prompt only, as in original
    # LLaVA, where an empty `conv.system` still leaves the separator that follows it.
    assert get_chat_template(name, None) == get_chat_template(name)
    default_system = rendered[None].removeprefix("<s>")[: -len(rendered[""].removeprefix("<s>"))]
    assert default_system and rendered[None] == "<s>" + default_system + rendered[""].removeprefix("<s>")
    assert rendered["Say it's short."] == "<s>Say it's short." + rendered[""].removeprefix("<s>")
    if name == "vicuna_v1":
        assert rendered[""] == "<s> USER: <image>\nWhat is shown? ASSISTANT: A red circle.</s>"


def test_plain_has_no_system_prompt_to_replace():
    with pytest.raises(ValueError, match="'plain' has no system prompt to replace"):
        get_chat_template("plain", "")


def test_each_image_expands_to_image_seq_length_tokens(tiny_llava, red_image, blue_image):
    _, processor = tiny_llava
    out = processor(images=[red_image, blue_image], text=["<image> one", "two <image>"], padding=True)
    image_id = processor.image_token_id
    assert [row.count(image_id) for row in out["input_ids"]] == [16, 16]
    assert len(out["pixel_values"]) == 2


def _collate(processor, examples, **kwargs):
    collator = DataCollatorForVisionLanguageModeling(processor=processor, assistant_only_loss=True, **kwargs)
    return collator([{"messages": e["messages"], "images": e["images"]} for e in examples])


def _runs(labels):
    """Contiguous runs of kept (not -100) label ids."""
    runs, current = [], []
    for token in labels.tolist():
        if token == -100:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token)
    return runs + ([current] if current else [])


def test_labels_keep_exactly_the_answers_and_their_eos(tiny_llava, red_image, blue_image):
    _, processor = tiny_llava
    two_turns = {
        "messages": [
            user("what color is the circle?", True),
            assistant("the circle is red."),
            user("how many shapes?"),
            assistant("one shape."),
        ],
        "images": [red_image],
    }
    short = {"messages": [user("hi", True), assistant("yes.")], "images": [blue_image]}
    batch = _collate(processor, [two_turns, short])
    input_ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert batch["pixel_values"].shape[0] == 2
    tokenizer = processor.tokenizer

    # Token by token: every kept label equals its input token; image tokens, padding and prompts are masked.
    kept = labels != -100
    assert torch.equal(labels[kept], input_ids[kept])
    assert not kept[input_ids == processor.image_token_id].any()
    assert not kept[attention == 0].any() and (attention[1] == 0).any()

    answers = [tokenizer.decode(run) for run in _runs(labels[0])]
    assert answers == [" the circle is red.</s>", " one shape.</s>"]
    assert [tokenizer.decode(run) for run in _runs(labels[1])] == [" yes.</s>"]
    # Everything else of the first sample (system, USER turns, ASSISTANT: headers) is masked.
    masked_text = tokenizer.decode(input_ids[0][~kept[0] & (input_ids[0] != processor.image_token_id)])
    assert masked_text == (
        f"<s>{VICUNA_V1_SYSTEM} USER: \nwhat color is the circle? ASSISTANT:USER: how many shapes? ASSISTANT:"
    )
    # The eos of each answer is trained: the model learns to stop.
    eos_positions = (input_ids[0] == tokenizer.eos_token_id).nonzero().flatten()
    assert len(eos_positions) == 2 and kept[0, eos_positions].all()


def test_plain_template_trains_on_the_caption_only(red_image):
    _, processor = build_tiny_llava("linear", chat_template="plain")
    example = {
        "messages": [user("Describe the image briefly.", True), assistant("a red square")],
        "images": [red_image],
    }
    assert processor.apply_chat_template(example["messages"]) == "<s><image>a red square\n"
    batch = _collate(processor, [example])
    assert [processor.tokenizer.decode(r) for r in _runs(batch["labels"][0])] == ["a red square\n"]


def test_pad_fills_with_the_image_mean_and_crop_cuts(red_image):
    _, pad = build_tiny_llava("linear", image_aspect_ratio="pad", image_size=32)
    _, crop = build_tiny_llava("linear", image_aspect_ratio="crop", image_size=32)
    square = pad.pad_to_square(red_image)  # 40 x 30 -> 40 x 40, image in the middle
    assert square.size == (40, 40)
    assert square.getpixel((20, 0)) == (122, 116, 104)  # CLIP mean x 255, truncated: the original pads with this
    assert square.getpixel((20, 20)) == (220, 30, 30)

    padded = pad.image_processor(square, return_tensors="pt")["pixel_values"][0]
    via_processor = pad(images=[red_image], text=["<image>"], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(via_processor, padded)
    assert via_processor[:, 0, 16].abs().max() < 0.02  # the mean colour normalises to ~0
    cropped = crop(images=[red_image], text=["<image>"], return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(cropped[:, 0, 16], cropped[:, 16, 16])  # all red: no padding band


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_unusual_image_modes_are_converted(tiny_llava, mode):
    _, processor = tiny_llava
    image = Image.new("RGB", (30, 20), (10, 200, 30)).convert(mode) if mode != "I;16" else Image.new(mode, (30, 20))
    out = processor(images=[image], text=["<image>"], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 32, 32)


def test_truncation_into_image_tokens_is_an_error_not_a_crash(tiny_llava, red_image):
    _, processor = tiny_llava
    prompt = "<s> USER: <image>\nwhat is it? ASSISTANT:"
    with pytest.raises(ImageTokensTruncatedError, match=r"Sample 0 .* needs \d+ tokens \(1 image\(s\) x 16"):
        processor(images=[red_image], text=[prompt], truncation=True, max_length=10)
    # Truncating text after the image tokens is fine.
    out = processor(images=[red_image], text=[prompt], truncation=True, max_length=22)
    assert out["input_ids"][0].count(processor.image_token_id) == 16


def test_collator_with_short_max_length_names_the_problem(tiny_llava, red_image):
    _, processor = tiny_llava
    example = {"messages": [user("what?", True), assistant("red.")], "images": [red_image]}
    with pytest.raises(ImageTokensTruncatedError, match="max_length"):
        _collate(processor, [example], max_length=12)


def test_unknown_template_and_aspect_ratio_are_named():
    with pytest.raises(ValueError, match="Unknown chat template 'llava_v9'"):
        get_chat_template("llava_v9")
    with pytest.raises(ValueError, match="Unknown image_aspect_ratio 'stretch'"):
        build_tiny_llava("linear", image_aspect_ratio="stretch")


def test_a_typed_image_token_is_text_when_control_tokens_are_sanitized(tiny_llava, red_image):
    """A user who types `<image>` must not create a placeholder (and must not break the token-count check)."""
    _, processor = tiny_llava
    conversation = [user("what is <image> here?", red_image)]
    out = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, sanitize_control_tokens=True
    )
    assert out["input_ids"][0].count(processor.image_token_id) == processor.image_seq_length
