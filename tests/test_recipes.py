"""The shipped recipes and accelerate configs parse into what the paper and LLaVA-1.5 used."""

from pathlib import Path

import pytest
import yaml
from conftest import REPO
from trl import ModelConfig, TrlParser

from training.sft import DataArguments, LlavaArguments, LlavaSFTConfig


RECIPES = REPO / "training" / "recipes"


def parse(name, *extra):
    parser = TrlParser((LlavaArguments, DataArguments, LlavaSFTConfig, ModelConfig))
    return parser.parse_args_and_config(["--config", str(RECIPES / name), "--data_path", "data.json", *extra])


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_parses(name):
    llava, data, args, model = parse(name)
    assert llava.stage in ("stage1", "stage2")
    assert args.assistant_only_loss
    assert args.bf16 is False  # no GPU here: fp32 chosen automatically


def test_paper_stage1_and_stage2_hyperparameters():
    llava, _, args, _ = parse("stage1.yaml")
    assert (llava.stage, llava.tune, llava.projector_type, llava.vision_feature_layer) == ("stage1", "projector", "linear", -2)
    assert (args.learning_rate, args.num_train_epochs, args.warmup_steps, args.max_length) == (2e-3, 1, 0.03, 2048)
    assert args.per_device_train_batch_size * 8 == 128 and args.lr_scheduler_type == "cosine"
    llava, data, args, _ = parse("stage2.yaml")
    assert (llava.stage, llava.tune, data.image_placement) == ("stage2", "full", "random")
    assert (args.learning_rate, args.num_train_epochs) == (2e-5, 3) and 32 <= args.per_device_train_batch_size * 8 <= 128


def test_llava15_and_lora_recipes():
    llava, _, args, _ = parse("llava15_stage1.yaml")
    assert (llava.projector_type, llava.chat_template, llava.image_aspect_ratio) == ("mlp2x_gelu", "plain", "pad")
    assert args.learning_rate == 1e-3
    llava, _, args, model = parse("stage2_lora.yaml")
    assert llava.tune == "lora" and model.use_peft and (model.lora_r, model.lora_alpha) == (128, 256)
    assert llava.projector_lr == 2e-5


def test_accelerate_configs():
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in (REPO / "training" / "accelerate").glob("*.yaml")}
    assert configs["ddp"]["distributed_type"] == "MULTI_GPU"
    assert configs["fsdp"]["distributed_type"] == "FSDP"
    assert configs["deepspeed_zero2"]["deepspeed_config"]["zero_stage"] == 2
    assert configs["deepspeed_zero3"]["deepspeed_config"]["zero_stage"] == 3
    assert configs["cpu_ddp"]["num_processes"] == 2  # exercised by tests/test_training_resume_ddp.py


def test_quantization_needs_lora():
    from training.sft import resolve_defaults

    llava, _, args, model = parse("stage2.yaml", "--load_in_4bit", "true")
    with pytest.raises(ValueError, match="only be trained through LoRA"):
        resolve_defaults(llava, args, model)
    llava, _, args, model = parse("stage2_lora.yaml", "--load_in_4bit", "true")
    assert resolve_defaults(llava, args, model) == "lora"
