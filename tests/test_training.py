"""training/sft.py: trainable sets per stage, labels of real batches, overlong policy, stage hand-over, LoRA, push."""

import json
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from training import sft


def run_sft(tiny_world, out, *extra, stage="stage1", steps=2, batch=4):
    argv = [
        "--stage", stage, "--output_dir", str(out), "--image_folder", str(tiny_world["images"]),
        "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--learning_rate", "1e-3",
        "--report_to", "none", "--gradient_checkpointing", "false", "--save_strategy", "no", "--logging_steps", "1",
        "--max_length", "512", "--seed", "0",
    ]
    if stage == "stage1":
        argv += ["--vision_model_name_or_path", str(tiny_world["clip"]),
                 "--language_model_name_or_path", str(tiny_world["lm"]), "--data_path", str(tiny_world["captions"])]
    else:
        argv += ["--data_path", str(tiny_world["instruct"])]
    return sft.main([*argv, *extra])


@pytest.fixture(scope="module")
def stage1_dir(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    run_sft(tiny_world, out, stage="stage1", steps=3)
    return out


def weights(folder):
    return load_file(folder / "model.safetensors")


# -- stage 1 --------------------------------------------------------------------------------------------------------


def test_stage1_trains_the_projector_only(stage1_dir, tiny_world):
    before_lm = load_file(tiny_world["lm"] / "model.safetensors")
    after = weights(stage1_dir)
    projector = [k for k in after if k.startswith("model.multi_modal_projector.")]
    assert projector
    # The LM's own rows are untouched (new <image>/<pad> rows were appended by resizing, also frozen).
    for key, tensor in before_lm.items():
        ours = "lm_head.weight" if key == "lm_head.weight" else key.replace("model.", "model.language_model.", 1)
        assert torch.equal(after[ours][: tensor.shape[0]], tensor), key
    summary = json.loads((stage1_dir / "training_summary.json").read_text())
    assert summary["stage"] == "stage1" and summary["tune"] == "projector" and summary["global_steps"] == 3
    # The projector-only artifact equals the checkpoint's projector.
    artifact = load_file(stage1_dir / "mm_projector.safetensors")
    assert set(artifact) == {k.removeprefix("model.multi_modal_projector.") for k in projector}
    for key, tensor in artifact.items():
        assert torch.equal(tensor, after["model.multi_modal_projector." + key])


def test_stage1_checkpoint_is_self_contained_with_a_card(stage1_dir):
    from huggingface_hub import ModelCard

    for name in ("configuration_llava.py", "modeling_llava.py", "processing_llava.py", "chat_template.jinja"):
        assert (stage1_dir / name).exists(), name
    card = ModelCard.load(stage1_dir / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.widget and "stage1" in card.data.tags
    assert "final train loss" in card.text and "| stage | stage1 (projector) |" in card.text


def test_check_trainable_fails_loudly_when_the_tower_would_train(tiny_llava):
    model, _ = tiny_llava
    sft.set_trainable(model, "projector")
    trainable, total = sft.check_trainable(model, "projector")
    assert 0 < trainable < total
    model.model.vision_tower.embeddings.requires_grad_(True)
    with pytest.raises(RuntimeError, match="must not train these parameters: .*vision_tower"):
        sft.check_trainable(model, "projector")
    sft.set_trainable(model, "full")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in n for n in names)
    assert any("language_model" in n for n in names) and "lm_head.weight" in names
    model.requires_grad_(True)
    model.model.vision_tower.requires_grad_(False)


# -- stage 2 --------------------------------------------------------------------------------------------------------


def test_stage2_full_moves_lm_and_projector_never_the_tower(stage1_dir, tiny_world, tmp_path):
    run_sft(tiny_world, tmp_path, "--model_name_or_path", str(stage1_dir), stage="stage2", steps=2)
    before, after = weights(stage1_dir), weights(tmp_path)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.language_model.") for k in changed)
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert not any(k.startswith("model.vision_tower.") for k in changed)
    # Stage 2 trains with vicuna_v1 even though the stage-1 checkpoint carries `plain`.
    assert "ASSISTANT:" in (tmp_path / "chat_template.jinja").read_text()


def test_stage2_starts_from_the_projector_artifact(stage1_dir, tiny_world, tmp_path):
    llava_args = sft.LlavaArguments(
        stage="stage2", vision_model_name_or_path=str(tiny_world["clip"]),
        language_model_name_or_path=str(tiny_world["lm"]), projector_path=str(stage1_dir),
    )
    model, processor = sft.build_model_and_processor(llava_args, sft.ModelConfig())
    for key, tensor in load_file(stage1_dir / "mm_projector.safetensors").items():
        assert torch.equal(model.model.multi_modal_projector.state_dict()[key], tensor)
    assert "ASSISTANT:" in processor.chat_template


def test_vision_feature_norm_is_fitted_at_stage1_and_kept_by_stage2(tiny_world, tmp_path):
    stage1 = tmp_path / "stage1"
    run_sft(tiny_world, stage1, "--vision_feature_norm", "true", stage="stage1", steps=2)
    saved = weights(stage1)
    mean, std = saved["model.multi_modal_projector.feature_mean"], saved["model.multi_modal_projector.feature_std"]
    # The statistics of the tower's features of the training images (all of them: fewer than max_images here).
    model, processor = sft.build_model_and_processor(
        sft.LlavaArguments(stage="stage1", vision_model_name_or_path=str(tiny_world["clip"]),
                           language_model_name_or_path=str(tiny_world["lm"]), vision_feature_norm=True),
        sft.ModelConfig(),
    )
    data_args = sft.DataArguments(data_path=str(tiny_world["captions"]), image_folder=str(tiny_world["images"]))
    dataset = sft.prepare_dataset(data_args.data_path, data_args, processor, 512, 0)
    images = [image for row in dataset["images"] for image in row]
    with torch.no_grad():
        features = model.model.get_vision_features(processor(images=images, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(mean, features.flatten(0, 1).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std, features.flatten(0, 1).std(0), rtol=1e-4, atol=1e-5)
    assert mean.abs().max() > 1e-3 and not torch.allclose(std, torch.ones_like(std))
    # Read from the frozen-tower feature cache instead of a second tower pass, the statistics are the same.
    cached = tmp_path / "stage1_cached"
    run_sft(tiny_world, cached, "--vision_feature_norm", "true", "--vision_feature_cache", str(tmp_path / "cache"),
            stage="stage1", steps=1)
    torch.testing.assert_close(weights(cached)["model.multi_modal_projector.feature_mean"], mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights(cached)["model.multi_modal_projector.feature_std"], std, rtol=1e-4, atol=1e-5)
    # ... shared with the projector artifact, and never refitted on another stage's data.
    assert torch.equal(load_file(stage1 / "mm_projector.safetensors")["feature_mean"], mean)
    stage2 = tmp_path / "stage2"
    run_sft(tiny_world, stage2, "--model_name_or_path", str(stage1), stage="stage2", steps=1)
    assert torch.equal(weights(stage2)["model.multi_modal_projector.feature_mean"], mean)
    assert torch.equal(weights(stage2)["model.multi_modal_projector.feature_std"], std)


def test_labels_of_a_real_batch_are_the_answers_and_their_eos(stage1_dir, tiny_world, tmp_path):
    """The batch the trainer actually feeds: kept labels are exactly the assistant answers, each ending in </s>."""
    from transformers import AutoProcessor

    from training.sft import DataArguments, LlavaSFTConfig, LlavaSFTTrainer, prepare_dataset

    processor = AutoProcessor.from_pretrained(stage1_dir)
    processor.chat_template = sft.get_chat_template("vicuna_v1")
    model = sft.LlavaForCausalLM.from_pretrained(stage1_dir)
    dataset = prepare_dataset(tiny_world["instruct"], DataArguments(image_folder=str(tiny_world["images"])),
                              processor, 512, seed=0)
    args = LlavaSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to="none",
                          gradient_checkpointing=False, train_sampling_strategy="sequential")
    trainer = LlavaSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    batch = next(iter(trainer.get_train_dataloader()))
    tokenizer = processor.tokenizer
    for row in range(3):
        labels, input_ids = batch["labels"][row], batch["input_ids"][row]
        kept = labels != -100
        assert torch.equal(labels[kept], input_ids[kept])
        runs, current = [], []
        for keep, token in zip(kept.tolist(), input_ids.tolist()):
            if keep:
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        runs += [current] if current else []
        answers = [m["content"][0]["text"] for m in dataset[row]["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(r) for r in runs] == [f" {a}</s>" for a in answers]
        assert not kept[input_ids == processor.image_token_id].any()


def test_cpu_loss_path_matches_trls_fused_head(stage1_dir, tiny_world, tmp_path):
    """On CPU the trainer takes the model's own loss (faster there); loss, gradients and logged metrics must be TRL's."""
    from transformers import AutoProcessor
    from trl import SFTTrainer

    from training.sft import DataArguments, LlavaSFTConfig, LlavaSFTTrainer, prepare_dataset

    processor = AutoProcessor.from_pretrained(stage1_dir)
    processor.chat_template = sft.get_chat_template("vicuna_v1")
    model = sft.LlavaForCausalLM.from_pretrained(stage1_dir)
    sft.set_trainable(model, "full")
    dataset = prepare_dataset(tiny_world["instruct"], DataArguments(image_folder=str(tiny_world["images"])),
                              processor, 512, seed=0)
    args = LlavaSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none",
                          gradient_checkpointing=False, train_sampling_strategy="sequential")
    trainer = LlavaSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    assert trainer.args.device.type == "cpu" and not trainer.aux_loss_enabled  # so our path is the one compared
    num_items = (batch["labels"][:, 1:] != -100).sum()
    results = []
    for compute_loss in (trainer.compute_loss, lambda *a, **k: SFTTrainer.compute_loss(trainer, *a, **k)):
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 0
        loss = compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
        loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]
        trainer.model.zero_grad()
        results.append((loss.detach(), grads, {k: list(v) for k, v in trainer._metrics["train"].items()}))
    (ours, our_grads, our_metrics), (trls, trl_grads, trl_metrics) = results
    assert torch.allclose(ours, trls, atol=1e-5) and ours > 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(our_grads, trl_grads))
    assert sum(g.abs().sum() for g in our_grads) > 0
    assert our_metrics.keys() == trl_metrics.keys() == {"entropy", "mean_token_accuracy", "num_tokens"}
    for key in our_metrics:
        assert our_metrics[key] == pytest.approx(trl_metrics[key], abs=1e-4)


def test_overlong_records_error_or_skip(stage1_dir, tiny_world, capsys):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(stage1_dir)
    processor.chat_template = sft.get_chat_template("vicuna_v1")
    data_args = sft.DataArguments(image_folder=str(tiny_world["images"]))
    full = sft.prepare_dataset(tiny_world["instruct"], data_args, processor, None, seed=0)
    # Where each record's image tokens end once <image> is expanded (the image sits before or after the question).
    ends = []
    for messages in full["messages"]:
        ids = processor.tokenizer(processor.apply_chat_template(messages), add_special_tokens=False)["input_ids"]
        ends.append(ids.index(processor.image_token_id) + processor.image_seq_length)
    limit = sorted(ends)[len(ends) // 2]
    too_long = sum(end > limit for end in ends)
    assert 0 < too_long < len(ends)
    with pytest.raises(ValueError, match=rf"record '[^']+' \(field 'conversations'\) needs \d+ tokens .* max_length is {limit}; {too_long} record"):
        sft.prepare_dataset(tiny_world["instruct"], data_args, processor, limit, seed=0)
    data_args.overlong_policy = "skip"
    kept = sft.prepare_dataset(tiny_world["instruct"], data_args, processor, limit, seed=0)
    assert len(kept) == len(full) - too_long
    assert f"skipped {too_long} record(s)" in capsys.readouterr().out
    assert max(kept["length"]) <= limit  # longer texts are truncated after their image tokens, not dropped
    assert max(full["length"]) > limit


# -- LoRA -----------------------------------------------------------------------------------------------------------


def test_lora_stage2_saves_merges_and_reloads(stage1_dir, tiny_world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_sft(tiny_world, tmp_path, "--model_name_or_path", str(stage1_dir), "--use_peft", "--lora_r", "4",
            "--lora_alpha", "8", stage="stage2", steps=3)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "language_model" in adapter_config["target_modules"] and "vision" not in adapter_config["target_modules"]
    assert adapter_config["modules_to_save"] == ["multi_modal_projector"]
    merged = weights(tmp_path)
    assert not any("lora_" in k for k in merged)
    before = weights(stage1_dir)
    assert all(torch.equal(before[k], merged[k]) for k in before if k.startswith("model.vision_tower."))
    assert any(not torch.equal(before[k], merged[k]) for k in before if k.startswith("model.language_model."))

    # Base + adapter (PEFT) and the merged checkpoint give the same logits.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with_adapter = PeftModel.from_pretrained(sft.LlavaForCausalLM.from_pretrained(stage1_dir), tmp_path / "adapter")
    with_adapter.eval()
    input_ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, with_adapter(input_ids=input_ids).logits,
                                   atol=1e-5, rtol=1e-5)


# -- push -----------------------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_a_folder_that_loads_back(stage1_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from http_fixtures import FakeHub
    from transformers import AutoModelForCausalLM, AutoProcessor

    from hub_cards.push import push_checkpoint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # only 127.0.0.1 is contacted
    hub = FakeHub(tmp_path / "received")
    try:
        push_checkpoint(stage1_dir, "me/llava-stage1", token="hf_fake", endpoint=hub.url)
    finally:
        hub.close()
    received = tmp_path / "received"
    assert hub.created["name"] == "llava-stage1" and hub.created.get("type", "model") == "model"
    sent = {p.name for p in received.iterdir()}
    assert {"model.safetensors", "mm_projector.safetensors", "modeling_llava.py", "README.md"} <= sent
    assert "training_args.bin" not in sent
    model = AutoModelForCausalLM.from_pretrained(received, trust_remote_code=True)
    AutoProcessor.from_pretrained(received, trust_remote_code=True)
    original = weights(stage1_dir)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items() if k in original)
