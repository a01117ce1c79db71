"""The model trio: config validation, forward, image-token merging, generation, gradients, save/load."""

import pytest
import torch
from conftest import assistant, user
from transformers import CLIPModel, CLIPConfig, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig

from modeling_llava import LlavaConfig, LlavaForCausalLM
from modeling_llava.builders import build_tiny_llava, make_image_processor


def tiny_configs(**vision):
    vision_config = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, **vision,
    )
    text_config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2,
    )
    return vision_config, text_config


# -- config ---------------------------------------------------------------------------------------------------------


def test_image_seq_length_is_derived_from_tower_strategy_and_pooling():
    vision_config, text_config = tiny_configs()
    assert LlavaConfig(vision_config=vision_config, text_config=text_config).image_seq_length == 16
    full = LlavaConfig(vision_config=vision_config, text_config=text_config, vision_feature_select_strategy="full")
    assert full.image_seq_length == 17  # CLS kept
    pooled = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_pooling=2)
    assert pooled.image_seq_length == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"projector_type": "conv3d"}, "Unknown projector_type 'conv3d'"),
        ({"vision_feature_layer": 3}, "vision_feature_layer=3 is out of range"),
        ({"vision_feature_layer": -4}, "vision_feature_layer=-4 is out of range"),
        ({"vision_feature_select_strategy": "cls"}, "Unknown vision_feature_select_strategy 'cls'"),
        ({"image_token_pooling": 3}, "image_token_pooling=3 must be >= 1 and divide the 4x4 patch grid"),
        ({"image_seq_length": 10}, "image_seq_length=10 disagrees with the vision config"),
    ],
)
def test_bad_config_values_are_named_in_the_error(kwargs, message):
    vision_config, text_config = tiny_configs()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LlavaConfig(vision_config=vision_config, text_config=text_config, **kwargs)


def test_config_round_trips_through_json(tmp_path):
    vision_config, text_config = tiny_configs()
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, projector_type="mlp2x_gelu", image_token_id=7,
        image_token_pooling=2,
    )
    config.save_pretrained(tmp_path)
    loaded = LlavaConfig.from_pretrained(tmp_path)
    assert loaded.model_type == "llava_plugin"
    assert (loaded.projector_type, loaded.image_token_id, loaded.image_seq_length) == ("mlp2x_gelu", 7, 4)
    assert loaded.vision_config.hidden_size == 32 and loaded.text_config.hidden_size == 32


# -- forward --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector_type, n_linear", [("linear", 1), ("mlp2x_gelu", 2)])
def test_projector_types(projector_type, n_linear):
    model, _ = build_tiny_llava(projector_type)
    projector = model.model.multi_modal_projector
    linears = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == n_linear
    features = torch.randn(2, 16, model.config.vision_config.hidden_size)
    expected = linears[0](features)
    if n_linear == 2:
        expected = linears[1](torch.nn.functional.gelu(expected))
    torch.testing.assert_close(projector(features), expected)


def test_projector_layernorm_normalises_the_image_tokens():
    vision_config, text_config = tiny_configs()
    model = LlavaForCausalLM(LlavaConfig(vision_config=vision_config, text_config=text_config,
                                         projector_type="mlp2x_gelu", projector_layernorm=True))
    features = model.model.multi_modal_projector(torch.randn(2, 16, 32) * 50)
    torch.testing.assert_close(features.mean(-1), torch.zeros(2, 16), atol=1e-4, rtol=0)
    torch.testing.assert_close(features.std(-1, unbiased=False), torch.ones(2, 16), atol=1e-3, rtol=0)
    assert "model.multi_modal_projector.norm.weight" in model.state_dict()


def test_image_features_replace_exactly_the_image_tokens(tiny_llava, red_image):
    model, processor = tiny_llava
    inputs = processor.apply_chat_template(
        [[user("what color is it?", red_image)]], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    image_mask = inputs["input_ids"] == model.config.image_token_id
    assert int(image_mask.sum()) == model.config.image_seq_length == 16

    captured = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"])
        text_embeds = model.get_input_embeddings()(inputs["input_ids"])
    torch.testing.assert_close(captured["embeds"][image_mask], features.reshape(-1, features.shape[-1]))
    torch.testing.assert_close(captured["embeds"][~image_mask], text_embeds[~image_mask])


def test_features_come_from_the_second_to_last_layer_without_cls(tiny_llava, red_image):
    model, processor = tiny_llava
    pixel_values = processor.image_processor(red_image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]
        expected = model.model.multi_modal_projector(hidden[:, 1:])
        torch.testing.assert_close(model.get_image_features(pixel_values), expected)


def test_pooling_averages_the_patch_grid(red_image, blue_image):
    model, processor = build_tiny_llava("linear", image_token_pooling=2)
    pixel_values = processor.image_processor([red_image, blue_image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        patches = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        grid = patches.reshape(2, 4, 4, -1)
        pooled = grid.reshape(2, 2, 2, 2, 2, -1).mean(dim=(2, 4)).reshape(2, 4, -1)  # 2x2 blocks of the grid
        torch.testing.assert_close(model.get_image_features(pixel_values), model.model.multi_modal_projector(pooled))
    assert processor.image_seq_length == 4


def test_siglip_tower_works():
    _, text_config = tiny_configs()
    vision_config = SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=5)
    assert config.image_seq_length == 16  # no CLS token to drop
    model = LlavaForCausalLM(config).eval()
    input_ids = torch.tensor([[1] + [5] * 16 + [9, 10]])
    out = model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 32, 32))
    assert out.logits.shape == (1, 19, 100)
    assert out.image_hidden_states.shape == (1, 16, 32)


