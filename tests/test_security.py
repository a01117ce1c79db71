"""Security: safetensors-only weights, remote code that stays in its folder, no eval of model or teacher output, and
API keys that never leave the environment."""

import ast
import json
import os
from pathlib import Path

import pytest
from conftest import REPO
from http_fixtures import ScriptedServer
from PIL import Image

# The repository's own code (tests excluded: they may do what the package must not).
PACKAGES = ("modeling_llava", "processing", "training", "evaluation", "hub_cards", "examples")
NETWORK_OR_PROCESS_MODULES = {"requests", "urllib", "urllib3", "http", "httpx", "httpx2", "socket", "ssl", "ftplib",
                              "smtplib", "subprocess", "multiprocessing", "pickle", "shutil", "huggingface_hub", "ctypes"}
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__", "breakpoint"}
FORBIDDEN_OS_CALLS = {"system", "popen", "spawnl", "spawnv", "execv", "execvp", "startfile", "remove", "unlink", "rmdir",
                      "removedirs", "rename", "replace", "chmod", "chdir"}


def package_files():
    files = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 30  # the scan really covers the code
    return files


def call_name(node: ast.Call) -> str:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_weights_are_saved_as_safetensors_and_pickles_read_with_weights_only():
    loads = []
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = dotted(node.func)
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            assert name != "torch.save", f"{where}: torch.save writes a pickle; save weights with safetensors"
            assert not (name.endswith("save_pretrained") and any(
                k.arg == "safe_serialization" and isinstance(k.value, ast.Constant) and k.value.value is False
                for k in node.keywords)), f"{where}: safe_serialization=False"
            if name == "torch.load":
                keywords = {k.arg: k.value for k in node.keywords}
                assert isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True, where
                loads.append(where)
    assert loads and all(w.startswith("modeling_llava/convert_") for w in loads)  # the `.bin` importer only


def test_a_malicious_bin_is_refused_by_the_importer(tmp_path):
    """A pickle that would run code on load: the `.bin` reader refuses it and the code never runs."""
    import pickle

    from modeling_llava.convert_llava_hf import ConversionError, load_weight_file

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": Evil()}))
    with pytest.raises(ConversionError, match="weights_only=True"):
        load_weight_file(path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, tiny_llava):
    model, processor = tiny_llava
    folder = tmp_path_factory.mktemp("remote_code") / "ckpt"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_remote_code_in_checkpoints_touches_nothing_outside_its_folder(saved_checkpoint):
    code_files = sorted(saved_checkpoint.glob("*.py"))
    assert {p.name for p in code_files} >= {"configuration_llava.py", "modeling_llava.py", "processing_llava.py"}
    assert not list(saved_checkpoint.glob("*.bin")) and list(saved_checkpoint.glob("*.safetensors"))
    for path in code_files:
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert name.split(".")[0] not in NETWORK_OR_PROCESS_MODULES, f"{where}: imports {name}"
            if isinstance(node, ast.Call):
                name, full = call_name(node), dotted(node.func)
                assert not (isinstance(node.func, ast.Name) and name in FORBIDDEN_BUILTINS), f"{where}: calls {name}"
                assert not (full.startswith("os.") and name in FORBIDDEN_OS_CALLS), f"{where}: calls {full}"
                if name == "open":
                    # Only `save_pretrained` opens files, and only `os.path.join(save_directory, <constant>)`.
                    function = node
                    while not isinstance(function, ast.FunctionDef):
                        function = parents[function]
                    assert function.name == "save_pretrained", f"{where}: open() outside save_pretrained"
                    target = node.args[0]
                    assert isinstance(target, ast.Name), where
                    sources = [a.value for a in ast.walk(function) if isinstance(a, ast.Assign)
                               and any(isinstance(t, ast.Name) and t.id == target.id for t in a.targets)]
                    assert len(sources) == 1 and dotted(sources[0].func) == "os.path.join", where
                    first, rest = sources[0].args[0], sources[0].args[1:]
                    assert isinstance(first, ast.Name) and first.id == "save_directory", where
                    assert all(isinstance(a, ast.Constant) for a in rest), where


def test_no_eval_exec_or_shell_anywhere_in_the_package():
    """Model and teacher output is only ever parsed as text/JSON: nothing in the package can run it."""
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call):
                full = dotted(node.func)
                # model.eval() and re.compile() are methods; the builtins are called by bare name.
                assert not (isinstance(node.func, ast.Name) and node.func.id in {"eval", "exec", "compile", "__import__"}), \
                    f"{where}: {full}()"
                assert full not in {"builtins.eval", "builtins.exec"}, f"{where}: {full}()"
                assert full not in {"os.system", "os.popen", "pickle.loads", "pickle.load", "yaml.load"}, f"{where}: {full}()"
                assert not any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                               for k in node.keywords), f"{where}: shell=True"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in {"subprocess", "marshal"} for n in names), f"{where}: {names}"


# ---------------------------------------------------------------------------------------------------------------------
# API keys: from the environment only, never written anywhere
# ---------------------------------------------------------------------------------------------------------------------

FAKE_KEY = "sk-hardening-FAKE-0123456789abcdef"
FAKE_HF_TOKEN = "hf_hardeningFAKEtoken0123456789"


def test_api_keys_never_reach_outputs_cards_logs_or_checkpoints(tiny_llava, tmp_path, monkeypatch, capfd, caplog):
    import logging

    import huggingface_hub.constants

    from processing.generate import generate_from_annotations, jsonl_to_llava_json
    from processing.synthetic import make_scene_world
    from processing.teachers import OpenAICompatibleTeacher, SymbolicTeacher
    from training import sft

    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the local server only
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    server = ScriptedServer(default=lambda body: SymbolicTeacher(seed=0).complete(body["messages"]))
    server.script = [(429, {"Retry-After": "0"}, {"error": "retry me"}, 0), (401, {}, {"error": "bad key"}, 0)]
    try:
        world = make_scene_world(tmp_path / "world", 4, "train", seed=0)
        teacher = OpenAICompatibleTeacher(server.url, "teacher-model", sleep=lambda s: None)  # key from OPENAI_API_KEY
        data = tmp_path / "data"
        stats = generate_from_annotations(world.annotations_dir, "train", teacher, data / "instruct.jsonl",
                                          types=["conversation"], progress=False)
    finally:
        server.close()
    assert stats.written == 3 and stats.teacher_errors == 1  # the 401 error is reported: its message must not leak
    assert server.requests[-1]["headers"]["authorization"] == f"Bearer {FAKE_KEY}"  # the key really was in use
    jsonl_to_llava_json(data / "instruct.jsonl", data / "instruct.json")

    model, processor = tiny_llava
    base = tmp_path / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    out = tmp_path / "stage2"
    sft.main([
        "--stage", "stage2", "--model_name_or_path", str(base), "--data_path", str(data / "instruct.json"),
        "--image_folder", str(world.images_dir), "--output_dir", str(out), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "steps", "--save_steps", "1",
        "--logging_steps", "1", "--max_length", "512", "--gradient_checkpointing", "false",
    ])
    assert (out / "README.md").is_file() and (out / "checkpoint-2" / "trainer_state.json").is_file()

    captured = capfd.readouterr()
    logs = captured.out + captured.err + caplog.text + json.dumps(stats.to_dict())
    assert "bad key" in logs or "401" in logs  # the logs are real: the teacher error is in them
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 30 and any(p.name == "training_args.bin" for p in written)
    for secret in (FAKE_KEY, FAKE_HF_TOKEN, FAKE_KEY[3:]):
        assert secret not in logs
        leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert leaks == [], f"{secret} written to {leaks}"
