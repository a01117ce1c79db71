"""Three ways to ask a LLaVA checkpoint about an image: the pipeline, processor + generate, and streaming.

    python examples/pipeline_usage.py --model ckpt --image photo.jpg "What is in the picture?"

Any checkpoint saved by this repository works (`python examples/make_tiny_checkpoint.py tiny` makes a random
one in seconds); it carries its code, so `trust_remote_code=True` is all transformers needs.
"""

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline


def ask_with_pipeline(model_dir: str, image: Image.Image, question: str, max_new_tokens: int = 64) -> str:
    """The shortest path: transformers' image-text-to-text pipeline (greedy)."""
    pipe = pipeline("image-text-to-text", model=model_dir, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    out = pipe(text=messages, generate_kwargs={"max_new_tokens": max_new_tokens, "do_sample": False})
    return out[0]["generated_text"][-1]["content"]  # the whole chat comes back; the reply is its last turn


def ask_with_generate(model_dir: str, image: Image.Image, question: str, max_new_tokens: int = 64) -> str:
    """What the pipeline does, by hand: chat template -> processor -> generate -> decode the new tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("question", nargs="?", default="Describe the image briefly.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    image = Image.open(args.image).convert("RGB")
    print("pipeline:  ", ask_with_pipeline(args.model, image, args.question, args.max_new_tokens))
    print("generate:  ", ask_with_generate(args.model, image, args.question, args.max_new_tokens))

    # Streaming: the chat command's building block yields the reply piece by piece.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    from evaluation.chat import ChatSession
    from evaluation.generation import GenerationSettings, load_model

    model, processor = load_model(args.model, device="auto")
    session = ChatSession(model, processor, GenerationSettings(max_new_tokens=args.max_new_tokens), image=image)
    print("streamed:   ", end="", flush=True)
    for piece in session.stream(args.question):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
