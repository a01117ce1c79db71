"""The quickstart's stand-ins for the pretrained parts (training/miniature.py): what their tokenizers make of the text
stage 2 trains on, and the CLIP stand-in saved as a complete CLIP folder."""

import pytest
from transformers import AutoTokenizer, CLIPModel

from processing.chat_templates import CHAT_TEMPLATES
from processing.generate import generate_from_annotations, jsonl_to_llava_json
from processing.synthetic import make_scene_world
from processing.teachers import SymbolicTeacher
from training.miniature import PartsConfig, build_tokenizer, clip_retrieval_accuracy, corpus_texts, train_clip_standin


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    make_scene_world(root, 60, "train", seed=0)
    make_scene_world(root, 8, "eval", seed=0)
    jsonl = root / "instruct.jsonl"
    generate_from_annotations(root / "annotations", "train", SymbolicTeacher(seed=0), jsonl, types=["conversation"],
                              seed=0, concurrency=1, progress=False)
    jsonl_to_llava_json(jsonl, root / "instruct.json")
    return root


def test_lm_tokenizer_keeps_one_word_answers_whole_after_the_role_name(world):
    """vicuna_v1 renders an answer as "ASSISTANT: Yes</s>"; the answer word must be one token (" Yes"), not a bare
    space followed by "Yes": the model then decides at a token that carries the answer, not at a space."""
    tokenizer = build_tokenizer(corpus_texts(world / "annotations", "train", world / "instruct.json"), vocab_size=600)
    tokenizer.chat_template = CHAT_TEMPLATES["vicuna_v1"]
    for answer in ("Yes", "No"):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Is there a red circle in the image?"},
             {"role": "assistant", "content": answer}], tokenize=False,
        )
        tokens = tokenizer.tokenize(text)
        assert tokens[-1] == tokenizer.eos_token and tokens[-2] == "Ġ" + answer, tokens[-6:]


def test_clip_standin_is_a_complete_clip_folder_with_its_own_tokenizer(world, tmp_path):
    cfg = PartsConfig(vision_hidden_size=32, vision_layers=1, clip_steps=2, clip_batch_size=16, clip_vocab_size=300)
    out = train_clip_standin(world / "images" / "train", world / "annotations", "train", tmp_path / "clip", cfg)
    tokenizer = AutoTokenizer.from_pretrained(out)  # CLIP's own, from the captions only: the LM's corpus can change
    caption = "A green circle and a yellow circle drawn on a plain white background."
    assert tokenizer.decode(tokenizer(caption, add_special_tokens=False)["input_ids"]) == caption
    assert "Ġcircle" in tokenizer.get_vocab() and not any("ASSISTANT" in token for token in tokenizer.get_vocab())
    model = CLIPModel.from_pretrained(out)
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id  # CLIP pools the text at its eos
    accuracy = clip_retrieval_accuracy(out, world / "images" / "eval", world / "annotations", "eval", n=8)
    assert 0.0 <= accuracy <= 1.0
