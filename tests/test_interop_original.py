"""Original LLaVA (haotian-liu/LLaVA) checkpoints: import, exact parity with the original forward, stage-1 projectors.

The original layout is fabricated by hand (flat Llama config + `mm_*` fields, `model.mm_projector.*` weights, a
tokenizer without `<image>`, the CLIP tower in its own folder). `OriginalLlava` below re-implements, for the test, what
the original code computed: `tokenizer_image_token` with the -200 placeholder, `Conversation.get_prompt()`,
`expand2square`, `CLIPVisionTower` feature selection and the splice of image features into the embeddings.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import REPO, assistant, user
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import modeling_llava  # noqa: F401  (registers the Auto classes)
from modeling_llava import LlavaForCausalLM
from modeling_llava.builders import build_tiny_llava
from modeling_llava.convert_llava_hf import ConversionError, load_weight_file
from modeling_llava.convert_original_llava import convert_original_llava, main
from processing.chat_templates import get_chat_template


IMAGE_TOKEN_INDEX = -200  # the original's placeholder id
GREEDY = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: what color is the circle? ASSISTANT: the circle is red. Human: Assistant: ###",
]
LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
    rms_norm_eps=1e-5, max_position_embeddings=256, hidden_act="silu", rope_theta=10000.0, rope_scaling=None,
    tie_word_embeddings=False, initializer_range=0.02, pretraining_tp=1, use_cache=True,
)


# -- the original code, re-implemented for the test ------------------------------------------------------------------

SYSTEMS = {
    "user": "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "human": "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
}
CONVERSATIONS = {  # llava/conversation.py: conv_vicuna_v1, conv_llava_v1, conv_llava_v0
    "vicuna_v1": dict(system=SYSTEMS["user"], roles=("USER", "ASSISTANT"), style="TWO", sep=" ", sep2="</s>"),
    "llava_v1": dict(system=SYSTEMS["human"], roles=("USER", "ASSISTANT"), style="TWO", sep=" ", sep2="</s>"),
    "llava_v0": dict(system=SYSTEMS["human"], roles=("Human", "Assistant"), style="SINGLE", sep="###", sep2=None),
}


def original_prompt(version, turns):
    """`Conversation.get_prompt()` for `turns` = [(role index, message or None)]."""
    conv = CONVERSATIONS[version]
    if conv["style"] == "SINGLE":
        prompt = conv["system"] + conv["sep"]
        for role, message in turns:
            prompt += conv["roles"][role] + (": " + message + conv["sep"] if message else ":")
        return prompt
    seps = [conv["sep"], conv["sep2"]]
    prompt = conv["system"] + seps[0]
    for i, (role, message) in enumerate(turns):
        prompt += conv["roles"][role] + (": " + message + seps[i % 2] if message else ":")
    return prompt


def tokenizer_image_token(prompt, tokenizer):
    """llava/mm_utils.py: each chunk around `<image>` tokenized alone (with BOS), joined by -200."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    input_ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    separated = [x for chunk in zip(chunks, [[IMAGE_TOKEN_INDEX] * (offset + 1)] * len(chunks)) for x in chunk][:-1]
    for piece in separated:
        input_ids.extend(piece[offset:])
    return input_ids


def expand2square(image, background):
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


class OriginalLlava:
    """LlavaLlamaForCausalLM's inference path: CLIPVisionTower -> mm_projector -> splice at -200 -> LlamaForCausalLM."""

    def __init__(self, folder, tower_folder, lm, projector):
        config = json.loads((folder / "config.json").read_text())
        self.select_layer, self.select_feature = config["mm_vision_select_layer"], config["mm_vision_select_feature"]
        self.image_aspect_ratio = config["image_aspect_ratio"]
        self.tower = CLIPVisionModel.from_pretrained(tower_folder).eval()  # as CLIPVisionTower.load_model did
        self.image_processor = CLIPImageProcessorPil.from_pretrained(tower_folder)
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        self.lm, self.projector = lm.eval(), projector.eval()

    def pixel_values(self, image):
        if self.image_aspect_ratio == "pad":
            image = expand2square(image, tuple(int(x * 255) for x in self.image_processor.image_mean))
        return self.image_processor(image, return_tensors="pt")["pixel_values"]

    def inputs_embeds(self, input_ids, pixel_values):
        features = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        features = self.projector(features[:, 1:] if self.select_feature == "patch" else features)[0]
        embed = self.lm.get_input_embeddings()
        pieces = [features if i == IMAGE_TOKEN_INDEX else embed(torch.tensor([i])) for i in input_ids]
        return torch.cat(pieces).unsqueeze(0)

    @torch.no_grad()
    def logits(self, input_ids, pixel_values):
        return self.lm(inputs_embeds=self.inputs_embeds(input_ids, pixel_values)).logits

    @torch.no_grad()
    def generate(self, input_ids, pixel_values):
        embeds = self.inputs_embeds(input_ids, pixel_values)
        return self.lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2]), **GREEDY)