def test_image_token_count_mismatch_says_both_counts(tiny_llava):
    model, _ = tiny_llava
    image_token = model.config.image_token_id
    input_ids = torch.tensor([[1] + [image_token] * 10 + [9, 10]])  # 10 image tokens, one image needs 16
    with pytest.raises(ValueError, match=r"input_ids hold 10 image tokens .* but 1 image\(s\) give 16 features"):
        model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 32, 32))


def test_text_only_inputs_work(tiny_llava):
    model, processor = tiny_llava
    inputs = processor.apply_chat_template(
        [[user("hello there")]], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert "pixel_values" not in inputs
    with torch.no_grad():
        logits = model(**inputs).logits
        reference = model.lm_head(model.model.language_model(input_ids=inputs["input_ids"]).last_hidden_state)
    torch.testing.assert_close(logits, reference)


def test_frozen_tower_gets_no_gradient(tiny_llava, red_image):
    model, processor = tiny_llava
    model.train()
    batch = processor.apply_chat_template(
        [[user("what color?", red_image), assistant("red.")]], tokenize=True, return_dict=True, return_tensors="pt"
    )
    model.zero_grad()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    model.eval()
    assert all(p.grad is None and not p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.grad is not None for p in model.model.multi_modal_projector.parameters())
    assert model.get_input_embeddings().weight.grad is not None
    model.zero_grad(set_to_none=True)


# -- generation -----------------------------------------------------------------------------------------------------


def _prompt(processor, conversations, **kwargs):
    return processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True, **kwargs},
    )


def test_generate_with_kv_cache_equals_without(tiny_llava, red_image):
    model, processor = tiny_llava
    inputs = _prompt(processor, [[user("what color is the circle?", red_image)]])
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=12, do_sample=False, use_cache=True, min_new_tokens=12)
        uncached = model.generate(**inputs, max_new_tokens=12, do_sample=False, use_cache=False, min_new_tokens=12)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 12
    assert torch.equal(cached, uncached)


def test_left_padded_batch_generates_like_each_prompt_alone(tiny_llava, red_image, blue_image):
    model, processor = tiny_llava
    conversations = [
        [user("what color is the circle?", red_image)],
        [user("how many shapes are in the image? describe every one of them", blue_image)],
    ]
    processor.tokenizer.padding_side = "left"
    try:
        batch = _prompt(processor, conversations)
        assert (batch["attention_mask"] == 0).any()  # the prompts really differ in length
        with torch.no_grad():
            batched = model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            for row, conversation in enumerate(conversations):
                alone = _prompt(processor, [conversation])
                single = model.generate(**alone, max_new_tokens=8, min_new_tokens=8, do_sample=False)
                assert batched[row, -8:].tolist() == single[0, -8:].tolist()
    finally:
        processor.tokenizer.padding_side = "right"


def test_multi_turn_chat_through_the_template(tiny_llava, red_image):
    model, processor = tiny_llava
    history = [user("what color is the circle?", red_image)]
    for question in ("and its size?", "anything else?"):
        inputs = _prompt(processor, [history])
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        history += [assistant(answer), user(question)]
    text = processor.apply_chat_template([history], add_generation_prompt=True)[0]
    assert text.count("USER: ") == 3 and text.count("ASSISTANT:") == 3 and text.count("</s>") == 2
    assert text.count("<image>") == 1 and text.endswith("USER: anything else? ASSISTANT:")


# -- save / load ----------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, tiny_llava, red_image):
    model, processor = tiny_llava
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    for code_file in ("configuration_llava.py", "modeling_llava.py", "processing_llava.py"):
        assert (tmp_path / code_file).exists(), code_file

    from transformers import AutoModelForCausalLM, AutoProcessor

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LlavaForCausalLM
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    inputs = _prompt(processor, [[user("what color?", red_image)]])
    inputs_loaded = _prompt(loaded_processor, [[user("what color?", red_image)]])
    assert torch.equal(inputs["input_ids"], inputs_loaded["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, loaded(**inputs_loaded).logits, rtol=0, atol=0)


def test_from_pretrained_parts_keeps_pretrained_weights(tmp_path):
    """Stage 1's real starting point, with local stand-ins for CLIP ViT-L/14 and Vicuna."""
    clip = CLIPModel(
        CLIPConfig(
            vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2),
            text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2),
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    make_image_processor(32).save_pretrained(tmp_path / "clip")
    # A Vicuna-like tokenizer: no <image>, no pad token.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["a red circle", "a blue square"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert "<image>" not in bare.get_vocab() and bare.pad_token is None
    vocab_before = len(bare)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_before, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    lm.save_pretrained(tmp_path / "lm")
    bare.save_pretrained(tmp_path / "lm")

    from modeling_llava.builders import load_pretrained_parts

    model, processor = load_pretrained_parts(str(tmp_path / "clip"), str(tmp_path / "lm"), projector_type="mlp2x_gelu")
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id != tok.unk_token_id
    assert tok.pad_token is not None
    assert model.get_input_embeddings().weight.shape[0] == len(tok) >= vocab_before + 1
    tower_weights = model.model.vision_tower.state_dict()
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(tower_weights[name], tensor), name
    torch.testing.assert_close(model.get_input_embeddings().weight[:vocab_before], lm.get_input_embeddings().weight)
    torch.testing.assert_close(model.lm_head.weight[:vocab_before], lm.lm_head.weight)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert not any(p.is_meta for p in model.parameters())
    from PIL import Image

    batch = processor.apply_chat_template(
        [[user("a red circle", Image.new("RGB", (32, 32))), assistant("yes")]], tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)
