"""llava-hf interop: our model and transformers' LlavaForConditionalGeneration agree exactly, both ways.

Checkpoints in the llava-hf layouts are fabricated with transformers' own classes (LlavaConfig, CLIPVisionConfig,
LlamaConfig, LlavaForConditionalGeneration, LlavaProcessor), saved with save_pretrained, then renamed on disk into
the other layouts llava-hf repositories exist in.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, user
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaForConditionalGeneration,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)
from transformers import LlavaConfig as HFLlavaConfig
from transformers import LlavaProcessor as HFLlavaProcessor

import modeling_llava  # noqa: F401  (registers the Auto classes)
from modeling_llava import LlavaConfig, LlavaForCausalLM
from modeling_llava.builders import build_tiny_llava, processor_for
from modeling_llava.convert_llava_hf import ConversionError, export_llava_hf, import_llava_hf, main, read_state_dict
from processing.tokenization import train_tokenizer


GREEDY = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}

# The shape of llava-hf's llava-1.5 template: no system prompt, no '</s>' after answers, no generation markers.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def square_image():
    image = Image.new("RGB", (40, 40), (250, 250, 250))
    image.paste((200, 30, 40), (5, 5, 25, 30))
    return image


def save_ours(folder, **kwargs):
    model, processor = build_tiny_llava("mlp2x_gelu", **kwargs)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model.eval(), processor


def load_ours(folder):
    return LlavaForCausalLM.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def chat_inputs(processor, image):
    messages = [user("what color is the circle?", image)]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def make_llava_hf(folder, strategy="default", seed=0):
    """A tiny llava-hf checkpoint made and saved by transformers itself (the 5.23 on-disk layout)."""
    tokenizer = train_tokenizer(["a red circle on a white square", "USER: ASSISTANT: what color is it?"], 300)
    vision_config = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = HFLlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16 if strategy == "default" else 17, vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = HFLlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1, chat_template=LLAVA_HF_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return model, processor


def flat(config: dict, prefix="") -> dict:
    """`{"text_config": {"hidden_size": 64}}` -> `{"text_config.hidden_size": 64}`: readable diffs on failure."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key.endswith("_config"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def rename_on_disk(folder, rename):
    path = folder / "model.safetensors"
    state = load_file(path)
    save_file({rename(k): v for k, v in state.items()}, path, metadata={"format": "pt"})


def hub_layout(key):
    """transformers 5.23 writes `vision_tower.embeddings.*`; llava-hf repositories hold `vision_tower.vision_model.*`."""
    return key.replace("vision_tower.", "vision_tower.vision_model.", 1) if key.startswith("vision_tower.") else key


def current_layout(key):
    """The layout of checkpoints saved by transformers 4.52-4.57."""
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model."):]
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    if key.startswith("vision_tower."):
        return "model.vision_tower.vision_model." + key[len("vision_tower."):]
    return "model." + key


# -- ours -> llava-hf -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_exported_model_matches_ours_logits_and_greedy(tmp_path, strategy):
    ours, processor = save_ours(tmp_path / "ours", vision_feature_select_strategy=strategy)
    export_llava_hf(tmp_path / "ours", tmp_path / "hf")
    hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert type(hf_processor).__module__.startswith("transformers.models.llava")

    inputs = chat_inputs(processor, square_image())
    hf_inputs = chat_inputs(hf_processor, square_image())
    # transformers' processor writes the same prompt: same ids (patch_size arithmetic = image_seq_length), same pixels.
    assert torch.equal(inputs["input_ids"], hf_inputs["input_ids"])
    assert (inputs["input_ids"] == ours.config.image_token_id).sum() == (16 if strategy == "default" else 17)
    torch.testing.assert_close(inputs["pixel_values"], hf_inputs["pixel_values"], rtol=0, atol=0)

    with torch.no_grad():
        ours_logits = ours(**inputs).logits
        hf_logits = hf(**inputs).logits
    torch.testing.assert_close(ours_logits, hf_logits, rtol=0, atol=1e-5)
    assert ours_logits.abs().max() > 1e-3  # not trivially zero

    with torch.no_grad():
        ours_tokens = ours.generate(**inputs, **GREEDY)
        hf_tokens = hf.generate(**inputs, **GREEDY)
    assert torch.equal(ours_tokens, hf_tokens)


