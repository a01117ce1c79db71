"""What the benchmark runs on: its configuration, one set of random weights in both layouts, and synthetic data.

Nothing is downloaded. The weights are random (throughput and greedy-token parity do not need trained ones), built
once as our `LlavaForCausalLM` and converted with `modeling_llava.convert_llava_hf` to transformers'
`LlavaForConditionalGeneration`, so both sides start from the same numbers. The data is the synthetic scene world
(`processing/synthetic.py`) drawn at the tower's resolution: stage 1 is brief captions (CC3M-595K's shape), stage 2
multi-turn conversations whose lengths are skewed like LLaVA-Instruct's (many short exchanges, a tail of long
descriptions).
"""

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from modeling_llava import LlavaConfig, LlavaForCausalLM
from modeling_llava.builders import make_image_processor, processor_for
from modeling_llava.convert_llava_hf import export_llava_hf
from processing.chat_templates import VICUNA_V1_SYSTEM
from processing.synthetic import load_scene_objects, make_scene_world, scene_vqa_pairs, write_caption_data
from processing.tokenization import train_tokenizer


@dataclass
class BenchConfig:
    """Sizes of the benchmark (the defaults: large enough that the model's compute, not Python, dominates a step).

    Default model: a CLIP tower at 224 px with 14 px patches (256 image tokens; 12 layers of width 384, 6 heads:
    ViT-S/14's shape, e.g. DINOv2-S/14), an `mlp2x_gelu` projector, a LLaMA of hidden 512 x 4 layers (intermediate
    1376, 8 heads) and a byte-level BPE vocabulary of 1024. Data: 128 images; batch 4 per step; 1 torch thread
    per participant on a CPU.
    """

    image_size: int = 224
    patch_size: int = 14
    vision_hidden_size: int = 384
    vision_layers: int = 12
    text_hidden_size: int = 512
    text_layers: int = 4
    vocab_size: int = 1024
    num_images: int = 128
    batch_size: int = 4
    stage1_lr: float = 1e-3
    stage2_lr: float = 2e-5
    warmup_steps: int = 1  # untimed steps before the first window
    windows: int = 6  # timed windows per participant, alternating between participants
    steps_per_window: int = 1
    new_tokens: int = 32  # generated per prompt (min = max, so both sides generate the same count)
    generation_batches: tuple[int, ...] = (1, 8)
    # Generation runs in rounds of fresh processes (one per side, plus the control), `generation_processes` rounds,
    # each process timing `generation_repeats` generate calls per batch size after its warm-up: a process's
    # allocation history can shift its speed for its whole life, so processes, not repeats, are what is sampled.
    generation_processes: int = 3
    generation_repeats: int = 1
    # An A/A control in every round: a second process of the same side ("ours" or "peer"; "none": no control),
    # whose ratio to that side is the noise floor a reader compares the ours / peer ratio with.
    generation_control: str = "ours"
    # Allocator settings of every generation process, both sides alike: "steady" fixes glibc's mmap threshold and
    # stops heap trimming (see benchmarks/run.py, GENERATION_MALLOC_ENV); "inherit" leaves the environment as is.
    generation_malloc: str = "steady"
    # torch threads per participant. 1 on a CPU by default: participants take turns, but on a shared machine a
    # second OpenMP thread waits for a busy core at every parallel region (measured here: a 256x512 @ 512x1376
    # matmul took 17 ms with 2 threads under load, 4.7 ms with 1). On a GPU it does not matter.
    threads: int = 1
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


QUICK = dict(
    image_size=112, vision_hidden_size=192, vision_layers=3, text_hidden_size=256, text_layers=2, num_images=48,
    warmup_steps=1, windows=2, steps_per_window=1, new_tokens=8, generation_processes=2, generation_repeats=1,
)


def _corpus(captions_path: Path) -> list[str]:
    data = json.loads(captions_path.read_text())
    return [a["caption"] for a in data["annotations"]] + [VICUNA_V1_SYSTEM, "USER: ASSISTANT:"] * 50


def build_weights(config: BenchConfig, out: Path, captions_path: Path) -> tuple[Path, Path]:
    """Random weights saved as ours (`out/ours`) and converted to llava-hf (`out/peer`)."""
    tokenizer = train_tokenizer(_corpus(captions_path), vocab_size=config.vocab_size)
    heads = max(1, config.vision_hidden_size // 64)
    vision = CLIPVisionConfig(
        image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.vision_hidden_size,
        intermediate_size=4 * config.vision_hidden_size, num_hidden_layers=config.vision_layers,
        num_attention_heads=heads,
    )
    text_heads = max(1, config.text_hidden_size // 64)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_hidden_size,
        intermediate_size=int(config.text_hidden_size * 2.6875), num_hidden_layers=config.text_layers,
        num_attention_heads=text_heads, num_key_value_heads=text_heads, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    llava_config = LlavaConfig(
        vision_config=vision, text_config=text, projector_type="mlp2x_gelu",
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(config.seed)
    model = LlavaForCausalLM(llava_config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    processor = processor_for(model, tokenizer, make_image_processor(config.image_size), "vicuna_v1", "pad")
    ours, peer = out / "ours", out / "peer"
    model.save_pretrained(ours)
    processor.save_pretrained(ours)
    export_llava_hf(ours, peer)
    return ours, peer


def _conversation(objects, captions: list[str], rng: random.Random) -> list[dict]:
    """1-8 turns: short VQA answers mostly, and sometimes a long description (several captions joined)."""
    turns = rng.choice([1, 1, 1, 1, 2, 2, 3, 4, 6, 8])
    pairs = scene_vqa_pairs(objects, rng, turns=turns)
    if rng.random() < 0.3:
        pairs.append(("Describe the image in detail.", " ".join(rng.sample(captions, k=min(len(captions), rng.randint(2, 5))))))
    conversations = []
    for i, (question, answer) in enumerate(pairs[:turns]):
        if i == 0:
            question = f"<image>\n{question}"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return conversations


def build_data(config: BenchConfig, out: Path) -> dict:
    """The scene world at the tower's resolution, stage-1 caption data and skewed stage-2 conversations."""
    world = make_scene_world(out / "world", config.num_images, "train", seed=config.seed, image_size=config.image_size)
    stage1 = write_caption_data(world, out / "stage1.json", seed=config.seed)
    files, scenes = load_scene_objects(world.instances_path)
    captions: dict[int, list[str]] = {}
    for annotation in json.loads(world.captions_path.read_text())["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    rng = random.Random(config.seed)
    records = [
        {"id": str(image_id), "image": files[image_id],
         "conversations": _conversation(scenes[image_id], captions[image_id], rng)}
        for image_id in sorted(files)
    ]
    stage2 = out / "stage2.json"
    stage2.write_text(json.dumps(records))
    return {"images": str(world.images_dir), "stage1": str(stage1), "stage2": str(stage2),
            "captions": str(world.captions_path)}
