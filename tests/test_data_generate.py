"""Generation pipeline: reply parsing, grounding filter, resumable JSONL output, CLI and conversion."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from processing.coco import load_coco_contexts  # noqa: E402
from processing.generate import (  # noqa: E402
    GroundingFilter,
    ReplyParseError,
    generate_from_annotations,
    generate_instructions,
    grounding_filter_for,
    jsonl_to_llava_json,
    main,
    parse_reply,
    read_done_keys,
)
from processing.llava_json import load_llava_json  # noqa: E402
from processing.synthetic import make_scene_world  # noqa: E402
from processing.teachers import SymbolicTeacher, TeacherError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TYPES = ("conversation", "detail", "complex")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_scene_world(tmp_path_factory.mktemp("world"), 24, "train", seed=2)


@pytest.fixture(scope="module")
def contexts(world):
    return load_coco_contexts(world.captions_path, world.instances_path)


def read_records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def keyed(records):
    return {(str(r["image_id"]), r["type"]): r for r in records}


# ---------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------


def test_parse_conversation_tolerates_markdown_and_preamble():
    reply = "Sure! Here you go:\n\n**Question:** What is red?\n**Answer:** The circle.\nIt is round.\n- Q: And blue?\nA: Nothing."
    assert parse_reply("conversation", reply) == [("What is red?", "The circle.\nIt is round."), ("And blue?", "Nothing.")]
    # A reply cut by max_tokens loses only its unanswered question.
    assert parse_reply("conversation", "Question: a?\nAnswer: b.\nQuestion: c?") == [("a?", "b.")]


@pytest.mark.parametrize(
    "kind, reply, message",
    [
        ("conversation", "I am a language model and cannot see images.", "no Question"),
        ("conversation", "", "empty reply"),
        ("conversation", "Answer: hi\nQuestion: why?\nAnswer: because", "alternating"),
        ("conversation", "Question: a?\nAnswer:\nQuestion: b?\nAnswer: c", "empty"),
        ("conversation", "Question: <image> what?\nAnswer: x", "<image>"),
        ("detail", "The image shows a cat.", "no Question"),
        ("detail", "Question: what?\nAnswer: a cat", "one 'Description:' block"),
        ("complex", "Description: a cat", "Description"),
        ("complex", "Question: why?", "alternating"),
    ],
)
def test_parse_rejects_bad_replies(kind, reply, message):
    with pytest.raises(ReplyParseError, match=message):
        parse_reply(kind, reply)


def test_parse_detail_and_complex():
    assert parse_reply("detail", "Description: A red circle.\nNothing else.") == [(None, "A red circle.\nNothing else.")]
    assert parse_reply("complex", "Question: Why?\nAnswer: Because.\nQuestion: More?\nAnswer: No.") == [("Why?", "Because.")]


# ---------------------------------------------------------------------------------------------------
# Grounding
# ---------------------------------------------------------------------------------------------------


def test_grounding_filter_on_scene_world_words():
    grounding = GroundingFilter(["red circle", "blue square", "green triangle", "blue circle"], split_words=True)
    present = ["red circle", "blue square"]
    assert grounding.ungrounded(["Red. The circle is red and the square is blue."], present) == []
    assert grounding.ungrounded(["A triangle sits below the circle."], present) == ["triangle"]
    assert grounding.ungrounded(["The blue circle is large."], present) == ["blue circle"]
    assert grounding.ungrounded(["Two green shapes."], present) == ["green"]
    # Negated sentences are not claims of presence.
    assert grounding.ungrounded(["No, there is no green triangle. The circle is red."], present) == []
    assert grounding.ungrounded(["There isn't a triangle."], present) == []


def test_grounding_filter_on_coco_categories():
    grounding = GroundingFilter(["person", "dog", "hot dog", "cell phone", "bus"])
    assert grounding.ungrounded(["A man holds a dog."], ["person"]) == ["dog"]
    assert grounding.ungrounded(["Two dogs and three people."], ["person", "dog"]) == []
    assert grounding.ungrounded(["Several buses pass by."], ["person"]) == ["bus"]
    assert grounding.ungrounded(["He eats a hot  dog."], ["person", "hot dog"]) == []
    assert grounding.ungrounded(["He checks his cell phone; the dogma is old."], ["person"]) == ["cell phone"]


class HallucinatingTeacher(SymbolicTeacher):
    """Adds an object that is not in the image to the answers of every third image."""

    def complete(self, messages):
        reply = super().complete(messages)
        context = messages[-1]["content"]
        if "triangle" not in context and sum(map(ord, context)) % 3 == 0:
            return reply.replace("Answer: ", "Answer: A triangle is next to it. ", 1).replace("Description: ", "Description: A triangle is next to it. ", 1)
        return reply


def test_pipeline_drops_ungrounded_samples(contexts, world, tmp_path):
    output = tmp_path / "out.jsonl"
    stats = generate_instructions(
        contexts, HallucinatingTeacher(), output, types=TYPES, grounding=grounding_filter_for(world.instances_path), progress=False
    )
    records = read_records(output)
    assert stats.ungrounded > 0 and stats.ungrounded_terms["triangle"] == stats.ungrounded
    assert stats.written == len(records) == stats.requested - stats.ungrounded
    assert not any("A triangle is next to it" in json.dumps(r) for r in records)


# ---------------------------------------------------------------------------------------------------
# End to end with the symbolic teacher
# ---------------------------------------------------------------------------------------------------


def test_symbolic_generation_writes_loadable_llava_records(contexts, world, tmp_path):
    output = tmp_path / "out.jsonl"
    stats = generate_instructions(
        contexts, SymbolicTeacher(), output, types=TYPES, grounding=grounding_filter_for(world.instances_path),
        concurrency=4, progress=False,
    )
    assert (stats.requested, stats.written, stats.unparsable, stats.ungrounded, stats.teacher_errors) == (72, 72, 0, 0, 0)
    assert stats.written_per_type == {"conversation": 24, "detail": 24, "complex": 24}
    records = read_records(output)
    assert len(keyed(records)) == 72
    first_turns = [r["conversations"][0]["value"] for r in records]
    assert any(v.startswith("<image>\n") for v in first_turns) and any(v.endswith("\n<image>") for v in first_turns)
    details = [r for r in records if r["type"] == "detail"]
    assert len({r["conversations"][0]["value"].replace("<image>", "").strip() for r in details}) >= 5  # sampled instructions

    llava = tmp_path / "out.json"
    assert jsonl_to_llava_json(output, llava) == 72
    converted = json.loads(llava.read_text())
    assert all(list(r) == ["id", "image", "conversations", "type"] for r in converted)
    assert [r["id"] for r in converted][:3] == [f"{contexts[0].image_id}_{t}" for t in TYPES]
    ds = load_llava_json(llava, world.images_dir)
    assert len(ds) == 72 and all(len(images) == 1 for images in ds["images"])


class CountingTeacher(SymbolicTeacher):
    def __init__(self, delay=0.0, fail_after=None, exception=KeyboardInterrupt):
        super().__init__()
        self.delay, self.fail_after, self.exception = delay, fail_after, exception
        self.calls = self.active = self.max_active = 0
        self.lock = threading.Lock()

    def complete(self, messages):
        with self.lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            calls = self.calls
        try:
            if self.fail_after is not None and calls > self.fail_after:
                raise self.exception("injected failure")
            time.sleep(self.delay)
            return super().complete(messages)
        finally:
            with self.lock:
                self.active -= 1


def test_concurrency_is_bounded_and_used(contexts, tmp_path):
    teacher = CountingTeacher(delay=0.01)
    generate_instructions(contexts[:12], teacher, tmp_path / "out.jsonl", types=["conversation"], concurrency=3, progress=False)
    assert teacher.max_active == 3


def test_interrupted_run_resumes_without_duplicates(contexts, tmp_path):
    output = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_instructions(contexts, CountingTeacher(fail_after=20), output, types=TYPES, concurrency=2, progress=False)
    partial = read_records(output)
    assert 0 < len(partial) <= 20
    stats = generate_instructions(contexts, SymbolicTeacher(), output, types=TYPES, concurrency=2, progress=False)
    assert stats.already_done == len(partial) and stats.written == 72 - len(partial)
    records = read_records(output)
    assert len(records) == 72 and len(keyed(records)) == 72


def test_teacher_outage_aborts_after_consecutive_errors(contexts, tmp_path):
    output = tmp_path / "out.jsonl"
    teacher = CountingTeacher(fail_after=0, exception=ConnectionError)
    with pytest.raises(TeacherError, match="5 teacher errors in a row"):
        generate_instructions(contexts, teacher, output, types=TYPES, concurrency=1, max_consecutive_errors=5, progress=False)
    assert output.read_text() == "" and 5 <= teacher.calls <= 7  # at most the in-flight window more


def test_sigkill_midway_then_resume_is_complete_and_duplicate_free(world, tmp_path):
    """Kill a real generation process with SIGKILL, tear its last line, resume, compare with a clean run."""
    output = tmp_path / "killed.jsonl"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from processing.generate import generate_from_annotations
        from processing.teachers import SymbolicTeacher

        class Slow(SymbolicTeacher):
            def complete(self, messages):
                time.sleep(0.05)
                return super().complete(messages)

        generate_from_annotations({str(world.annotations_dir)!r}, "train", Slow(), {str(output)!r}, concurrency=2, progress=False)
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120  # the child first imports torch/transformers
        while time.time() < deadline and process.poll() is None:
            if output.exists() and output.read_text().count("\n") >= 10:
                break
            time.sleep(0.02)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    lines_before = output.read_text().count("\n")
    assert 10 <= lines_before < 72
    # Make the worst case certain: a record torn in the middle of its line.
    with open(output, "a") as f:
        f.write('{"id": "999_detail", "image": "train_0000')

    stats = generate_from_annotations(world.annotations_dir, "train", SymbolicTeacher(), output, progress=False)
    assert stats.torn_bytes_dropped > 0
    assert stats.already_done >= lines_before and stats.already_done + stats.written == 72
    records = read_records(output)
    assert len(records) == 72 and len(keyed(records)) == 72  # complete, no duplicates

    clean = tmp_path / "clean.jsonl"
    generate_from_annotations(world.annotations_dir, "train", SymbolicTeacher(), clean, progress=False)
    assert keyed(records) == keyed(read_records(clean))  # same samples as an uninterrupted run


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"image_id": 1, "type": "detail"}\nnot json\n{"image_id": 2, "type": "detail"}\n')
    with pytest.raises(ValueError, match="line 2 is not a generated record"):
        read_done_keys(path)
    path.write_text('{"image_id": 1, "type": "detail"}\n{"image_id": 2, "ty')
    keys, torn = read_done_keys(path)
    assert keys == {("1", "detail")} and torn == len('{"image_id": 2, "ty')
    assert path.read_text() == '{"image_id": 1, "type": "detail"}\n'


def test_cli_writes_jsonl_llava_json_and_cumulative_stats(world, tmp_path, capsys):
    output, llava = tmp_path / "cli.jsonl", tmp_path / "cli.json"
    argv = [
        "--annotations-dir", str(world.annotations_dir), "--split", "train", "--types", "conversation", "complex",
        "--teacher", "symbolic", "--output", str(output), "--max-images", "5", "--concurrency", "2",
        "--llava-json", str(llava), "--no-progress", "--fsync-interval", "0",
    ]
    stats = main(argv)
    assert stats.written == 10 and "written 10" in capsys.readouterr().out
    assert Counter(r["type"] for r in json.loads(llava.read_text())) == {"conversation": 5, "complex": 5}
    again = main(argv)  # nothing left to do
    assert again.written == 0 and again.already_done == 10
    saved = json.loads(Path(f"{output}.stats.json").read_text())
    assert saved["totals"]["written"] == 10 and saved["teachers"] == ["symbolic"] and len(saved["runs"]) == 2
    with pytest.raises(SystemExit, match="needs --base-url and --model"):
        main([*argv[:7], "--teacher", "openai", "--output", str(output)])