def test_vision_feature_norm_folds_into_the_exported_projector(tmp_path):
    model, processor = build_tiny_llava("mlp2x_gelu", vision_feature_norm=True)
    projector = model.model.multi_modal_projector
    with torch.no_grad():  # statistics far from the identity, as fitted ones are
        projector.feature_mean.copy_(torch.linspace(-2, 3, projector.feature_mean.numel()))
        projector.feature_std.copy_(torch.linspace(0.2, 4, projector.feature_std.numel()))
    model.save_pretrained(tmp_path / "ours")
    processor.save_pretrained(tmp_path / "ours")
    ours = load_ours(tmp_path / "ours")[0]
    export_llava_hf(tmp_path / "ours", tmp_path / "hf")
    hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = chat_inputs(processor, square_image())
    with torch.no_grad():
        ours_logits, hf_logits = ours(**inputs).logits, hf.eval()(**inputs).logits
        unnormalized = ours.model.multi_modal_projector.linear_1(ours.model.get_vision_features(inputs["pixel_values"]))
        normalized = ours.model.multi_modal_projector.linear_1(
            (ours.model.get_vision_features(inputs["pixel_values"]) - projector.feature_mean) / projector.feature_std
        )
    torch.testing.assert_close(ours_logits, hf_logits, rtol=0, atol=1e-4)
    # The statistics were saved, reloaded and used: without them the projector would compute something else.
    assert torch.equal(ours.model.multi_modal_projector.feature_std, projector.feature_std)
    assert not torch.allclose(unnormalized, normalized, atol=1e-2)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_round_trip_ours_to_llava_hf_to_ours_is_lossless(tmp_path, strategy):
    ours, processor = save_ours(tmp_path / "ours", vision_feature_select_strategy=strategy)
    export_llava_hf(tmp_path / "ours", tmp_path / "hf")
    import_llava_hf(tmp_path / "hf", tmp_path / "back")
    back, back_processor = load_ours(tmp_path / "back")

    before, after = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key

    bookkeeping = {"transformers_version", "architectures", "auto_map", "_name_or_path"}
    # The config files, as read back (from_pretrained of a model fills in the sub-configs' dtype on top).
    saved, returned = LlavaConfig.from_pretrained(tmp_path / "ours"), LlavaConfig.from_pretrained(tmp_path / "back")
    config_before = {k: v for k, v in flat(saved.to_dict()).items() if k.split(".")[-1] not in bookkeeping}
    config_after = {k: v for k, v in flat(returned.to_dict()).items() if k.split(".")[-1] not in bookkeeping}
    assert config_after == config_before

    assert back_processor.chat_template == processor.chat_template
    assert back_processor.image_seq_length == processor.image_seq_length
    assert back_processor.image_aspect_ratio == processor.image_aspect_ratio == "pad"
    assert back_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert back_processor.image_processor.to_dict() == processor.image_processor.to_dict()
    assert back.generation_config.to_diff_dict() == ours.generation_config.to_diff_dict()

    image = Image.new("RGB", (48, 30), (10, 200, 30))  # not square: padding and crop both at work
    a, b = chat_inputs(processor, image), chat_inputs(back_processor, image)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


@pytest.mark.parametrize("layout", ["hub", "current"])
def test_export_layouts_on_disk_and_loaded_by_transformers(tmp_path, layout):
    ours, _ = save_ours(tmp_path / "ours")
    report = export_llava_hf(tmp_path / "ours", tmp_path / "hf", layout=layout)
    on_disk = load_file(tmp_path / "hf" / "model.safetensors")
    prefixes = {
        "hub": ("language_model.model.", "language_model.lm_head.", "multi_modal_projector.", "vision_tower.vision_model."),
        "current": ("model.language_model.", "lm_head.", "model.multi_modal_projector.", "model.vision_tower.vision_model."),
    }[layout]
    assert all(key.startswith(prefixes) for key in on_disk)
    assert {p: any(k.startswith(p) for k in on_disk) for p in prefixes} == dict.fromkeys(prefixes, True)
    # The report names every tensor: our key -> the key on disk.
    assert sorted(t.target for t in report.tensors) == sorted(on_disk)
    assert sorted(t.source for t in report.tensors) == sorted(ours.state_dict())

    hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, tensor in ours.state_dict().items():
        assert torch.equal(hf.state_dict()[key], tensor), key
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["image_seq_length"] == ours.config.image_seq_length and "auto_map" not in config


def test_exported_processor_pads_to_square_like_original_llava(tmp_path):
    _, processor = save_ours(tmp_path / "ours")
    export_llava_hf(tmp_path / "ours", tmp_path / "hf")
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    image = Image.new("RGB", (48, 24), (200, 40, 40))
    exported = hf_processor.image_processor(image, return_tensors="pt")["pixel_values"]

    # Original LLaVA: expand2square with int(mean * 255), image centred, then CLIP's resize and crop.
    fill = tuple(int(x * 255) for x in processor.image_processor.image_mean)
    square = Image.new("RGB", (48, 48), fill)
    square.paste(image, (0, 12))
    assert torch.equal(exported, processor.image_processor(square, return_tensors="pt")["pixel_values"])

    ours = processor.image_processor(processor.pad_to_square(image), return_tensors="pt")["pixel_values"]
    assert processor.pad_to_square(image).getpixel((0, 0)) == fill
    assert torch.equal(ours, exported)


