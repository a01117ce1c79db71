"""Frozen-tower feature cache: same loss and projector gradients as the tower, reuse, resume, and refusal of a cache
built for another tower or preprocessing."""

import json
import random

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modeling_llava.builders import build_tiny_llava
from training import sft
from training.feature_cache import (
    FeatureCacheError,
    VisionFeatureCache,
    build_feature_cache,
    cached_feature_processor,
    image_key,
)


def write_data(folder, n=10, seed=0):
    """`n` scenes of 1-3 rectangles (varied sizes, so padding to square matters) + multi-turn LLaVA JSON."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        image = Image.new("RGB", (rng.randint(24, 48), rng.randint(24, 48)), (255, 255, 255))
        for _ in range(rng.randint(1, 3)):
            x, y = rng.randint(0, 16), rng.randint(0, 16)
            image.paste(tuple(rng.randint(0, 255) for _ in range(3)), (x, y, x + rng.randint(4, 12), y + rng.randint(4, 12)))
        image.save(folder / "images" / f"{i}.png")
        turns = []
        for t in range(rng.randint(1, 3)):
            question = ("<image>\n" if t == 0 else "") + "what color is the circle?"
            answer = "the circle is red." * rng.randint(1, 3)
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        records.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("cache_data"))


def dataset_for(processor, path):
    return sft.prepare_dataset(path, sft.DataArguments(image_folder=str(path.parent / "images")), processor, 512, seed=0)


def trainer_for(model, processor, dataset, tmp_path, cache=None, workers=0):
    args = sft.LlavaSFTConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to="none",
        gradient_checkpointing=False, train_sampling_strategy="sequential", max_length=512,
        dataloader_num_workers=workers,
    )
    return sft.LlavaSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                               vision_feature_cache=cache)


def loss_and_projector_grads(trainer, batch):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "multi_modal_projector" in n}
    return loss.detach(), grads


def test_cached_features_give_the_towers_loss_and_projector_gradients(data, tmp_path):
    model, processor = build_tiny_llava("mlp2x_gelu")
    sft.set_trainable(model, "projector")
    dataset = dataset_for(processor, data)
    cache = build_feature_cache(tmp_path / "cache", model, processor, [dataset], batch_size=3)
    assert len(cache) == len(dataset) and cache.computed == len(dataset)

    plain = trainer_for(model, processor, dataset, tmp_path)
    cached = trainer_for(model, processor, dataset, tmp_path, cache)
    batch = next(iter(plain.get_train_dataloader()))
    cached_batch = next(iter(cached.get_train_dataloader()))
    # The collator's text path is untouched; only pixel_values became the tower's features.
    assert "pixel_values" in batch and "pixel_values" not in cached_batch
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], cached_batch[key]), key
    with torch.no_grad():
        expected = model.model.get_vision_features(batch["pixel_values"])
    torch.testing.assert_close(cached_batch["vision_features"], expected, rtol=1e-5, atol=1e-6)

    model.train()
    loss, grads = loss_and_projector_grads(plain, batch)
    cached_loss, cached_grads = loss_and_projector_grads(cached, cached_batch)
    assert loss > 0
    torch.testing.assert_close(cached_loss, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == cached_grads.keys() and grads
    for name in grads:
        assert grads[name].abs().max() > 0, name
        torch.testing.assert_close(cached_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_dataloader_workers_read_the_cache_too(data, tmp_path):
    model, processor = build_tiny_llava("mlp2x_gelu")
    dataset = dataset_for(processor, data)
    cache = build_feature_cache(tmp_path / "cache", model, processor, [dataset])
    cache.features([dataset[0]["images"][0]])  # file handles opened in this process are not shared with workers
    inline = list(trainer_for(model, processor, dataset, tmp_path, cache).get_train_dataloader())
    in_workers = list(trainer_for(model, processor, dataset, tmp_path, cache, workers=2).get_train_dataloader())
    assert len(inline) == len(in_workers) == 3
    for a, b in zip(inline, in_workers):
        assert torch.equal(a["vision_features"], b["vision_features"]) and torch.equal(a["labels"], b["labels"])


def test_the_model_refuses_pixels_and_features_together(tiny_llava):
    model, processor = tiny_llava
    features = torch.zeros(1, model.config.image_seq_length, model.config.vision_config.hidden_size)
    ids = torch.full((1, model.config.image_seq_length), model.config.image_token_id)
    with pytest.raises(ValueError, match="pixel_values or vision_features, not both"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 32, 32), vision_features=features)


def test_a_rebuild_reuses_the_cache_and_computes_only_new_images(data, tmp_path):
    model, processor = build_tiny_llava("mlp2x_gelu")
    dataset = dataset_for(processor, data)
    first_half = dataset.select(range(len(dataset) // 2))
    # A build that stopped half-way (shards are written atomically, a stray temporary file is ignored) ...
    partial = build_feature_cache(tmp_path / "cache", model, processor, [first_half], shard_size=2)
    (partial.folder / ".features-00099.safetensors.tmp").write_bytes(b"half a shard")
    stored = {k: partial.get(k).clone() for k in partial.index}
    # ... is resumed: only the missing images are computed, and what was there is kept.
    resumed = build_feature_cache(tmp_path / "cache", model, processor, [dataset], shard_size=2)
    assert resumed.folder == partial.folder
    assert resumed.computed == len(dataset) - len(first_half) and len(resumed) == len(dataset)
    assert all(torch.equal(resumed.get(k), v) for k, v in stored.items())
    again = build_feature_cache(tmp_path / "cache", model, processor, [dataset])
    assert again.computed == 0 and len(again) == len(dataset)
    # Reading back from disk in a fresh object: every image's features, keyed by its pixels.
    reopened = VisionFeatureCache(resumed.folder)
    image = dataset[3]["images"][0]
    torch.testing.assert_close(reopened.features([image])[0], resumed.get(image_key(image)))


def test_a_saved_and_reloaded_checkpoint_finds_the_cache_its_parts_built(data, tmp_path):
    # Stage 1 builds the cache from the parts, stage 2 reads it from stage 1's checkpoint: same tower, same folder.
    from modeling_llava import LlavaForCausalLM, LlavaProcessor

    model, processor = build_tiny_llava("mlp2x_gelu")
    dataset = dataset_for(processor, data)
    built = build_feature_cache(tmp_path / "cache", model, processor, [dataset])
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    reloaded, reloaded_processor = LlavaForCausalLM.from_pretrained(tmp_path / "ckpt"), LlavaProcessor.from_pretrained(tmp_path / "ckpt")
    again = build_feature_cache(tmp_path / "cache", reloaded, reloaded_processor, [dataset])
    assert again.folder == built.folder and again.computed == 0


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(vision_feature_layer=-1), "vision_feature_layer"),
        (dict(image_aspect_ratio="crop"), "image_aspect_ratio"),
        (dict(image_size=40), "image_size"),
        (dict(tower_weights=True), "tower_weights"),
    ],
)
def test_a_cache_of_another_tower_or_preprocessing_is_never_used(data, tmp_path, change, field):
    model, processor = build_tiny_llava("mlp2x_gelu")
    dataset = dataset_for(processor, data)
    old = build_feature_cache(tmp_path / "cache", model, processor, [dataset])

    if "image_size" in change:
        model, processor = build_tiny_llava("mlp2x_gelu", image_size=40)
    elif "image_aspect_ratio" in change:
        processor.image_aspect_ratio = change["image_aspect_ratio"]
    elif "tower_weights" in change:
        with torch.no_grad():
            model.model.vision_tower.embeddings.patch_embedding.weight.add_(0.01)
    else:
        model.config.vision_feature_layer = change["vision_feature_layer"]
    dataset = dataset_for(processor, data)
    # The same root builds a separate cache for the new configuration, computing everything again ...
    new = build_feature_cache(tmp_path / "cache", model, processor, [dataset])
    assert new.folder != old.folder and new.computed == len(dataset)
    image = dataset[0]["images"][0]
    with torch.no_grad():
        pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
        expected = model.model.get_vision_features(pixel_values)[0]
    torch.testing.assert_close(new.get(image_key(image)), expected, rtol=1e-5, atol=1e-6)
    # ... and the old folder, named directly, is refused with what differs.
    with pytest.raises(FeatureCacheError, match=rf"different tower or preprocessing(.|\n)*{field}"):
        VisionFeatureCache.for_model(old.folder, model, processor)


def test_an_image_missing_from_the_cache_is_named(data, tmp_path):
    model, processor = build_tiny_llava("mlp2x_gelu")
    dataset = dataset_for(processor, data)
    cache = build_feature_cache(tmp_path / "cache", model, processor, [dataset.select(range(2))])
    proxy = cached_feature_processor(processor, cache)
    unseen = Image.new("RGB", (30, 20), (1, 2, 3))
    messages = [{"role": "user", "content": [{"type": "image", "image": unseen}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(FeatureCacheError, match=r"image 0 of the batch \(RGB 30x20, key [0-9a-f]+\) is not in"):
        proxy.apply_chat_template([messages], tokenize=True, return_dict=True, return_tensors="pt")


def test_sft_with_the_cache_trains_the_same_projector(tiny_world, tmp_path):
    """training/sft.py end to end: `--vision_feature_cache` gives the weights of the uncached run."""
    common = [
        "--stage", "stage1", "--vision_model_name_or_path", str(tiny_world["clip"]),
        "--language_model_name_or_path", str(tiny_world["lm"]), "--data_path", str(tiny_world["captions"]),
        "--image_folder", str(tiny_world["images"]), "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--report_to", "none", "--gradient_checkpointing", "false", "--save_strategy", "no",
        "--max_length", "512", "--seed", "0", "--max_train_samples", "24",
        "--train_sampling_strategy", "group_by_length",
    ]
    sft.main([*common, "--output_dir", str(tmp_path / "plain")])
    sft.main([*common, "--output_dir", str(tmp_path / "cached"), "--vision_feature_cache", str(tmp_path / "cache")])
    plain = load_file(tmp_path / "plain" / "mm_projector.safetensors")
    cached = load_file(tmp_path / "cached" / "mm_projector.safetensors")
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(VisionFeatureCache(folder)) == 24