# -- fabricated checkpoints ------------------------------------------------------------------------------------------


def llama_like_tokenizer():
    """Byte-level BPE that, like LLaMA's, prepends `<s>` when encoding; it has no `<image>` (nor a pad) token."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_tower(folder, full_clip):
    """A tiny CLIP on disk: the full model (as openai/clip-vit-large-patch14-336 is) or its vision half."""
    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
    )
    torch.manual_seed(1)
    if full_clip:
        text = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2)
        CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict())).save_pretrained(folder)
    else:
        CLIPVisionModel(vision).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def make_original(folder, tower, *, projector_type="mlp2x_gelu", select_feature="patch", weights="safetensors",
                  aspect="pad", inv_freq=False, extra=None):
    """An original LLaVA checkpoint folder; returns (state dict as written, the LM, the projector)."""
    folder.mkdir()
    tokenizer = llama_like_tokenizer()
    tokenizer.save_pretrained(folder)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.unk_token_id)
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", **LLAMA, **ids,
        "mm_vision_tower": str(tower), "mm_projector_type": projector_type, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": select_feature, "mm_hidden_size": 32, "image_aspect_ratio": aspect,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "use_mm_proj": True,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "torch_dtype": "float32",
        "transformers_version": "4.31.0", **(extra or {}),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**LLAMA, **ids))
    lm.generation_config.pad_token_id = tokenizer.unk_token_id
    projector = nn.Linear(32, 64) if projector_type == "linear" else nn.Sequential(
        nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64)
    )
    for p in projector.parameters():  # larger than the default init, so image features move the logits visibly
        nn.init.normal_(p, std=0.3)
    state = {k: v.clone() for k, v in lm.state_dict().items()}  # model.embed_tokens, model.layers.*, lm_head
    state.update({f"model.mm_projector.{k}": v.clone() for k, v in projector.state_dict().items()})
    if inv_freq:  # transformers 4.31 saved these buffers
        freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        state.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": freq.clone() for i in range(2)})
    write_weights(folder, state, weights)
    return state, lm, projector


def write_weights(folder, state, weights):
    if weights == "safetensors":
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    elif weights == "sharded":
        keys = list(state)
        shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for name, shard in shards.items():
            save_file({k: state[k] for k in shard}, folder / name, metadata={"format": "pt"})
        weight_map = {k: name for name, shard in shards.items() for k in shard}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(state, folder / "pytorch_model.bin")


def chat(processor, messages):
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def collapse_image_tokens(input_ids, image_token_id):
    """Our ids with each run of image tokens replaced by the original's single -200."""
    out = []
    for token in input_ids:
        if token == image_token_id:
            if out and out[-1] == IMAGE_TOKEN_INDEX:
                continue
            token = IMAGE_TOKEN_INDEX
        out.append(token)
    return out


def square_image():
    image = Image.new("RGB", (36, 36), (240, 240, 240))
    image.paste((30, 60, 220), (4, 8, 30, 28))
    return image


