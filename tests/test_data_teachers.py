"""Teachers: OpenAI-compatible client against a local HTTP server, local transformers model, symbolic teacher."""

import copy
import json
import os
import re
from collections import Counter

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from http_fixtures import ScriptedServer, completion  # noqa: E402

from processing.coco import load_coco_contexts  # noqa: E402
from processing.generate import generate_instructions, grounding_filter_for, parse_reply  # noqa: E402
from processing.prompts import build_messages, load_prompts  # noqa: E402
from processing.synthetic import NUMBER_WORDS, PROBE_TEMPLATES, load_scene_objects, make_scene_world  # noqa: E402
from processing.teachers import OpenAICompatibleTeacher, SymbolicTeacher, Teacher, TeacherError, TransformersTeacher  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible server on 127.0.0.1 (tests/http_fixtures.py)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def server(monkeypatch):
    import huggingface_hub.constants

    # HF_HUB_OFFLINE=1 blocks every request made through huggingface_hub, even to 127.0.0.1. Lift it
    # for this test only: the only server contacted is the local one started here.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("LLAVA_TEST_KEY", "sk-test-secret-123")
    srv = ScriptedServer(default=lambda body: SymbolicTeacher(seed=0).complete(body["messages"]))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_scene_world(tmp_path_factory.mktemp("world"), 40, "train", seed=1)


@pytest.fixture(scope="module")
def contexts(world):
    return load_coco_contexts(world.captions_path, world.instances_path)


def teacher_for(server, sleeps, **kwargs):
    return OpenAICompatibleTeacher(server.url, "test-model", api_key_env="LLAVA_TEST_KEY", sleep=sleeps.append, **kwargs)


def test_openai_teacher_retries_429_with_retry_after_then_500(server, contexts):
    server.script = [(429, {"Retry-After": "7"}, {"error": "slow down"}, 0), (500, {}, {"error": "boom"}, 0)]
    sleeps = []
    teacher = teacher_for(server, sleeps, backoff_base=0.5)
    messages = build_messages(load_prompts("conversation"), contexts[0].to_prompt())
    reply = teacher.complete(messages)
    assert reply == SymbolicTeacher(seed=0).complete(messages)
    assert len(server.requests) == 3
    assert sleeps[0] == 7.0  # Retry-After honoured
    assert 0.5 * 0.8 * 2 <= sleeps[1] <= 0.5 * 2  # exponential backoff on the second attempt
    assert teacher.retries == {"429": 1, "500": 1}
    request = server.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == "Bearer sk-test-secret-123"
    assert request["body"]["model"] == "test-model" and request["body"]["messages"] == messages
    assert request["body"]["temperature"] == 0.2
    assert "sk-test" not in repr(teacher) and "sk-test" not in json.dumps(vars(teacher), default=str)


def test_openai_teacher_gives_up_after_bounded_attempts(server):
    server.script = [(503, {}, {"error": "down"}, 0)] * 3
    sleeps = []
    with pytest.raises(TeacherError, match="gave up after 3 attempts"):
        teacher_for(server, sleeps, max_attempts=3, backoff_base=0.1).complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0]


def test_openai_teacher_does_not_retry_client_errors(server):
    server.script = [(401, {}, {"error": "bad key"}, 0)]
    with pytest.raises(TeacherError, match="HTTP 401, not retried"):
        teacher_for(server, []).complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1


def test_openai_teacher_retries_timeouts(server):
    server.script = [(200, {}, completion("too late"), 1.5)]
    sleeps = []
    teacher = teacher_for(server, sleeps, timeout=0.4)
    assert teacher.complete([{"role": "user", "content": "hi"}]).startswith("I can only answer")
    assert teacher.retries == {"timeout": 1} and len(sleeps) == 1


def test_missing_key_env_never_sends_a_hub_token(server, monkeypatch):
    monkeypatch.delenv("LLAVA_TEST_KEY")
    monkeypatch.setenv("HF_TOKEN", "hf_should_not_leak")
    teacher_for(server, []).complete([{"role": "user", "content": "hi"}])
    assert "hf_should_not_leak" not in json.dumps(server.requests[-1]["headers"])


