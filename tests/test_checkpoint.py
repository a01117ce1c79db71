"""A saved checkpoint is self-contained: it loads and answers in a process that cannot import this repository."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO
from PIL import Image
from safetensors.torch import load_file


CHILD = textwrap.dedent(
    """
    import hashlib, json, sys
    REPO = sys.argv[2]
    assert not any(p and REPO in p for p in sys.path), sys.path
    for name in ("modeling_llava", "processing", "training", "hub_cards", "evaluation", "examples"):
        sys.modules[name] = None  # importing any package of this repository now fails

    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, pipeline

    folder = sys.argv[1]
    report = {}
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        model = auto.from_pretrained(folder, trust_remote_code=True)
        report[auto.__name__] = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "sha256": {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
                       for k, v in model.state_dict().items()},
        }
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    report["processor"] = {"class": type(processor).__name__, "module": type(processor).__module__}

    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    image = Image.open(sys.argv[3])
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "what color is the circle?"}]}]
    out = pipe(text=messages, generate_kwargs={"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False})
    report["pipeline_answer"] = out[0]["generated_text"][-1]["content"]
    print("REPORT" + json.dumps(report))
    """
)


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_checkpoint_loads_and_answers_without_this_repo(tmp_path, projector):
    folder = tmp_path / "ckpt"
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "make_tiny_checkpoint.py"), str(folder), "--projector", projector],
        check=True, capture_output=True, cwd=tmp_path,
    )
    image_path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(image_path)
    (tmp_path / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")  # remote code is imported fresh, from the folder only
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "child.py"), str(folder), str(REPO), str(image_path)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT", 1)[1])

    saved = load_file(folder / "model.safetensors")
    expected = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in saved.items()}
    for auto in ("AutoModelForCausalLM", "AutoModelForImageTextToText"):
        assert report[auto]["class"] == "LlavaForCausalLM"
        assert report[auto]["module"].startswith("transformers_modules.")  # the copied code, not this repo
        assert {k: report[auto]["sha256"][k] for k in expected} == expected  # bit-identical weights
    assert report["processor"]["class"] == "LlavaProcessor"
    assert report["processor"]["module"].startswith("transformers_modules.")

    # The pipeline answers exactly what the model generates greedily here.
    import modeling_llava  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image_path)},
                                             {"type": "text", "text": "what color is the circle?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert report["pipeline_answer"] == answer


def test_config_json_maps_every_auto_class(tmp_path, tiny_llava):
    model, processor = tiny_llava
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llava_plugin"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_llava.LlavaConfig",
        "AutoModel": "modeling_llava.LlavaModel",
        "AutoModelForCausalLM": "modeling_llava.LlavaForCausalLM",
        "AutoModelForImageTextToText": "modeling_llava.LlavaForCausalLM",
    }
    processor_config = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_llava.LlavaProcessor"}
    # A saved name would resolve to transformers' own LlavaProcessor, which cannot read this folder.
    assert "processor_class" not in processor_config
    assert "processor_class" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "{% generation %}" in (tmp_path / "chat_template.jinja").read_text().replace("{%-", "{%").replace(
        " -%}", " %}"
    )


def test_weights_load_into_aligned_memory(tmp_path, tiny_llava):
    """safetensors weights on CPU are views into the mmapped file at 8-byte alignment only; loading copies the
    misaligned ones so that matmuls read whole cache lines, without changing a value or untying a weight."""
    from modeling_llava import LlavaForCausalLM
    from modeling_llava.modeling_llava import CPU_ALIGNMENT, align_cpu_tensors

    model, _ = tiny_llava
    model.save_pretrained(tmp_path)
    reloaded = LlavaForCausalLM.from_pretrained(tmp_path)
    assert all(p.data_ptr() % CPU_ALIGNMENT == 0 for p in reloaded.parameters())
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in reloaded.state_dict().items())

    # A module with a weight deliberately 4 bytes off, shared by two layers, frozen.
    shared = torch.nn.Linear(16, 16, bias=False)
    shared.weight = torch.nn.Parameter(torch.empty(16 * 16 + 1)[1:].view(16, 16).copy_(shared.weight),
                                       requires_grad=False)
    module = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Linear(16, 16, bias=False)})
    module["b"].weight = shared.weight
    before = shared.weight.detach().clone()
    assert shared.weight.data_ptr() % CPU_ALIGNMENT
    assert align_cpu_tensors(module) == 1
    assert module["a"].weight is module["b"].weight and not module["a"].weight.requires_grad
    assert module["a"].weight.data_ptr() % CPU_ALIGNMENT == 0 and torch.equal(module["a"].weight, before)
    assert align_cpu_tensors(module) == 0
