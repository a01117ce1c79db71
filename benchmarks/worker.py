"""One participant of one measurement (ours or the peer, training or generating), in its own process.

Each participant runs in a separate process so that its peak memory is its own and no side inherits the other's
warm caches. Participants of a measurement start together and then take turns: the runner hands a baton (a "go"
over a pipe) to one participant at a time, which runs one timed window and hands it back. Slow drifts of the
machine (another job starting, thermal limits) then hit every side alike, and nobody computes while another is
timed. Each window records wall time and the process's CPU time: on a shared CPU, where a process may sit on a
busy core for a whole window, CPU time is the fair measure of the work done.
"""

import os
import re
import resource
import tempfile
import time
import warnings
from pathlib import Path


def _quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import datasets  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def _sync():
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> dict:
    """Peak GPU memory allocated by torch on a GPU, else the process's peak resident set size.

    On Linux the peak RSS is read from /proc/self/status (VmHWM): `getrusage`'s ru_maxrss survives `exec`, so a
    spawned worker would report its parent's size whenever that was larger.
    """
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        return {"kind": "cuda_max_memory_allocated", "bytes": torch.cuda.max_memory_allocated()}
    try:
        status = Path("/proc/self/status").read_text()
        return {"kind": "peak_rss", "bytes": int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024}
    except (OSError, AttributeError):
        return {"kind": "peak_rss", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


class BatchRecorder:
    """Forward pre-hook: what each batch fed to the model held (rows, real tokens, padded slots, images)."""

    def __init__(self):
        self.reset()
        self.all = {"rows": 0, "tokens": 0, "slots": 0}

    def reset(self):
        self.window = {"rows": 0, "tokens": 0, "slots": 0, "images": 0, "calls": 0}

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None or not module.training:
            return
        rows, tokens, slots = mask.shape[0], int(mask.sum()), mask.numel()
        images = kwargs.get("pixel_values", kwargs.get("vision_features"))
        for stats in (self.window, self.all):
            stats["rows"] += rows
            stats["tokens"] += tokens
            stats["slots"] += slots
        self.window["images"] += 0 if images is None else images.shape[0]
        self.window["calls"] += 1


def _baton_callback(conn, recorder, warmup: int, windows: int, steps: int):
    from transformers import TrainerCallback  # noqa: PLC0415

    class Baton(TrainerCallback):
        """Waits for the baton before each window, times it, reports it, and stops training after the last."""

        def __init__(self):
            self.window, self.steps, self.start = 0, 0, 0.0

        def _wait(self):
            if conn.recv() != "go":
                raise SystemExit(0)
            recorder.reset()
            _sync()
            self.steps, self.start, self.start_cpu = 0, time.perf_counter(), time.process_time()

        def on_train_begin(self, args, state, control, **kwargs):
            conn.send({"ready": True})  # set up: model, data, optimizer, dataloader
            self._wait()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1
            if self.steps < (warmup if self.window == 0 else steps):
                return
            _sync()
            elapsed, cpu = time.perf_counter() - self.start, time.process_time() - self.start_cpu
            conn.send({"window": self.window, "seconds": elapsed, "cpu_seconds": cpu, "steps": self.steps,
                       **recorder.window})
            self.window += 1
            if self.window > windows:
                control.should_training_stop = True
            else:
                self._wait()

    return Baton()


def _ours_trainer(spec, args_common, out):
    from training import sft  # noqa: PLC0415
    from training.feature_cache import VisionFeatureCache  # noqa: PLC0415

    stage = spec["stage"]
    llava_args = sft.LlavaArguments(stage=stage, chat_template=spec["chat_template"])
    model, processor = sft.build_model_and_processor(llava_args, sft.ModelConfig(model_name_or_path=spec["ours"]))
    sft.set_trainable(model, "projector" if stage == "stage1" else "full")
    args = sft.LlavaSFTConfig(output_dir=out, train_sampling_strategy="group_by_length", **args_common)
    data_args = sft.DataArguments(data_path=spec["data"], image_folder=spec["images"])
    dataset = sft.prepare_dataset(spec["data"], data_args, processor, args.max_length, args.seed)
    cache = VisionFeatureCache.for_model(spec["cache"], model, processor) if spec.get("cache") else None
    trainer = sft.LlavaSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor, vision_feature_cache=cache
    )
    return model, trainer


