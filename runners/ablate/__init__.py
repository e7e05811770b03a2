"""Ablation runner:
``python -m runners.ablate configs/ablations/<axis>.yaml [--tiny] [--out DIR] [--max-steps]``.

An axis file (``configs/ablations/*.yaml``, see ``docs/ABLATIONS.md``) names a base recipe (``base``, full
scale; ``tiny_base``, CPU twin) and lists variants as config overrides on it::

    base: configs/idefics2.yaml
    tiny_base: configs/demo.yaml
    full: {trainer.max_steps: 6000}                 # every full-scale variant (the paper's ablation setup)
    tiny: {model.init_args.model.connector.num_latents: 8}   # every tiny variant
    variants:
      fa_frozen:
        paper: 60.3                                  # the paper's score of this row
        set: {model.init_args.model.fusion: autoregressive}   # both scales
        full: {...}                                  # full scale only
        tiny: {...}                                  # tiny only

Override keys are dotted paths into the YAML config. A list item is picked by ``[index]`` or by
``[value]``, matched against the item's ``class_path`` (or its last dotted part), ``source`` or ``name``
(``trainer.callbacks[StageTransition].init_args.stages[0].max_resolution``,
``data.init_args.sources[laion_coco].options``); a final ``+`` extends a list (``trainer.callbacks+``).
A value replaces what is there (dicts are not merged: set their keys one by one to keep the rest).
Order: base, axis ``set``, axis ``full``/``tiny``, variant ``set``, variant ``full``/``tiny``, ``--set``.

For each variant the runner writes the merged config, runs ``fit`` through ``runners.cli.main`` (what
``python -m lightning fit --config ...`` runs), saves ``final.ckpt`` and evaluates it:

- full scale (the paper's protocol, Idefics2 §3): ``validate --config configs/eval/<b>.yaml --ckpt_path``
  for each of the axis' ``eval.benchmarks`` (VQAv2, TextVQA, OKVQA, COCO, 4-shot; scores x 100, CIDEr
  included, averaged as the paper's "Avg. score");
- tiny scale: the demo's held-out generation accuracy on the synthetic shapes questions (every held-out
  question asked alone, greedy, exact match: ``validate`` of the variant's own config, its ``val/acc``),
  overall (``val_acc``) and per question type (count, colour, shape); with ``--shots K`` also a K-shot run
  of the same held-out questions through ``configs/eval/vqav2.yaml`` with ``datamodules.EvalDataModule``
  reading them from the validation conversations (``sources``; the paper's VQA prompt, shots from
  training conversations; VQA accuracy).

Outputs: ``<out>/<axis>_<scale>.csv`` and ``.md`` (the table) and ``.png`` (the plot); runs (configs,
logs, checkpoints, ``metrics.json``) under ``<runs>/<axis>_<scale>/<variant>/``.
"""

from runners.ablate.axis import Axis, axis_files, load_axis
from runners.ablate.overrides import apply_overrides, get_override, parse_set, set_override
from runners.ablate.runner import main, parameter_counts, print_config, run_axis, run_variant

__all__ = [
    "Axis",
    "apply_overrides",
    "axis_files",
    "get_override",
    "load_axis",
    "main",
    "parameter_counts",
    "parse_set",
    "print_config",
    "run_axis",
    "run_variant",
    "set_override",
]