def test_generation_over_http_counts_garbage_and_writes_the_rest(server, contexts, world, tmp_path):
    garbage_id = contexts[2].image_id
    contexts = copy.deepcopy(contexts[:5])  # the fixture is shared with other tests
    contexts[2].captions = ["GARBAGE PLEASE"] + contexts[2].captions[1:]

    def reply(body):
        if "GARBAGE PLEASE" in body["messages"][-1]["content"]:
            return "lol, formats are for the weak ~~~ 42"
        return SymbolicTeacher(seed=0).complete(body["messages"])

    server.default = reply
    server.script = [(429, {"Retry-After": "0"}, {"error": "rate"}, 0), (502, {}, {"error": "gateway"}, 0)]
    teacher = teacher_for(server, [], backoff_base=0.01)
    output = tmp_path / "out.jsonl"
    stats = generate_instructions(
        contexts, teacher, output, types=["conversation", "detail"], concurrency=3,
        grounding=grounding_filter_for(world.instances_path), progress=False,
    )
    assert (stats.requested, stats.written, stats.unparsable, stats.ungrounded, stats.teacher_errors) == (10, 8, 2, 0, 0)
    assert teacher.retries == {"429": 1, "502": 1} and len(server.requests) == 12
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 8 and garbage_id not in {r["image_id"] for r in records}
    assert "sk-test-secret" not in output.read_text()
    assert "formats are for the weak" in " ".join(stats.examples["unparsable"])


