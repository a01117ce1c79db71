"""What a finished stage leaves in its output folder.

- a full self-contained checkpoint (weights as safetensors, code, processor; LoRA adapters merged in, the adapter
  itself kept in `adapter/`), so the next stage or `pipeline(...)` loads it directly;
- `mm_projector.safetensors`: the projector alone, stage 1's small shareable artifact;
- `README.md`: the model card; `training_summary.json`: the numbers the card shows, written last (atomically, like
  the card and the projector), so its presence marks a complete folder.
"""

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from hub_cards.model_card import render_model_card


PROJECTOR_FILE = "mm_projector.safetensors"
PROJECTOR_PREFIX = "model.multi_modal_projector."


def write_atomically(path: Path, write) -> None:
    """`write(tmp_path)` then rename onto `path`: a killed run leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def extract_projector(checkpoint_dir, config) -> Path:
    """Writes `mm_projector.safetensors` from the saved checkpoint's own files.

    Reading the weights back from disk, instead of from the live model, is what makes this right under DeepSpeed
    ZeRO-3, where the live parameters are empty shards (a classic LLaVA pain point).
    """
    checkpoint_dir = Path(checkpoint_dir)
    state = {}
    for shard in sorted(checkpoint_dir.glob("model*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                if key.startswith(PROJECTOR_PREFIX):
                    state[key[len(PROJECTOR_PREFIX):]] = f.get_tensor(key)
    if not state:
        raise FileNotFoundError(f"{checkpoint_dir}: no '{PROJECTOR_PREFIX}*' weights in model*.safetensors")
    metadata = {
        "projector_type": config.projector_type,
        "vision_hidden_size": config.vision_config.hidden_size,
        "text_hidden_size": config.text_config.hidden_size,
        "vision_feature_layer": config.vision_feature_layer,
        "image_token_pooling": config.image_token_pooling,
    }
    path = checkpoint_dir / PROJECTOR_FILE
    write_atomically(path, lambda tmp: save_file(state, tmp, metadata={k: str(v) for k, v in metadata.items()}))
    return path


def final_train_loss(trainer) -> float | None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses[-1] if losses else None


def save_stage_checkpoint(trainer, processor, output_dir, *, llava_args, data_args, model_args, tune, train_result):
    """Saves the stage's checkpoint, projector, card and summary into `output_dir`; returns the summary."""
    output_dir = Path(output_dir)
    if tune == "lora":
        trainer.model.save_pretrained(output_dir / "adapter")  # the adapter (+ projector), for PEFT users
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        trainer.model = merged
        if trainer.is_world_process_zero():
            merged.save_pretrained(output_dir)
            processor.save_pretrained(output_dir)
    else:
        trainer.save_model(str(output_dir))  # gathers sharded weights (FSDP/ZeRO-3) and saves the processor too
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return {}

    model = trainer.accelerator.unwrap_model(trainer.model)
    config = model.config
    extract_projector(output_dir, config)
    args = trainer.args
    summary = {
        "stage": llava_args.stage,
        "tune": tune,
        "final_train_loss": final_train_loss(trainer),
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "global_steps": trainer.state.global_step,
        "num_samples": len(trainer.train_dataset),
        "hyperparameters": {
            "learning_rate": args.learning_rate,
            "projector_lr": llava_args.projector_lr,
            "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
            * max(1, args.world_size),
            "epochs": args.num_train_epochs,
            "max_steps": args.max_steps,
            "train_budget_minutes": getattr(args, "train_budget_minutes", None),
            "lr_scheduler": str(args.lr_scheduler_type).split(".")[-1].lower(),
            "warmup_steps": args.warmup_steps,
            "weight_decay": args.weight_decay,
            "max_length": args.max_length,
            "seed": args.seed,
        },
    }
    if tune == "lora":
        summary["hyperparameters"].update(lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                                          lora_dropout=model_args.lora_dropout)

    vision = llava_args.vision_model_name_or_path or config.vision_config.model_type
    language = llava_args.language_model_name_or_path or config.text_config.model_type
    card = render_model_card(
        model_name=args.hub_model_id or output_dir.name,
        stage=llava_args.stage,
        tune=tune,
        vision_model=str(vision),
        language_model=str(language),
        config=config,
        chat_template=llava_args.chat_template or ("plain" if llava_args.stage == "stage1" else "vicuna_v1"),
        system_prompt=llava_args.system_prompt,
        data=str(data_args.data_path),
        num_samples=summary["num_samples"],
        hyperparameters={k: v for k, v in summary["hyperparameters"].items() if v not in (None, -1)},
        final_loss=summary["final_train_loss"],
        repo_id=args.hub_model_id,
        has_projector=True,
    )
    write_atomically(output_dir / "README.md", card.save)
    # Written last: a folder with training_summary.json holds the complete stage (weights, projector, card).
    write_atomically(output_dir / "training_summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return summary