def _peer_trainer(spec, args_common, out):
    import torch  # noqa: PLC0415
    from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: PLC0415
    from trl import SFTConfig, SFTTrainer  # noqa: PLC0415

    from processing.chat_templates import get_chat_template  # noqa: PLC0415
    from processing.llava_json import load_llava_json  # noqa: PLC0415

    model = LlavaForConditionalGeneration.from_pretrained(spec["peer"])
    processor = AutoProcessor.from_pretrained(spec["peer"])
    processor.chat_template = get_chat_template(spec["chat_template"])
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if spec["stage"] == "stage2":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    cuda = torch.cuda.is_available()
    args = SFTConfig(output_dir=out, assistant_only_loss=True, bf16=cuda, use_cpu=not cuda, **args_common)
    dataset = load_llava_json(spec["data"], spec["images"])
    # The same records; a column named `image` would be read by TRL as the image itself.
    dataset = dataset.remove_columns([c for c in ("image", "image_file", "llava_meta") if c in dataset.column_names])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    return model, trainer


def train(spec: dict, conn) -> None:
    """A training participant: `spec` names the side, stage, data, sizes and the timing schedule."""
    _quiet()
    import torch  # noqa: PLC0415
    from transformers.trainer_callback import PrinterCallback  # noqa: PLC0415

    torch.set_num_threads(spec["threads"])
    steps = spec["warmup_steps"] + spec["windows"] * spec["steps_per_window"]
    args_common = dict(
        per_device_train_batch_size=spec["batch_size"], max_steps=steps, learning_rate=spec["lr"],
        lr_scheduler_type="constant", report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, gradient_checkpointing=False, dataloader_num_workers=0, max_length=2048,
        seed=spec["seed"],
    )
    with tempfile.TemporaryDirectory() as out:
        build = _ours_trainer if spec["side"] == "ours" else _peer_trainer
        model, trainer = build(spec, args_common, out)
        recorder = BatchRecorder()
        model.register_forward_pre_hook(recorder, with_kwargs=True)
        trainer.remove_callback(PrinterCallback)  # the run's log dict would land in the benchmark's output
        trainer.add_callback(_baton_callback(conn, recorder, spec["warmup_steps"], spec["windows"], spec["steps_per_window"]))
        trainer.train()
        # Padding over a whole epoch of this trainer's own sampling order (its sampler x the records' lengths).
        order = list(trainer._get_train_sampler())
        lengths, size = spec["lengths"], spec["batch_size"]
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        epoch_padding = 1 - sum(lengths) / slots
    fed = recorder.all
    conn.send({
        "done": True, "peak_memory": peak_memory(), "padding_fed": 1 - fed["tokens"] / max(1, fed["slots"]),
        "padding_epoch": epoch_padding, "fed": fed,
    })


def generate(spec: dict, conn) -> None:
    """A generation participant: greedy generation with the KV cache, batch sizes taking turns with the peer.

    One process is one sample of the runner's generation measurement (a fresh process per round); each timed call
    also reports the minor page faults it took, the allocator noise `benchmarks/run.py` sets glibc up to avoid.
    """
    _quiet()
    import hashlib  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec["side"] == "ours":
        from modeling_llava import LlavaForCausalLM, LlavaProcessor  # noqa: PLC0415

        model, processor = LlavaForCausalLM.from_pretrained(spec["ours"]), LlavaProcessor.from_pretrained(spec["ours"])
    else:
        from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: PLC0415

        model = LlavaForConditionalGeneration.from_pretrained(spec["peer"])
        processor = AutoProcessor.from_pretrained(spec["peer"])
    model = model.to(device).eval()
    questions = ["What color is the circle?", "How many shapes are in the image?", "Describe the image in detail.",
                 "Is there a red square in the image?"]
    inputs = {}
    for size in spec["generation_batches"]:
        conversations = [
            [{"role": "user", "content": [{"type": "image", "image": Image.open(spec["image_files"][i]).convert("RGB")},
                                          {"type": "text", "text": questions[i % len(questions)]}]}]
            for i in range(size)
        ]
        inputs[size] = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        ).to(device)
    settings = dict(max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], do_sample=False,
                    pad_token_id=processor.tokenizer.pad_token_id)
    with torch.inference_mode():
        for size in spec["generation_batches"]:  # warm-up, untimed
            model.generate(**inputs[size], **{**settings, "max_new_tokens": 2, "min_new_tokens": 2})
        # The allocator settings this process started with (the runner checks every process got the same).
        conn.send({"ready": True, "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}})
        while (message := conn.recv()) != "stop":
            size = message["batch"]
            _sync()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start, start_cpu = time.perf_counter(), time.process_time()
            output = model.generate(**inputs[size], **settings)
            _sync()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            prompt = inputs[size]["input_ids"]
            conn.send({
                "batch": size, "seconds": elapsed, "cpu_seconds": cpu, "minor_faults": faults,
                "new_tokens": int(output.shape[0] * (output.shape[1] - prompt.shape[1])),
                "tokens": output[:, prompt.shape[1]:].tolist(),
                "prompt_digest": hashlib.sha256(prompt.cpu().numpy().tobytes()).hexdigest(),
            })
    conn.send({"done": True, "peak_memory": peak_memory()})
