"""Write a tiny random LLaVA checkpoint (model + processor + locally trained tokenizer) to OUT_DIR.

    python examples/make_tiny_checkpoint.py OUT_DIR [--projector linear|mlp2x_gelu]

The folder is self-contained: it loads with `AutoModelForCausalLM` / `AutoProcessor` and `trust_remote_code=True`
without this repository. Useful to try the code path in seconds; it is also the fixture of the tests.
"""

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_llava.builders import build_tiny_llava  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--projector", choices=["linear", "mlp2x_gelu"], default="mlp2x_gelu")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--image-aspect-ratio", choices=["pad", "crop"], default="pad")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, processor = build_tiny_llava(
        args.projector, image_size=args.image_size, image_aspect_ratio=args.image_aspect_ratio, seed=args.seed
    )
    model.save_pretrained(args.out_dir)
    processor.save_pretrained(args.out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out_dir} ({args.projector} projector, {n_params:,} parameters)")


if __name__ == "__main__":
    main()