def test_siglip_tower_exports_as_full_strategy_and_matches(tmp_path):
    """llava-hf's `default` drops the first token of any tower; SigLIP has no CLS, so our `default` is its `full`."""
    model, processor = build_tiny_llava("mlp2x_gelu")
    vision_config = SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    config = LlavaConfig(vision_config=vision_config, text_config=model.config.text_config, projector_type="mlp2x_gelu",
                         image_token_id=model.config.image_token_id)
    torch.manual_seed(0)
    model = LlavaForCausalLM(config).eval()
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    processor = processor_for(model, processor.tokenizer, image_processor, image_aspect_ratio="pad")
    model.save_pretrained(tmp_path / "ours")
    processor.save_pretrained(tmp_path / "ours")

    report = export_llava_hf(tmp_path / "ours", tmp_path / "hf")
    assert any("cannot be expressed with SiglipImageProcessorPil" in note for note in report.notes)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["vision_feature_select_strategy"] == "full"
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert any(k.startswith("vision_tower.vision_model.") for k in load_file(tmp_path / "hf" / "model.safetensors"))

    inputs = chat_inputs(processor, square_image())
    assert torch.equal(inputs["input_ids"], chat_inputs(hf_processor, square_image())["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, hf(**inputs).logits, rtol=0, atol=1e-5)
        assert torch.equal(model.generate(**inputs, **GREEDY), hf.generate(**inputs, **GREEDY))

    import_llava_hf(tmp_path / "hf", tmp_path / "back")
    back = LlavaConfig.from_pretrained(tmp_path / "back")
    assert back.vision_feature_select_strategy == "default" and back.image_seq_length == 16


def test_tied_embeddings_round_trip_and_a_stored_head_copy(tmp_path):
    model, processor = build_tiny_llava("mlp2x_gelu")
    config = LlavaConfig.from_dict({**model.config.to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(0)
    model = LlavaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "ours")
    processor.save_pretrained(tmp_path / "ours")
    export_llava_hf(tmp_path / "ours", tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert hf.config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    assert torch.equal(hf.lm_head.weight, model.lm_head.weight)

    # Some llava-hf checkpoints store the tied head anyway: an equal copy is dropped, a different one refused.
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(path)
    embed = state["language_model.model.embed_tokens.weight"]
    save_file({**state, "language_model.lm_head.weight": embed.clone()}, path, metadata={"format": "pt"})
    report = import_llava_hf(tmp_path / "hf", tmp_path / "back")
    assert report.ignored == [("language_model.lm_head.weight", "tied to the input embeddings (tie_word_embeddings)")]
    back = LlavaForCausalLM.from_pretrained(tmp_path / "back")
    assert back.config.tie_word_embeddings and torch.equal(back.lm_head.weight, model.lm_head.weight)
    save_file({**state, "language_model.lm_head.weight": embed + 1}, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="language_model.lm_head.weight differs from the input embeddings"):
        import_llava_hf(tmp_path / "hf", tmp_path / "back2")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"projector_type": "linear"}, "projector_type='linear'"),
        ({"projector_type": "mlp3x_gelu"}, "projector_type='mlp3x_gelu'"),
        ({"image_token_pooling": 2}, "image_token_pooling=2"),
    ],
)
def test_export_refuses_what_llava_hf_cannot_express(tmp_path, kwargs, message):
    model, processor = build_tiny_llava(**kwargs)
    model.save_pretrained(tmp_path / "ours")
    processor.save_pretrained(tmp_path / "ours")
    with pytest.raises(ConversionError, match=message):
        export_llava_hf(tmp_path / "ours", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# -- llava-hf -> ours -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, strategy",
    [("transformers", "default"), ("hub", "full"), ("current", "default"), ("current", "full")],
)
def test_imported_llava_hf_matches_transformers(tmp_path, layout, strategy):
    hf, hf_processor = make_llava_hf(tmp_path / "hf", strategy)
    if layout == "hub":
        rename_on_disk(tmp_path / "hf", hub_layout)
    elif layout == "current":
        rename_on_disk(tmp_path / "hf", current_layout)
    report = import_llava_hf(tmp_path / "hf", tmp_path / "ours")
    ours, processor = load_ours(tmp_path / "ours")

    assert len(report.tensors) == len(hf.state_dict())
    for key, tensor in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[key], tensor), key
    assert ours.config.vision_feature_select_strategy == strategy
    assert ours.config.image_seq_length == (16 if strategy == "default" else 17)
    assert processor.chat_template == LLAVA_HF_TEMPLATE
    assert processor.image_aspect_ratio == "crop"  # the source's CLIPImageProcessor does not pad
    assert any("{% generation %}" in note for note in report.notes)

    image = Image.new("RGB", (50, 36), (10, 20, 200))
    inputs, hf_inputs = chat_inputs(processor, image), chat_inputs(hf_processor, image)
    assert torch.equal(inputs["input_ids"], hf_inputs["input_ids"])
    assert torch.equal(inputs["pixel_values"], hf_inputs["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, hf(**inputs).logits, rtol=0, atol=1e-5)
        assert torch.equal(ours.generate(**inputs, **GREEDY), hf.generate(**inputs, **GREEDY))


def test_import_names_unknown_and_missing_keys_and_writes_nothing(tmp_path):
    make_llava_hf(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(path)
    state["multi_modal_projector.linear_3.weight"] = torch.zeros(2, 2)
    del state["language_model.model.norm.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError) as error:
        import_llava_hf(tmp_path / "hf", tmp_path / "ours")
    message = str(error.value)
    assert "unknown keys (1): multi_modal_projector.linear_3.weight" in message
    assert "missing keys (1)" in message and "model.language_model.norm.weight" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no DST, no temporary folder


def test_import_names_shape_mismatch(tmp_path):
    make_llava_hf(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(path)
    state["multi_modal_projector.linear_1.bias"] = torch.zeros(63)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"multi_modal_projector.linear_1.bias -> "
                       r"model.multi_modal_projector.linear_1.bias: \[63\], expected \[64\]"):
        import_llava_hf(tmp_path / "hf", tmp_path / "ours")


def test_failure_while_writing_leaves_no_half_folder(tmp_path, monkeypatch):
    make_llava_hf(tmp_path / "hf")
    from processing.processing_llava import LlavaProcessor

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(LlavaProcessor, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        import_llava_hf(tmp_path / "hf", tmp_path / "ours")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_cli_prints_every_tensor_and_refuses_to_overwrite(tmp_path, capsys):
    ours, _ = save_ours(tmp_path / "ours")
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if " -> " in line and line.startswith("  ")]
    assert sorted(line[0] for line in lines) == sorted(ours.state_dict())
    assert "do NOT pad to square" in out  # the warning about llava-hf processors and padding

    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    args = ["--overwrite", "--layout", "current", "--dtype", "bfloat16", "--max-shard-size", "100KB"]
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "hf"), *args]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    state = read_state_dict(tmp_path / "hf")
    assert "model.language_model.norm.weight" in state and {v.dtype for v in state.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf.lm_head.weight, ours.lm_head.weight.to(torch.bfloat16))
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0  # reads the shards back
    back = LlavaForCausalLM.from_pretrained(tmp_path / "back")
    assert back.dtype == torch.bfloat16 and torch.equal(back.lm_head.weight, hf.lm_head.weight)


# -- a process that never saw this repository ------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys
    REPO = sys.argv[2]
    assert not any(p and REPO in p for p in sys.path), sys.path
    for name in ("modeling_llava", "processing", "training", "hub_cards", "evaluation", "examples"):
        sys.modules[name] = None  # importing any package of this repository now fails

    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = sys.argv[1]
    model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(sys.argv[3])},
                                             {"type": "text", "text": "what color is the circle?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    print("REPORT" + json.dumps({
        "info": {k: sorted(map(str, v)) for k, v in info.items()},
        "model": type(model).__module__ + "." + type(model).__name__,
        "processor": type(processor).__module__ + "." + type(processor).__name__,
        "input_ids": inputs["input_ids"].tolist(),
        "logits": logits.tolist(),
        "tokens": tokens.tolist(),
    }))
    """
)


def test_exported_folder_loads_with_plain_transformers_without_this_repo(tmp_path):
    ours, processor = save_ours(tmp_path / "ours")
    export_llava_hf(tmp_path / "ours", tmp_path / "hf")
    image_path = tmp_path / "square.png"
    square_image().save(image_path)
    (tmp_path / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "child.py"), str(tmp_path / "hf"), str(REPO), str(image_path)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT", 1)[1])

    assert report["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert report["model"] == "transformers.models.llava.modeling_llava.LlavaForConditionalGeneration"
    assert report["processor"] == "transformers.models.llava.processing_llava.LlavaProcessor"
    inputs = chat_inputs(processor, Image.open(image_path))
    assert report["input_ids"] == inputs["input_ids"].tolist()
    with torch.no_grad():
        logits = ours(**inputs).logits
        tokens = ours.generate(**inputs, **GREEDY)
    torch.testing.assert_close(torch.tensor(report["logits"]), logits, rtol=0, atol=1e-5)
    assert report["tokens"] == tokens.tolist()
