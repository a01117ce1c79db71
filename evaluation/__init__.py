"""Evaluation and everyday use of LLaVA checkpoints.

- `python -m evaluation {llava-bench, make-llava-bench, scienceqa, scienceqa-to-llava, pope, scene-probe}`: the
  paper's benchmarks (see `evaluation/README.md`); metrics are `evaluate` modules under `evaluation/metrics/`.
- `llava-chat` / `python -m evaluation.chat`: a streaming terminal chat about an image.
- `evaluation.scene_probe.evaluate_scene_probe`: the synthetic world's quick probe, callable during training.

Importing the package imports nothing heavy; each module loads what it needs.
"""
