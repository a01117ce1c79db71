"""LLaVA-Bench: published file formats, the judge prompt, score parsing, relative scores, the reply cache."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from evaluation.__main__ import main as evaluation_main
from evaluation.jsonl import read_jsonl
from evaluation.llava_bench import (
    RuleJudge,
    judge_bench,
    judge_messages,
    load_bench_dir,
    make_scene_bench,
    parse_scores,
)

QUESTIONS = [
    {"question_id": 0, "image": "a.jpg", "text": "What is the man doing?", "category": "conv"},
    {"question_id": 1, "image": "a.jpg", "text": "What color is the bus?", "category": "conv"},
    {"question_id": 2, "image": "a.jpg", "text": "Describe the image in detail.", "category": "detail"},
    {"question_id": 3, "image": "b.jpg", "text": "Why might the road be wet?", "category": "complex"},
    {"question_id": 4, "image": "b.jpg", "text": "What could happen next?", "category": "complex"},
    {"question_id": 5, "image": "b.jpg", "text": "Describe this photo.", "category": "detail"},
]
CONTEXTS = [  # LLaVA-Bench COCO (captions list + boxes) and In-the-Wild (one caption string) forms
    {"id": "a", "image": "a.jpg", "captions": ["A man rides a bus.", "A red bus on a street."],
     "instances": [{"category": "person", "bbox": [0.1, 0.2, 0.3, 0.9]}, {"category": "bus", "bbox": [0.0, 0.1, 1.0, 0.8]}]},
    {"id": "b", "image": "b.jpg", "caption": "A rainy street at night."},
]
REFERENCES = [{"question_id": i, "text": f"reference answer {i}", "answer_id": f"r{i}", "model_id": "gpt-4-0314"} for i in range(6)]
CANDIDATES = {str(i): f"candidate answer {i}" for i in range(6)}
# The judge's reply per question: the formats judges really use, and one it cannot read.
REPLIES = {
    "0": "8 6\nAssistant 1 is more precise.",
    "1": "Assistant 1: 10\nAssistant 2: 9\nBoth correct.",
    "2": "8, 8\nEquivalent.",
    "3": "9/10 and 3/10\nAssistant 2 misses the rain.",
    "4": "**7 5**\nexplanation",
    "5": "Both answers are helpful.",
}


class FakeJudge:
    """A local judge: answers from REPLIES by the candidate it sees, and counts its calls."""

    def __init__(self, name="fake-judge"):
        self.name = name
        self.calls = 0
        self.prompts = []
        self._lock = threading.Lock()

    def complete(self, messages):
        with self._lock:
            self.calls += 1
            self.prompts.append(messages)
        content = messages[-1]["content"]
        qid = content.split("candidate answer ", 1)[1][0]
        return REPLIES[qid]


@pytest.fixture
def bench_dir(tmp_path):
    folder = tmp_path / "bench"
    folder.mkdir()
    for name, rows in (("questions", QUESTIONS), ("context", CONTEXTS), ("answers_gpt4", REFERENCES)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_load_bench_joins_the_published_files(bench_dir):
    bench = load_bench_dir(bench_dir)
    assert [q.question_id for q in bench] == ["0", "1", "2", "3", "4", "5"]
    assert [q.category for q in bench] == ["conversation", "conversation", "detail", "complex", "complex", "detail"]
    assert bench[0].reference == "reference answer 0"
    assert bench[0].context == "A man rides a bus.\nA red bus on a street.\n\nperson: [0.1, 0.2, 0.3, 0.9]\nbus: [0.0, 0.1, 1.0, 0.8]"
    assert bench[3].context == "A rainy street at night."


def test_load_bench_errors_name_file_and_record(bench_dir):
    (bench_dir / "answers_gpt4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REFERENCES[:5]))
    with pytest.raises(ValueError, match=r"questions\.jsonl: question '5' has no reference answer"):
        load_bench_dir(bench_dir)
    (bench_dir / "questions.jsonl").write_text(json.dumps({"question_id": 9, "image": "a.jpg", "text": "?"}) + "\n")
    with pytest.raises(ValueError, match=r"questions\.jsonl: record 1 \(9\): missing field 'category'"):
        load_bench_dir(bench_dir)


def test_judge_prompt_shows_context_question_reference_then_candidate():
    messages = judge_messages("CONTEXT LINE", "THE QUESTION?", "THE REFERENCE", "THE CANDIDATE")
    assert [m["role"] for m in messages] == ["system", "user"]
    content = messages[1]["content"]
    order = [content.index(s) for s in ("[Context]\nCONTEXT LINE", "[Question]\nTHE QUESTION?", "[Assistant 1]\nTHE REFERENCE",
                                        "[End of Assistant 1]", "[Assistant 2]\nTHE CANDIDATE", "[End of Assistant 2]", "[System]")]
    assert order == sorted(order)
    assert "scale of 1 to 10" in content and "first output a single line containing only two values" in content


def test_relative_scores_from_judge_replies_and_failures_counted(bench_dir, tmp_path):
    judge = FakeJudge()
    result = judge_bench(load_bench_dir(bench_dir), CANDIDATES, judge, cache_path=tmp_path / "cache.jsonl",
                         reviews_path=tmp_path / "reviews.jsonl", progress=False)
    # Parsed pairs (reference, candidate): conv (8, 6), (10, 9); detail (8, 8); complex (9, 3), (7, 5); q5 unreadable.
    assert result["relative_score"] == pytest.approx(31 / 42 * 100)
    assert result["per_category"]["conversation"]["relative_score"] == pytest.approx(7.5 / 9 * 100)
    assert result["per_category"]["detail"] == {"relative_score": 100.0, "candidate_mean": 8.0, "reference_mean": 8.0, "n": 1}
    assert result["per_category"]["complex"]["relative_score"] == pytest.approx(50.0)
    assert result["n"] == 5 and result["n_failed"] == 1 and result["failed_ids"] == ["5"]
    assert result["failed_reasons"] == {"unparsable": 1}
    reviews = read_jsonl(tmp_path / "reviews.jsonl")
    assert [r["scores"] for r in reviews] == [[8, 6], [10, 9], [8, 8], [9, 3], [7, 5], None]
    # Assistant 1 is the reference, Assistant 2 the candidate, in every prompt.
    for messages in judge.prompts:
        content = messages[1]["content"]
        qid = content.split("candidate answer ", 1)[1][0]
        assert f"[Assistant 1]\nreference answer {qid}\n" in content
        assert f"[Assistant 2]\ncandidate answer {qid}\n" in content


def test_rerun_costs_no_judge_call(bench_dir, tmp_path):
    bench = load_bench_dir(bench_dir)
    cache = tmp_path / "cache.jsonl"
    first_judge = FakeJudge()
    first = judge_bench(bench, CANDIDATES, first_judge, cache_path=cache, progress=False, concurrency=3)
    assert first_judge.calls == 6 and first["judge_calls"] == 6 and first["cache_hits"] == 0

    second_judge = FakeJudge()
    second = judge_bench(bench, CANDIDATES, second_judge, cache_path=cache, progress=False)
    assert second_judge.calls == 0 and second["cache_hits"] == 6
    assert {k: v for k, v in second.items() if k not in ("judge_calls", "cache_hits")} == {
        k: v for k, v in first.items() if k not in ("judge_calls", "cache_hits")
    }

    changed = dict(CANDIDATES, **{"2": "candidate answer 2, revised"})
    third_judge = FakeJudge()
    judge_bench(bench, changed, third_judge, cache_path=cache, progress=False)
    assert third_judge.calls == 1  # only the prompt that changed

    other_judge = FakeJudge(name="another-judge")
    judge_bench(bench, CANDIDATES, other_judge, cache_path=cache, progress=False)
    assert other_judge.calls == 6  # the cache is keyed by judge too


class _ChatServer:
    """An OpenAI-compatible /v1/chat/completions endpoint on 127.0.0.1 that always scores '7 5'."""

    def __init__(self):
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body))
                reply = {
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "7 5\nFine."}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_compatible_teacher_as_judge(bench_dir, tmp_path, monkeypatch):
    import huggingface_hub

    from processing.teachers import OpenAICompatibleTeacher

    # HF_HUB_OFFLINE=1 (conftest) blocks every request made through huggingface_hub, even to 127.0.0.1.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    server = _ChatServer()
    try:
        bench = load_bench_dir(bench_dir)
        judge = OpenAICompatibleTeacher(server.url, "judge-model", temperature=0.2, max_attempts=1)
        result = judge_bench(bench, CANDIDATES, judge, cache_path=tmp_path / "cache.jsonl", progress=False, concurrency=2)
        assert len(server.requests) == 6
        assert result["relative_score"] == pytest.approx(5 / 7 * 100) and result["n_failed"] == 0
        path, body = server.requests[0]
        assert path == "/v1/chat/completions" and body["model"] == "judge-model" and body["temperature"] == 0.2
        assert body["messages"][0]["role"] == "system" and "[Assistant 2]\ncandidate answer" in body["messages"][1]["content"]

        again = judge_bench(bench, CANDIDATES, OpenAICompatibleTeacher(server.url, "judge-model"), cache_path=tmp_path / "cache.jsonl", progress=False)
        assert len(server.requests) == 6 and again["cache_hits"] == 6  # the rerun never reached the server
    finally:
        server.close()


def test_rule_judge_scores_scene_facts():
    def scores(reference, candidate):
        return parse_scores(RuleJudge().complete(judge_messages("ctx", "q", reference, candidate)))

    assert scores("Red. The circle is red.", "Red. The circle is red.") == (10, 10)
    assert scores("Red. The circle is red.", "Red.") == (10, 7)  # F1 of {red} vs {red, circle} = 2/3 -> 1 + 6
    assert scores("Red. The circle is red.", "Blue. The circle is blue.") == (10, 6)  # F1 1/2 -> 5.5 -> 6
    # {three, two, circle} vs {three, square, two, circle}: P 3/4, R 1, F1 6/7 -> 1 + 9 * 6/7 = 8.7 -> 9
    assert scores("Three. There are 3 shapes: two circles", "There are three squares and 2 circles.") == (10, 9)
    assert scores("Yes, there is a blue square.", "I do not know.") == (10, 1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_llava, tmp_path_factory):
    model, processor = tiny_llava
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scene_bench(tmp_path_factory):
    from processing.synthetic import make_scene_world

    root = tmp_path_factory.mktemp("scene")
    world = make_scene_world(root / "world", 3, split="eval", seed=1)
    make_scene_bench(world.annotations_dir, "eval", root / "bench", progress=False)
    return world, root / "bench"


def test_scene_world_bench_in_published_format(scene_bench):
    world, bench_dir = scene_bench
    questions = read_jsonl(bench_dir / "questions.jsonl")
    assert len(questions) == 9  # conversation, detail, complex for each of 3 images
    assert {q["category"] for q in questions} == {"conv", "detail", "complex"}
    assert all(set(q) == {"question_id", "image", "text", "category"} and "<image>" not in q["text"] for q in questions)
    assert all((world.images_dir / q["image"]).is_file() for q in questions)
    bench = load_bench_dir(bench_dir)
    assert all("[" in q.context and q.reference for q in bench)  # captions and boxes; a reference for each


def test_llava_bench_command_offline(scene_bench, tmp_path, tiny_checkpoint):
    world, bench_dir = scene_bench
    # The references as candidates: the rule judge gives 100 % everywhere.
    answers = tmp_path / "answers.jsonl"
    answers.write_text((bench_dir / "answers_gpt4.jsonl").read_text())
    perfect = evaluation_main(["llava-bench", "--bench-dir", str(bench_dir), "--answers", str(answers), "--out", str(tmp_path / "perfect")])
    assert perfect["relative_score"] == 100.0
    assert {k: v["relative_score"] for k, v in perfect["per_category"].items()} == {"complex": 100.0, "conversation": 100.0, "detail": 100.0}

    # A (random, tiny) model answers; the rule judge scores; a rerun generates nothing and asks the judge nothing.
    args = ["llava-bench", "--bench-dir", str(bench_dir), "--model", str(tiny_checkpoint), "--images", str(world.images_dir),
            "--out", str(tmp_path / "model"), "--max-new-tokens", "8", "--batch-size", "4"]
    first = evaluation_main(args)
    assert len(read_jsonl(tmp_path / "model" / "predictions.jsonl")) == 9
    assert first["judge_calls"] == 9 and 0 < first["relative_score"] < 100
    second = evaluation_main(args)
    assert second["judge_calls"] == 0 and second["cache_hits"] == 9
    assert second["relative_score"] == first["relative_score"]
    assert json.loads((tmp_path / "model" / "scores.json").read_text())["relative_score"] == first["relative_score"]