# -- full checkpoints ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, projector_type, select_feature, full_clip, inv_freq",
    [
        ("safetensors", "mlp2x_gelu", "patch", True, False),
        ("sharded", "linear", "cls_patch", False, False),
        ("bin", "mlp2x_gelu", "cls_patch", False, True),
    ],
)
def test_original_checkpoint_imports_with_exact_parity(tmp_path, weights, projector_type, select_feature, full_clip,
                                                      inv_freq):
    tower = make_tower(tmp_path / "clip", full_clip)
    state, lm, projector = make_original(
        tmp_path / "orig", tower, projector_type=projector_type, select_feature=select_feature, weights=weights,
        inv_freq=inv_freq,
    )
    report = convert_original_llava(tmp_path / "orig", tmp_path / "ours")
    original = OriginalLlava(tmp_path / "orig", tower, lm, projector)
    model, processor = LlavaForCausalLM.from_pretrained(tmp_path / "ours").eval(), AutoProcessor.from_pretrained(
        tmp_path / "ours"
    )

    # Every source tensor was mapped or deliberately ignored (the RoPE buffers); the tower came from --vision-tower.
    assert {t.source for t in report.tensors if "::" not in t.source} | {k for k, _ in report.ignored} == set(state)
    assert len(report.ignored) == (2 if inv_freq else 0)
    assert model.config.projector_type == projector_type
    assert model.config.vision_feature_select_strategy == {"patch": "default", "cls_patch": "full"}[select_feature]
    assert model.config.image_seq_length == (16 if select_feature == "patch" else 17)

    # The prompt: the same ids as tokenizer_image_token(conv_vicuna_v1.get_prompt()), image tokens for -200.
    messages = [user("what color is the circle?", square_image()), assistant("the circle is red."),
                user("and the square?")]
    turns = [(0, "<image>\nwhat color is the circle?"), (1, "the circle is red."), (0, "and the square?"), (1, None)]
    inputs = chat(processor, messages)
    ids = inputs["input_ids"][0].tolist()
    expected_ids = tokenizer_image_token(original_prompt("vicuna_v1", turns), original.tokenizer)
    assert collapse_image_tokens(ids, model.config.image_token_id) == expected_ids
    assert ids.count(model.config.image_token_id) == model.config.image_seq_length
    pixel_values = original.pixel_values(square_image())
    assert torch.equal(inputs["pixel_values"], pixel_values)

    # The logits over the original vocabulary are the original's; the added <image> column is zero.
    vocab = len(original.tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
    reference = original.logits(expected_ids, pixel_values)
    torch.testing.assert_close(logits[..., :vocab], reference, rtol=0, atol=1e-5)
    assert torch.count_nonzero(logits[..., vocab:]) == 0 and model.config.image_token_id == vocab

    with torch.no_grad():
        tokens = model.generate(**inputs, **GREEDY)[0, inputs["input_ids"].shape[1]:]
    assert tokens.tolist() == original.generate(expected_ids, pixel_values)[0].tolist()

    # The original could never emit <image>; the converted generation config suppresses it, even where its logit
    # would win every step.
    assert model.generation_config.suppress_tokens == [model.config.image_token_id]
    model.lm_head.bias = nn.Parameter(torch.zeros(model.config.text_config.vocab_size))
    model.lm_head.bias.data[model.config.image_token_id] = 1e4
    with torch.no_grad():
        assert model.generate(**inputs, **GREEDY)[0, inputs["input_ids"].shape[1]:].tolist() == tokens.tolist()


def test_a_non_square_image_is_padded_as_the_original_did(tmp_path):
    """Parity for padded images: gates on processing_llava's pad colour (it rounds the mean, the original truncates)."""
    tower = make_tower(tmp_path / "clip", full_clip=False)
    _, lm, projector = make_original(tmp_path / "orig", tower)
    convert_original_llava(tmp_path / "orig", tmp_path / "ours")
    processor = AutoProcessor.from_pretrained(tmp_path / "ours")
    original = OriginalLlava(tmp_path / "orig", tower, lm, projector)
    image = Image.new("RGB", (48, 24), (200, 40, 40))
    ours = processor.image_processor(processor.pad_to_square(image), return_tensors="pt")["pixel_values"]
    fill = tuple(int(x * 255) for x in original.image_processor.image_mean)
    assert processor.pad_to_square(image).getpixel((0, 0)) == fill
    assert torch.equal(ours, original.pixel_values(image))


@pytest.mark.parametrize("version", ["vicuna_v1", "llava_v1", "llava_v0"])
def test_chat_templates_render_the_original_conversations(version):
    _, processor = build_tiny_llava(chat_template=version)
    messages = [user("what is it?", True), assistant("a red circle."), user("where?", True, image_first=False),
                assistant("in the middle."), user("sure?")]
    turns = [(0, "<image>\nwhat is it?"), (1, "a red circle."), (0, "where?\n<image>"), (1, "in the middle."),
             (0, "sure?"), (1, None)]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s>" + original_prompt(version, turns)

    # The answers and what ends them are the trained tokens (TRL's assistant_only_loss reads these markers).
    tokenizer = processor.tokenizer
    out = tokenizer.apply_chat_template(
        messages[:4], chat_template=get_chat_template(version), tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    end = "###" if version == "llava_v0" else "</s>"
    assert tokenizer.decode(trained) == f" a red circle.{end} in the middle.{end}"


def test_cli_runs_as_a_module_and_reports_every_tensor(tmp_path):
    tower = make_tower(tmp_path / "clip", full_clip=False)
    state, _, _ = make_original(tmp_path / "orig", tower, aspect="square")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "modeling_llava.convert_original_llava", str(tmp_path / "orig"), str(tmp_path / "ours"),
         "--vision-tower", str(tower), "--chat-template", "llava_v1"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mapped = dict(line.split()[:3:2] for line in result.stdout.splitlines() if line.startswith("  ") and " -> " in line)
    assert {k: v for k, v in mapped.items() if "::" not in k} == {
        k: ("model.language_model." + k[len("model."):] if k.startswith("model.") and "mm_projector" not in k
            else k.replace("model.mm_projector.0.", "model.multi_modal_projector.linear_1.")
            .replace("model.mm_projector.2.", "model.multi_modal_projector.linear_2."))
        for k in state
    }
    tower_keys = CLIPVisionModel.from_pretrained(tower).state_dict()
    assert {k.split("::", 1)[1] for k in mapped if "::" in k} == set(tower_keys)
    processor = AutoProcessor.from_pretrained(tmp_path / "ours")
    assert processor.chat_template == get_chat_template("llava_v1")
    assert processor.image_aspect_ratio == "crop"  # the config's "square"


def test_tower_weights_carried_by_the_checkpoint_win_over_the_hub_tower(tmp_path):
    """Checkpoints trained with an unfrozen tower store it as model.vision_tower.vision_tower.vision_model.*."""
    tower = make_tower(tmp_path / "clip", full_clip=False)
    state, _, _ = make_original(tmp_path / "orig", tower)
    tuned = CLIPVisionModel.from_pretrained(tower)
    for p in tuned.parameters():
        p.data.add_(0.5)
    state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tuned.state_dict().items()})
    # transformers 4.31 saved this buffer as a weight.
    state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
    write_weights(tmp_path / "orig", state, "safetensors")

    report = convert_original_llava(tmp_path / "orig", tmp_path / "ours")
    model = LlavaForCausalLM.from_pretrained(tmp_path / "ours")
    for key, tensor in tuned.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[key], tensor), key
    assert not any("::" in t.source for t in report.tensors)  # nothing taken from the --vision-tower folder
    assert [k for k, _ in report.ignored] == ["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"]


