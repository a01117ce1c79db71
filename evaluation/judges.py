"""Judges for the evaluations: any `Teacher` (`complete(messages) -> str`), with replies cached on disk.

A judge is whatever answers chat messages: `processing.teachers.OpenAICompatibleTeacher` (GPT-4 as in the paper,
or a vLLM/TGI/Ollama server), `TransformersTeacher` (a local model), or an offline rule judge such as
`evaluation.llava_bench.RuleJudge`. `CachedJudge` stores each reply under a hash of the judge's name and the exact
prompt, so rerunning an evaluation (after a crash, or to recompute a summary) makes no judge call at all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from evaluation.jsonl import JsonlAppender, read_done


def judge_name(judge) -> str:
    """The judge's `name` (every Teacher has one), else its class name."""
    return getattr(judge, "name", None) or type(judge).__name__


class CachedJudge:
    """A judge whose replies are cached in a JSONL file keyed by sha256(judge name + prompt messages).

    `calls` counts the replies actually asked of the wrapped judge, `hits` those served from the cache.
    Safe to call from several threads.
    """

    def __init__(self, judge, cache_path: str | os.PathLike):
        self.judge = judge
        self.name = judge_name(judge)
        self.cache_path = Path(cache_path)
        self._replies = {key: record["reply"] for key, record in read_done(self.cache_path, "key").items()}
        self._lock = threading.Lock()
        self.calls = 0
        self.hits = 0

    @staticmethod
    def key(name: str, messages: list[dict]) -> str:
        payload = json.dumps({"judge": name, "messages": messages}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def complete(self, messages: list[dict]) -> str:
        key = self.key(self.name, messages)
        with self._lock:
            if key in self._replies:
                self.hits += 1
                return self._replies[key]
        reply = self.judge.complete(messages)  # outside the lock: remote judges are called concurrently
        with self._lock:
            self.calls += 1
            if key not in self._replies:
                self._replies[key] = reply
                with JsonlAppender(self.cache_path) as out:
                    out.write({"key": key, "judge": self.name, "reply": reply})
        return reply


def complete_all(judge, prompts: list[list[dict]], *, concurrency: int = 1, progress: bool = True, desc: str = "judge") -> list:
    """`judge.complete` on every prompt, in order; an exception is returned in place of its reply, not raised.

    Threads help remote judges (HTTP latency); a local or rule judge gains nothing from `concurrency > 1`.
    """
    from tqdm.auto import tqdm

    def one(messages):
        try:
            return judge.complete(messages)
        except Exception as e:  # noqa: BLE001 - a failed judgement is counted by the caller, the run goes on
            return e

    with tqdm(total=len(prompts), desc=desc, unit="q", disable=not progress) as bar:
        if concurrency <= 1:
            results = []
            for messages in prompts:
                results.append(one(messages))
                bar.update(1)
            return results
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = [pool.submit(one, messages) for messages in prompts]
            for future in futures:
                future.add_done_callback(lambda _: bar.update(1))
            return [future.result() for future in futures]


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def add_judge_arguments(parser: argparse.ArgumentParser, kinds: tuple[str, ...], default: str | None) -> None:
    group = parser.add_argument_group("judge")
    group.add_argument("--judge", choices=kinds, default=default, help="judge backend")
    group.add_argument("--judge-model", help="model name at the endpoint (openai) or local model path/id (transformers)")
    group.add_argument("--judge-base-url", help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    group.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    group.add_argument("--judge-concurrency", type=int, default=4, help="parallel judge requests (remote judges)")


def make_judge(args: argparse.Namespace, offline_judges: dict | None = None):
    """The judge named by `--judge`: an offline one from `offline_judges`, `openai` or `transformers`."""
    offline_judges = offline_judges or {}
    if args.judge in offline_judges:
        return offline_judges[args.judge]()
    if args.judge == "openai":
        if not args.judge_base_url or not args.judge_model:
            raise SystemExit("--judge openai needs --judge-base-url and --judge-model")
        from processing.teachers import OpenAICompatibleTeacher

        # Temperature 0.2 as in the paper's GPT-4 judging.
        return OpenAICompatibleTeacher(args.judge_base_url, args.judge_model, api_key_env=args.judge_api_key_env, temperature=0.2)
    if args.judge == "transformers":
        if not args.judge_model:
            raise SystemExit("--judge transformers needs --judge-model")
        from processing.teachers import TransformersTeacher

        return TransformersTeacher(args.judge_model)
    raise SystemExit(f"unknown judge {args.judge!r}")
