"""`python -m evaluation COMMAND ...`: the benchmarks of the LLaVA paper, offline-capable.

    llava-bench         judge a model's answers against LLaVA-Bench references; relative score per category
    make-llava-bench    write a LLaVA-Bench (published file layout) for a COCO-format split, e.g. the scene world
    scienceqa           ScienceQA accuracy by modality / subject / grade, optional judge ensembling
    scienceqa-to-llava  convert ScienceQA's problems.json + pid_splits.json to LLaVA JSON training data
    pope                POPE object-hallucination probe (random / popular / adversarial negatives)
    scene-probe         the synthetic scene world's QA probe (first-word accuracy per template)
    binding-probe       can a tower's features be looked up by shape? (one attention head, no LM)

`python -m evaluation COMMAND --help` lists each command's options.
"""

import argparse
import sys

from evaluation import binding_probe, llava_bench, pope, scene_probe, scienceqa

COMMANDS = {  # name: (add_arguments, run, help)
    "llava-bench": (llava_bench.add_arguments, llava_bench.run, "LLaVA-Bench relative score with a judge"),
    "make-llava-bench": (llava_bench.add_make_arguments, llava_bench.run_make, "write a LLaVA-Bench for a COCO-format split"),
    "scienceqa": (scienceqa.add_arguments, scienceqa.run, "ScienceQA accuracy (+ judge ensembling)"),
    "scienceqa-to-llava": (scienceqa.add_convert_arguments, scienceqa.run_convert, "ScienceQA -> LLaVA JSON"),
    "pope": (pope.add_arguments, pope.run, "POPE object-hallucination probe"),
    "scene-probe": (scene_probe.add_arguments, scene_probe.run, "synthetic scene world QA probe"),
    "binding-probe": (binding_probe.add_arguments, binding_probe.run, "keyed colour-of-shape lookup on tower features"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m evaluation", description="The benchmarks of the LLaVA paper, offline-capable.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][1](args)


if __name__ == "__main__":
    main(sys.argv[1:])