# ---------------------------------------------------------------------------------------------------
# Local transformers model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory):
    """A random 1-layer LLaMA with a word-level tokenizer trained here on the prompts themselves."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [text for kind in ("conversation", "detail") for p in [load_prompts(kind)] for text in [p.system, *sum(p.examples, ())]]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_lm")
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


def test_transformers_teacher_generates_text_that_is_counted_as_unparsable(tiny_causal_lm, contexts, tmp_path):
    teacher = TransformersTeacher(tiny_causal_lm, max_new_tokens=6, min_new_tokens=3, device="cpu")
    assert isinstance(teacher, Teacher)
    messages = build_messages(load_prompts("detail"), contexts[0].to_prompt())
    reply = teacher.complete(messages)
    assert isinstance(reply, str) and reply.strip()
    assert "Task:" not in reply  # only the new tokens, not the prompt
    teacher._pipe.tokenizer.chat_template = None  # the plain-transcript fallback also generates
    assert teacher.complete(messages).strip()

    stats = generate_instructions(contexts[:2], teacher, tmp_path / "out.jsonl", types=["detail"], progress=False)
    assert stats.requested == 2 and stats.written + stats.unparsable == 2 and stats.unparsable >= 1
    assert stats.teacher.startswith("transformers:")


# ---------------------------------------------------------------------------------------------------
# Symbolic teacher
# ---------------------------------------------------------------------------------------------------

COLOR_Q = [re.compile("^" + re.escape(q).replace(r"\{noun\}", "(circle|square|triangle)") + "$") for q in SymbolicTeacher.COLOR_QUESTIONS]
EXISTS_Q = [re.compile("^" + re.escape(q).replace(r"\{a\}", "an? (red|green|blue|yellow) (circle|square|triangle)") + "$") for q in SymbolicTeacher.EXISTS_QUESTIONS]


def replies(contexts, kind, seed=0):
    teacher = SymbolicTeacher(seed=seed)
    return [teacher.complete(build_messages(load_prompts(kind), c.to_prompt())) for c in contexts]


def test_symbolic_conversations_cover_probe_questions_with_correct_first_words(contexts, world):
    _, scenes = load_scene_objects(world.instances_path)
    phrasings = {"color": Counter(), "count": Counter(), "exists": Counter()}
    yes_no = Counter()
    others = 0
    for ctx, reply in zip(contexts, replies(contexts, "conversation")):
        objects = scenes[ctx.image_id]
        pairs = parse_reply("conversation", reply)
        assert 4 <= len(pairs) <= 6
        seen = set()
        for question, answer in pairs:
            first = re.match(r"[A-Za-z]+", answer)[0].lower()
            if question in SymbolicTeacher.COUNT_QUESTIONS:
                assert first == NUMBER_WORDS[len(objects)], (question, answer)
                phrasings["count"][question] += 1
                seen.add("count")
            elif any(p.match(question) for p in COLOR_Q):
                shape = next(p.match(question) for p in COLOR_Q if p.match(question))[1]
                (only,) = [o for o in objects if o.shape == shape]  # only asked when the shape is unique
                assert first == only.color, (question, answer)
                phrasings["color"][question] += 1
                seen.add("color")
            elif any(p.match(question) for p in EXISTS_Q):
                match = next(p.match(question) for p in EXISTS_Q if p.match(question))
                present = f"{match[1]} {match[2]}" in {o.category for o in objects}
                assert first == ("yes" if present else "no"), (question, answer)
                assert answer.startswith("Yes, " if present else "No, ")
                if not present:  # the negation alone: no present object named after "No"
                    assert answer == f"No, there is no {match[1]} {match[2]}.", answer
                phrasings["exists"][question] += 1
                yes_no[first] += 1
                seen.add("exists")
            else:
                others += 1
        assert {"count", "exists"} <= seen
        if any(n == 1 for n in Counter(o.shape for o in objects).values()):
            assert "color" in seen
    for kind, counter in phrasings.items():
        assert len(counter) >= 3, (kind, counter)  # paraphrased
    assert PROBE_TEMPLATES["count"] in phrasings["count"]
    assert any(q.startswith("What color is the ") for q in phrasings["color"])
    assert any(q.startswith("Is there a") and q.endswith(" in the image?") for q in phrasings["exists"])
    assert yes_no["yes"] == yes_no["no"] == len(contexts)  # exactly balanced
    assert others >= len(contexts)  # position / size / per-shape counts besides the probe kinds


def test_symbolic_replies_parse_and_are_grounded_for_every_type(contexts, world):
    grounding = grounding_filter_for(world.instances_path)
    assert grounding.split_words
    for kind in ("conversation", "detail", "complex"):
        texts = replies(contexts, kind)
        assert len(set(texts)) > len(texts) // 2  # varied, not a fixed string
        for ctx, text in zip(contexts, texts):
            pairs = parse_reply(kind, text)
            assert grounding.ungrounded([a for _, a in pairs], ctx.categories) == [], text
            if kind == "detail":
                assert all(name in pairs[0][1] for name in ctx.categories)


def test_symbolic_yes_no_answers_are_existence_answers_only(contexts, world):
    """Only existence questions are answered yes or no; in the miniature a yes/no answer to another question, with
    the objects named after it, kept the existence probe at chance. The color-variety question answers a number."""
    _, scenes = load_scene_objects(world.instances_path)
    variety = 0
    for ctx, text in zip(contexts, replies(contexts, "complex")):
        ((question, answer),) = parse_reply("complex", text)
        assert re.match(r"(yes|no)\b", answer, re.I) is None, (question, answer)
        if question.startswith("How many different colors"):
            colors = {o.color for o in scenes[ctx.image_id]}
            assert answer.startswith(NUMBER_WORDS[len(colors)].capitalize() + "."), (answer, colors)
            variety += 1
    assert variety > 0
    for text in replies(contexts, "conversation"):
        for question, answer in parse_reply("conversation", text):
            if re.match(r"(yes|no)\b", answer, re.I):
                assert any(p.match(question) for p in EXISTS_Q), (question, answer)


def test_symbolic_teacher_is_deterministic_by_seed(contexts):
    assert replies(contexts[:10], "conversation", seed=0) == replies(contexts[:10], "conversation", seed=0)
    assert replies(contexts[:10], "conversation", seed=0) != replies(contexts[:10], "conversation", seed=1)
    # Without the task line of processing.generate it answers something that does not parse.
    with pytest.raises(ValueError):
        parse_reply("conversation", SymbolicTeacher().complete([{"role": "user", "content": contexts[0].to_prompt()}]))


def test_symbolic_teacher_works_on_real_coco_style_context():
    from processing.coco import ImageContext

    ctx = ImageContext(1, "x.jpg", 640, 480, ["A man rides a horse."], [("person", [0.2, 0.0, 0.4, 0.5]), ("horse", [0.1, 0.1, 0.6, 0.6])])
    for kind in ("conversation", "detail", "complex"):
        pairs = parse_reply(kind, SymbolicTeacher().complete(build_messages(load_prompts(kind), ctx.to_prompt())))
        assert pairs and all(answer for _, answer in pairs)