# -- bad input ------------------------------------------------------------------------------------------------------


def test_unknown_and_missing_keys_are_named_and_nothing_is_written(tmp_path):
    tower = make_tower(tmp_path / "clip", full_clip=False)
    state, _, _ = make_original(tmp_path / "orig", tower)
    state["model.mm_projector.1.weight"] = torch.zeros(3)  # index 1 is the GELU: no weights there
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # not what rope_theta gives
    del state["lm_head.weight"]
    write_weights(tmp_path / "orig", state, "safetensors")
    with pytest.raises(ConversionError, match="stored RoPE frequencies differ"):
        convert_original_llava(tmp_path / "orig", tmp_path / "ours")
    del state["model.layers.0.self_attn.rotary_emb.inv_freq"]
    write_weights(tmp_path / "orig", state, "safetensors")
    with pytest.raises(ConversionError) as error:
        convert_original_llava(tmp_path / "orig", tmp_path / "ours")
    assert "unknown keys (1): model.mm_projector.1.weight" in str(error.value)
    assert "missing keys (1), nothing in the source fills them: lm_head.weight" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "orig"]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"mm_hidden_size": 48}, "mm_hidden_size=48 but the tower"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end=true"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature='cls'"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio='anyres'"),
    ],
)
def test_config_values_it_cannot_honour_are_named(tmp_path, extra, message):
    tower = make_tower(tmp_path / "clip", full_clip=False)
    make_original(tmp_path / "orig", tower, extra=extra)
    with pytest.raises(ConversionError, match=message):
        convert_original_llava(tmp_path / "orig", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


class _Payload:
    """Pickles as a call to Path.touch: whoever unpickles it without weights_only creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_bin_files_are_read_with_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model.norm.weight": torch.ones(4), "payload": _Payload(marker)}, path)
    with pytest.raises(ConversionError, match=r"pytorch_model.bin: refused to load.*weights_only=True"):
        load_weight_file(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: a plain torch.load runs it
    assert marker.exists()

    torch.save({"model.norm.weight": torch.ones(4)}, path)
    assert torch.equal(load_weight_file(path)["model.norm.weight"], torch.ones(4))


# -- stage-1 projector onto one of our checkpoints -------------------------------------------------------------------


def test_stage1_projector_with_its_config_is_attached_to_a_base(tmp_path):
    base_model, base_processor = build_tiny_llava("linear")
    base_model.save_pretrained(tmp_path / "base")
    base_processor.save_pretrained(tmp_path / "base")
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -1,
        "mm_vision_select_feature": "cls_patch", "mm_hidden_size": 32, "hidden_size": 64, "image_aspect_ratio": "square",
    }))
    torch.manual_seed(3)
    projector = {"model.mm_projector.0.weight": torch.randn(64, 32), "model.mm_projector.0.bias": torch.randn(64),
                 "model.mm_projector.2.weight": torch.randn(64, 64), "model.mm_projector.2.bias": torch.randn(64)}
    torch.save(projector, stage1 / "mm_projector.bin")

    assert main([str(stage1 / "mm_projector.bin"), str(tmp_path / "ours"), "--base", str(tmp_path / "base")]) == 0
    model = LlavaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "ours")
    config = model.config
    assert (config.projector_type, config.vision_feature_layer, config.vision_feature_select_strategy) == (
        "mlp2x_gelu", -1, "full"
    )
    assert config.image_seq_length == processor.image_seq_length == 17
    assert processor.image_aspect_ratio == "crop"
    state = model.state_dict()
    for i, index in ((1, 0), (2, 2)):
        for kind in ("weight", "bias"):
            assert torch.equal(state[f"model.multi_modal_projector.linear_{i}.{kind}"],
                               projector[f"model.mm_projector.{index}.{kind}"])
    for key, tensor in base_model.state_dict().items():
        if "multi_modal_projector" not in key:
            assert torch.equal(state[key], tensor), key
    assert processor.chat_template == base_processor.chat_template

    inputs = chat(processor, [user("what is it?", square_image())])
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"])
        tower = base_model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-1]
        expected = nn.functional.linear(
            nn.functional.gelu(nn.functional.linear(tower, projector["model.mm_projector.0.weight"],
                                                    projector["model.mm_projector.0.bias"])),
            projector["model.mm_projector.2.weight"], projector["model.mm_projector.2.bias"],
        )
        torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_lone_projector_file_without_config_and_its_errors(tmp_path):
    base_model, base_processor = build_tiny_llava("mlp2x_gelu")
    base_model.save_pretrained(tmp_path / "base")
    base_processor.save_pretrained(tmp_path / "base")
    (tmp_path / "stage1").mkdir()
    path = tmp_path / "stage1" / "mm_projector.bin"
    weight, bias = torch.randn(64, 32), torch.randn(64)
    torch.save({"model.mm_projector.weight": weight, "model.mm_projector.bias": bias}, path)

    with pytest.raises(ConversionError, match="holds only a projector.*--base"):
        convert_original_llava(path, tmp_path / "ours")
    convert_original_llava(tmp_path / "stage1", tmp_path / "ours", base=tmp_path / "base")
    model = LlavaForCausalLM.from_pretrained(tmp_path / "ours")
    assert model.config.projector_type == "linear"  # read off the keys
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, weight)

    torch.save({"model.mm_projector.weight": torch.randn(64, 48), "model.mm_projector.bias": bias}, path)
    with pytest.raises(ConversionError, match=r"mm_projector.weight -> model.multi_modal_projector.linear_1.weight: "
                                              r"\[64, 48\], expected \[64, 32\]"):
        convert_original_llava(path, tmp_path / "ours2", base=tmp_path / "base")
    assert not (tmp_path / "ours2").exists()
