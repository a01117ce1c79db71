"""Both LLaVA training stages with TRL's SFTTrainer.

    accelerate launch training/sft.py --config training/recipes/stage1.yaml [--overrides ...]

Stage 1 (feature alignment) starts from a pretrained vision encoder and a pretrained LM and trains the projector
only; stage 2 (visual instruction tuning) starts from stage 1's output and trains projector + LM (full) or projector +
LoRA adapters on the LM. The loss is on assistant tokens only, through TRL's `assistant_only_loss` and the
`{% generation %}` markers of our chat templates. Scaling out (DDP, FSDP, DeepSpeed) is accelerate's job: pass one
of `training/accelerate/*.yaml` to `accelerate launch --config_file`.
"""

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import Trainer, set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config
from trl.trainer.utils import entropy_from_logits


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python training/sft.py` from a checkout

import modeling_llava  # noqa: E402  (registers llava_plugin with the Auto classes)
from modeling_llava import LlavaForCausalLM, LlavaProcessor  # noqa: E402
from modeling_llava.builders import load_pretrained_parts  # noqa: E402
from processing.chat_templates import get_chat_template  # noqa: E402
from processing.llava_json import LlavaDataError, load_llava_json  # noqa: E402
from training.budget import TrainingBudgetCallback  # noqa: E402
from training.export import PROJECTOR_FILE, save_stage_checkpoint  # noqa: E402
from training.feature_cache import VisionFeatureCache, build_feature_cache, cached_feature_processor  # noqa: E402
from training.sampling import ModalityLengthGroupedSampler, image_counts  # noqa: E402


@dataclass
class LlavaArguments:
    """What to train: the stage, where its model comes from, and which parameters move."""

    stage: str = field(default="stage2", metadata={"help": "'stage1' (feature alignment) or 'stage2' (instruction tuning)."})
    tune: str | None = field(
        default=None,
        metadata={"help": "'projector', 'full' (projector + LM) or 'lora' (projector + LoRA on the LM). "
                  "Default: projector in stage 1, full in stage 2 (lora when --use_peft)."},
    )
    vision_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained vision encoder (CLIP/SigLIP) when starting from parts."}
    )
    language_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained causal LM when starting from parts."}
    )
    projector_path: str | None = field(
        default=None, metadata={"help": f"A stage-1 `{PROJECTOR_FILE}` (or its folder) loaded onto the parts."}
    )
    projector_type: str = field(default="mlp2x_gelu", metadata={"help": "'linear' (paper) or 'mlp2x_gelu' (1.5)."})
    vision_feature_layer: int = field(default=-2, metadata={"help": "Tower hidden state to project."})
    vision_feature_select_strategy: str = field(default="default", metadata={"help": "'default' drops CLS."})
    image_token_pooling: int = field(default=1, metadata={"help": "Average-pool stride over the patch grid."})
    projector_layernorm: bool = field(default=False, metadata={"help": "LayerNorm after the projector."})
    vision_feature_norm: bool = field(
        default=False,
        metadata={"help": "Standardize the tower's features per channel before the projector, with statistics fitted "
                  "on the training images when starting from parts (see LlavaConfig.vision_feature_norm)."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "'vicuna_v1' or 'plain'. Default: the checkpoint's, or plain/vicuna_v1 for stage 1/2."},
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "Replaces the chat template's default system prompt ('' renders none); saved with the "
                  "template, so inference prompts the same way. Default: the template's own."},
    )
    image_aspect_ratio: str = field(default="pad", metadata={"help": "'pad' (LLaVA-1.5) or 'crop' (paper)."})
    projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the projector when it differs from the LM's."}
    )
    vision_feature_cache: str | None = field(
        default=None,
        metadata={"help": "Folder of the frozen-tower feature cache: the tower's features of every image are computed "
                  "once (resumable, reused by later runs with the same tower and preprocessing) and training skips "
                  "the tower. See training/feature_cache.py."},
    )


@dataclass
class DataArguments:
    """The LLaVA JSON data and what to do with records that cannot be trained on."""

    data_path: str = field(default=None, metadata={"help": "LLaVA JSON/JSONL file of the training data."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the records' `image` paths are in."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Optional LLaVA JSON for evaluation loss."})
    data_policy: str = field(default="error", metadata={"help": "Bad records: 'error' or 'skip' (counted)."})
    image_placement: str = field(
        default="as_is", metadata={"help": "'as_is' or 'random' (the paper's first-turn rule, seeded)."}
    )
    overlong_policy: str = field(
        default="error",
        metadata={"help": "A record whose image tokens would not fit in max_length: 'error' or 'skip' (counted). "
                  "Text past the image tokens is truncated as usual."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N records."})
    group_batches_by: str | None = field(
        default=None,
        metadata={"help": "A record field (e.g. `type`): each training batch then holds records of one value of it, "
                  "at random within it (or by length with group_by_length), as LLaVA-1.5 keeps image and text-only "
                  "records apart. Where short VQA and long conversations mix, random batches pad to the longest."},
    )


@dataclass
class LlavaSFTConfig(SFTConfig):
    """`SFTConfig` with LLaVA's defaults: loss on assistant tokens only, and mixed precision only where it pays."""

    assistant_only_loss: bool = field(default=True, metadata={"help": "Loss on assistant tokens (and their </s>)."})
    train_budget_minutes: float | None = field(
        default=None,
        metadata={"help": "Wall-clock minutes of training: max_steps becomes a ceiling, cut to the steps that fit "
                  "once the first budget_calibration_steps are timed, and again at 1/4, 1/2 and 3/4 of the budget; "
                  "the learning-rate schedule is laid over those steps (training/budget.py)."},
    )
    budget_calibration_steps: int = field(
        default=50, metadata={"help": "Steps timed before train_budget_minutes decides the step count."}
    )

    def __post_init__(self):
        if not torch.cuda.is_available():
            # bf16 autocast on a CPU is slow and changes the numbers: fp32 there, bf16 (TRL's default) on GPUs.
            if self.bf16 is None and not self.fp16:
                self.bf16 = False
            # Without it accelerate sees no device to run `--multi_gpu` processes on and each trains alone;
            # with it they form one data-parallel group over gloo.
            self.use_cpu = True
        super().__post_init__()


# -- model ----------------------------------------------------------------------------------------------------------


def build_model_and_processor(llava_args: LlavaArguments, model_args: ModelConfig):
    """A llava_plugin checkpoint (`--model_name_or_path`) or pretrained parts (+ an optional stage-1 projector)."""
    dtype = None if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    default_template = "plain" if llava_args.stage == "stage1" else "vicuna_v1"
    chat_template = get_chat_template(llava_args.chat_template or default_template, llava_args.system_prompt)
    quantization_config = get_quantization_config(model_args)  # QLoRA: --load_in_4bit (needs bitsandbytes + GPU)
    if quantization_config is not None:
        if not model_args.model_name_or_path:
            raise ValueError("--load_in_4bit/--load_in_8bit quantize a stage-1 checkpoint: give --model_name_or_path.")
        # Only the LM is quantized: the frozen tower stays exact and the projector trains in full precision.
        quantization_config.llm_int8_skip_modules = ["vision_tower", "multi_modal_projector", "lm_head"]
    if model_args.model_name_or_path:
        try:
            model = LlavaForCausalLM.from_pretrained(
                model_args.model_name_or_path, dtype=dtype, attn_implementation=model_args.attn_implementation,
                quantization_config=quantization_config,
            )
        except ValueError as error:  # e.g. an unknown projector_type: say which checkpoint
            raise ValueError(f"{model_args.model_name_or_path}: cannot load the checkpoint: {error}") from None
        processor = LlavaProcessor.from_pretrained(model_args.model_name_or_path)
        # A stage-1 checkpoint carries `plain`; stage 2 must not inherit it.
        processor.chat_template = chat_template
    elif llava_args.vision_model_name_or_path and llava_args.language_model_name_or_path:
        model, processor = load_pretrained_parts(
            llava_args.vision_model_name_or_path,
            llava_args.language_model_name_or_path,
            projector_type=llava_args.projector_type,
            chat_template=llava_args.chat_template or default_template,
            image_aspect_ratio=llava_args.image_aspect_ratio,
            dtype=dtype,
            vision_feature_layer=llava_args.vision_feature_layer,
            vision_feature_select_strategy=llava_args.vision_feature_select_strategy,
            image_token_pooling=llava_args.image_token_pooling,
            projector_layernorm=llava_args.projector_layernorm,
            vision_feature_norm=llava_args.vision_feature_norm,
        )
        processor.chat_template = chat_template
    else:
        raise ValueError(
            "Give --model_name_or_path (a llava_plugin checkpoint) or both --vision_model_name_or_path and "
            "--language_model_name_or_path (pretrained parts)."
        )
    if llava_args.projector_path:
        load_projector(model, llava_args.projector_path)
    return model, processor


def load_projector(model, path) -> None:
    """Loads a `mm_projector.safetensors` (ours) onto `model`; a mismatch names the keys or shapes."""
    path = Path(path)
    if path.is_dir():
        path = path / PROJECTOR_FILE
    state = load_file(path)
    projector = model.model.multi_modal_projector
    expected = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise ValueError(f"{path}: projector weights {found} do not fit this model's projector {expected}.")
    projector.load_state_dict(state)


@torch.no_grad()
def fit_vision_feature_norm(
    model, processor, dataset, feature_cache: VisionFeatureCache | None = None, max_images: int = 1024,
    batch_size: int = 64,
) -> bool:
    """Fits the projector's `feature_mean`/`feature_std` on the tower features of the first `max_images` training
    images, if the model has them and they are still the identity (a stage-1 start); a trained projector keeps the
    statistics it was trained with. The features come from `feature_cache` when there is one (no second tower pass).
    Every process of a DDP run computes the same numbers from the same images."""
    projector = model.model.multi_modal_projector
    if not hasattr(projector, "feature_mean"):
        return False
    if projector.feature_mean.any() or not torch.equal(projector.feature_std, torch.ones_like(projector.feature_std)):
        return False
    images = []
    for rows in dataset.select_columns(["images"]).iter(batch_size=256):
        images += [image for row in rows["images"] for image in row]
        if len(images) >= max_images:
            break
    images = images[:max_images]
    if not images:
        raise ValueError("vision_feature_norm: the training data has no images to fit the feature statistics on.")
    device = projector.feature_mean.device

    def features_of(batch):
        if feature_cache is not None:
            return feature_cache.features(batch)
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        return model.model.get_vision_features(pixel_values)

    features = torch.cat([
        features_of(images[i : i + batch_size]).to(device, torch.float32).flatten(0, 1)
        for i in range(0, len(images), batch_size)
    ])
    projector.feature_mean.copy_(features.mean(0))
    projector.feature_std.copy_(features.std(0).clamp_min(1e-6))
    print(f"[llava] vision_feature_norm: fitted on {len(images)} images (mean rms "
          f"{features.mean(0).pow(2).mean().sqrt():.3f}, std mean {features.std(0).mean():.3f})")
    return True


def set_trainable(model, tune: str) -> None:
    """Freezes what the stage does not train. The vision tower never trains."""
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if tune == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)


def check_trainable(model, tune: str) -> tuple[int, int]:
    """Logs trainable/total parameters and fails loudly if a parameter outside the stage's set would train."""
    allowed = {
        "projector": ("multi_modal_projector",),
        "full": ("multi_modal_projector", "language_model", "lm_head"),
        "lora": ("multi_modal_projector", "lora_"),
    }[tune]
    trainable, total, offenders = 0, 0, []
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            if not any(part in name for part in allowed) or "vision_tower" in name:
                offenders.append(name)
    print(f"[llava] tune={tune}: trainable params {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)")
    if offenders:
        raise RuntimeError(f"tune={tune} must not train these parameters: {offenders[:10]}")
    if trainable == 0:
        raise RuntimeError(f"tune={tune}: nothing is trainable.")
    return trainable, total


def lora_target_regex(model) -> str:
    """Every Linear layer of the language model, and nothing of the tower or the projector."""
    names = sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.model.language_model.named_modules()
         if isinstance(module, torch.nn.Linear)}
    )
    return rf"model\.language_model\..*\.({'|'.join(map(re.escape, names))})"


# -- data -----------------------------------------------------------------------------------------------------------


def add_batch_groups(dataset, field_name: str, path):
    """A `batch_group` column from each record's `field_name` (kept by the loader among the record's extra fields)."""
    groups = []
    for record_id, meta in zip(dataset["id"], dataset["llava_meta"]):
        extra = json.loads(meta or "{}").get("extra", {})
        if field_name not in extra:
            raise LlavaDataError(path, record_id, field_name, "missing", f"no value to group batches by (--group_batches_by {field_name})")
        groups.append(str(extra[field_name]))
    return dataset.add_column("batch_group", groups)


def prepare_dataset(path, data_args: DataArguments, processor, max_length: int | None, seed: int):
    """LLaVA JSON -> TRL-ready dataset with a `length` column (for length grouping) and the overlong policy applied."""
    dataset = load_llava_json(
        path,
        data_args.image_folder,
        policy=data_args.data_policy,
        image_placement=data_args.image_placement,
        seed=seed,
    )
    if data_args.max_train_samples is not None:
        dataset = dataset.select(range(min(data_args.max_train_samples, len(dataset))))
    if data_args.group_batches_by:
        dataset = add_batch_groups(dataset, data_args.group_batches_by, path)
    # Only messages + images go to the collator (TRL would read an `image` column as the image itself).
    dataset = dataset.remove_columns([c for c in ("image", "image_file", "llava_meta") if c in dataset.column_names])
    tokenizer, image_id, per_image = processor.tokenizer, processor.image_token_id, processor.image_seq_length

    def measure(batch):
        texts = processor.apply_chat_template(batch["messages"])
        ids = tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
        lengths, image_ends = [], []
        for row in ids:
            # Each <image> becomes `per_image` tokens: where does the last image token land?
            positions = [i for i, t in enumerate(row) if t == image_id]
            n_images = len(positions)
            lengths.append(len(row) + n_images * (per_image - 1))
            image_ends.append(positions[-1] + 1 + n_images * (per_image - 1) if positions else 0)
        return {"length": lengths, "image_end": image_ends}

    dataset = dataset.map(measure, batched=True, batch_size=512, desc="Measuring lengths")
    if max_length is not None:
        overlong = [i for i, end in enumerate(dataset["image_end"]) if end > max_length]
        if overlong and data_args.overlong_policy == "error":
            first = dataset[overlong[0]]
            raise ValueError(
                f"{path}: record {first['id']!r} (field 'conversations') needs {first['image_end']} tokens to keep "
                f"its image tokens but max_length is {max_length}; {len(overlong)} record(s) are like it. Raise "
                "--max_length or pass --overlong_policy skip."
            )
        if overlong:
            keep = sorted(set(range(len(dataset))) - set(overlong))
            print(f"[llava] {path}: skipped {len(overlong)} record(s) whose image tokens would not fit max_length={max_length}")
            dataset = dataset.select(keep)
        dataset = dataset.map(lambda row: {"length": min(row["length"], max_length)}, desc="Clipping lengths")
    return dataset.remove_columns("image_end")


# -- resuming -------------------------------------------------------------------------------------------------------

RESUME_LAST = ("last", "auto", "true")


def incomplete_checkpoint_reason(folder) -> str | None:
    """None when `folder` is a complete Trainer checkpoint, else what is wrong with it.

    The Trainer writes a checkpoint in place (weights, optimizer, RNG state, then `trainer_state.json` last) with no
    temporary folder, so a run killed while saving leaves a folder that looks like a checkpoint but is not one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json (the Trainer writes it last: the save was interrupted)"
    except (ValueError, UnicodeDecodeError):
        return "trainer_state.json is cut off"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            return f"{index.name} is unreadable"
    else:
        shards = [n for n in ("model.safetensors", "adapter_model.safetensors") if (folder / n).is_file()][:1]
    if not shards:
        return "no weights (model.safetensors)"
    for shard in shards:
        try:
            with safe_open(folder / shard, framework="pt"):  # checks the header against the file's length
                pass
        except Exception as error:  # noqa: BLE001 - missing, truncated or garbled: all mean "not complete"
            return f"{shard} is missing or unreadable ({type(error).__name__})"
    return None


def resolve_resume_checkpoint(value: str | None, output_dir) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder, or `last` (also `auto`/`true`) for the newest *complete*
    `checkpoint-N` in `output_dir` (None: start from scratch). A given folder that is incomplete is an error."""
    if value is None or str(value).strip() == "":
        return None
    if str(value).lower() in RESUME_LAST:
        folders = [f for f in Path(output_dir).glob("checkpoint-*") if f.name.split("-")[-1].isdigit()] \
            if Path(output_dir).is_dir() else []
        for folder in sorted(folders, key=lambda f: int(f.name.split("-")[-1]), reverse=True):
            reason = incomplete_checkpoint_reason(folder)
            if reason is None:
                print(f"[llava] resuming from {folder}")
                return str(folder)
            print(f"[llava] not resuming from {folder}: {reason}")
        print(f"[llava] no complete checkpoint in {output_dir}: starting from scratch")
        return None
    reason = incomplete_checkpoint_reason(value)
    if reason is not None:
        raise ValueError(f"--resume_from_checkpoint {value}: not a complete checkpoint: {reason}.")
    return str(value)


# -- trainer --------------------------------------------------------------------------------------------------------


class LlavaSFTTrainer(SFTTrainer):
    """SFTTrainer plus LLaVA's needs: a separate projector learning rate; the `length` and `batch_group` columns kept
    for grouped sampling (TRL keeps only the message/image columns of vision datasets): by length, by modality too
    when image and text-only records mix, by record group with `--group_batches_by`; and the frozen-tower feature
    cache, through TRL's own collator."""

    def __init__(
        self, *args, projector_lr: float | None = None, vision_feature_cache: VisionFeatureCache | None = None,
        **kwargs,
    ):
        self.projector_lr = projector_lr
        super().__init__(*args, **kwargs)
        if vision_feature_cache is not None:
            if not hasattr(self.data_collator, "processor"):
                raise ValueError("vision_feature_cache needs TRL's vision collator (a collator with a `processor`).")
            # Same collator, same text path; only its images become cached `vision_features`.
            processor = cached_feature_processor(self.data_collator.processor, vision_feature_cache)
            self.data_collator = dataclasses.replace(self.data_collator, processor=processor)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._is_vision_dataset:
            kept = [c for c in ("length", "batch_group") if c not in self._signature_columns]
            self._signature_columns = [*self._signature_columns, *kept]

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        columns = getattr(dataset, "column_names", None) or []
        by_length = self.args.train_sampling_strategy == "group_by_length" and "length" in columns
        if "batch_group" in columns:
            # Equal lengths leave the order within each group random.
            lengths = dataset["length"] if by_length else [0] * len(dataset)
            return ModalityLengthGroupedSampler(lengths, dataset["batch_group"], self.args.per_device_train_batch_size)
        if by_length and "images" in columns:
            has_image = [n > 0 for n in image_counts(dataset)]
            if any(has_image) and not all(has_image):
                return ModalityLengthGroupedSampler(dataset["length"], has_image, self.args.per_device_train_batch_size)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        uses_trl_extras = self.args.loss_type != "nll" or self.label_smoother is not None or self.aux_loss_enabled
        if self.args.device.type != "cpu" or uses_trl_extras:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # On CPU, TRL's fused LM head scores every position, in fp32 tiles (it keeps only the labelled ones where Triton
        # runs): on the miniature that is ~60% of a stage-2 step, and the model's own logits and loss make the step
        # 1.35x faster (0.18 vs 0.24 s, measured). The full logits it spares matter on a GPU, where TRL's path stays.
        inputs["use_cache"] = False
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        self._record_token_metrics(outputs.logits, inputs["labels"], inputs.get("attention_mask"))
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record_token_metrics(self, logits, labels, attention_mask) -> None:
        """The metrics TRL's own loss path logs (entropy, mean_token_accuracy, num_tokens), over the labelled
        positions."""
        mode = "train" if self.model.training else "eval"
        targets = labels[:, 1:]
        mask = targets != -100
        scored = logits[:, :-1][mask].float()
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(mask.sum()).sum()
        entropy_sum = gather(entropy_from_logits(scored).sum()).sum()
        num_correct = gather((scored.argmax(-1) == targets[mask]).sum()).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train" and attention_mask is not None:
            self._total_train_tokens += gather(attention_mask.sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def create_optimizer(self, model=None):
        if self.projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        decay = set(self.get_decay_parameter_names(self.model))
        groups = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            lr = self.projector_lr if "multi_modal_projector" in name else self.args.learning_rate
            wd = self.args.weight_decay if name in decay else 0.0
            groups.setdefault((lr, wd), []).append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        self.optimizer = optimizer_cls(
            [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()],
            **optimizer_kwargs,
        )
        return self.optimizer


def resolve_defaults(llava_args: LlavaArguments, training_args: "LlavaSFTConfig", model_args: ModelConfig) -> str:
    """Fills what the recipe left to the machine and the stage; returns the `tune` mode."""
    if llava_args.stage not in ("stage1", "stage2"):
        raise ValueError(f"Unknown stage {llava_args.stage!r}: expected 'stage1' or 'stage2'.")
    tune = llava_args.tune or ("projector" if llava_args.stage == "stage1" else "lora" if model_args.use_peft else "full")
    if tune not in ("projector", "full", "lora"):
        raise ValueError(f"Unknown tune {tune!r}: expected 'projector', 'full' or 'lora'.")
    if llava_args.stage == "stage1" and tune != "projector":
        raise ValueError("Stage 1 trains the projector only (--tune projector).")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and tune != "lora":
        raise ValueError("A quantized LM can only be trained through LoRA adapters: add --use_peft (QLoRA).")
    model_args.use_peft = tune == "lora"
    if not training_args.assistant_only_loss:
        raise ValueError("LLaVA trains on the assistant's answers only: keep assistant_only_loss=True.")
    if training_args.gradient_checkpointing:
        training_args.gradient_checkpointing_kwargs = training_args.gradient_checkpointing_kwargs or {
            "use_reentrant": False
        }
    return tune


def main(argv: list[str] | None = None) -> dict:
    parser = TrlParser((LlavaArguments, DataArguments, LlavaSFTConfig, ModelConfig))
    llava_args, data_args, training_args, model_args = parser.parse_args_and_config(argv)
    tune = resolve_defaults(llava_args, training_args, model_args)
    set_seed(training_args.seed)

    model, processor = build_model_and_processor(llava_args, model_args)
    set_trainable(model, tune)
    peft_config = None
    if tune == "lora":
        model_args.lora_target_modules = model_args.lora_target_modules or lora_target_regex(model)
        model_args.lora_modules_to_save = model_args.lora_modules_to_save or ["multi_modal_projector"]
        peft_config = get_peft_config(model_args)

    train_dataset = prepare_dataset(
        data_args.data_path, data_args, processor, training_args.max_length, training_args.seed
    )
    eval_dataset = None
    if data_args.eval_data_path:
        eval_dataset = prepare_dataset(
            data_args.eval_data_path, data_args, processor, training_args.max_length, training_args.seed
        )

    feature_cache = None
    if llava_args.vision_feature_cache:
        # Built by the first process of each machine; the others wait, then only check and read it.
        with training_args.main_process_first(local=True, desc="vision feature cache"):
            mixed = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
            if training_args.local_process_index == 0:
                feature_cache = build_feature_cache(
                    llava_args.vision_feature_cache, model, processor, [train_dataset, eval_dataset],
                    device=training_args.device, dtype=mixed,
                )
            else:
                feature_cache = VisionFeatureCache.for_model(llava_args.vision_feature_cache, model, processor, mixed)
    fit_vision_feature_norm(model, processor, train_dataset, feature_cache)

    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # we push once, with our card
    trainer = LlavaSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
        projector_lr=llava_args.projector_lr,
        vision_feature_cache=feature_cache,
    )
    check_trainable(trainer.model, tune)
    if training_args.train_budget_minutes is not None:
        TrainingBudgetCallback(
            60 * training_args.train_budget_minutes, training_args.budget_calibration_steps
        ).attach(trainer)
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    result = trainer.train(resume_from_checkpoint=resume)

    summary = save_stage_checkpoint(
        trainer, processor, training_args.output_dir, llava_args=llava_args, data_args=data_args,
        model_args=model_args, tune=tune, train_result=result,
    )
    if push_to_hub and trainer.is_world_process_zero():
        from hub_cards.push import push_checkpoint  # noqa: PLC0415

        push_checkpoint(training_args.output_dir, training_args.hub_model_id, token=training_args.hub_token)
    return summary


if __name__ == "__main__":
    main()
