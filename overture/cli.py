"""`overture <command>`: pretrain, prepare, recipes, generate, report.

RECIPE is a YAML path or a bundled recipe name; KEY=VALUE overrides use dotted paths
(``train.max_steps=50 output_dir=runs/x``). Exit codes: 0 success, 2 bad input (the
message names the key, file or path), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import ConfigError, bundled_recipes, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # parse_known_args so that options may stand before or after the KEY=VALUE overrides
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("datasets", "transformers", "accelerate", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overture", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a recipe (resumes from the latest checkpoint)")
    p.add_argument("recipe", help="YAML path or bundled recipe name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved recipe, parameter count and data statistics; "
                        "do not train")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("prepare", help="build the cached dataset only (before a multi-GPU launch)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("recipes", help="list the bundled recipes: name, family, size, purpose")
    p.set_defaults(func=_recipes)

    p = sub.add_parser("generate", help="sample text from a causal-LM checkpoint (GPT)")
    p.add_argument("--checkpoint", required=True,
                   help="a final/ folder (or a run folder holding one), or a Hub model name")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="0 decodes greedily")
    p.add_argument("--top-k", type=int, default=50, help="0 disables top-k filtering")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)

    p = sub.add_parser("report", help="draw loss, learning rate and throughput to PNG")
    p.add_argument("run_dir")
    p.add_argument("--output", help="PNG path (default RUN_DIR/report.png)")
    p.set_defaults(func=_report)
    return parser


def _pretrain(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        return _dry_run(recipe)
    from .engine import train

    final = train(recipe)
    if _is_main_process():
        print(f"final model: {final}")
    return 0


def _dry_run(recipe) -> int:
    from .registry import build_objective

    print("# resolved recipe")
    print(recipe.to_yaml())
    objective = build_objective(recipe)
    for index, phase in enumerate(recipe.resolved_phases()):
        data = objective.prepare(phase)
        if index == 0:
            vocab = len(objective.tokenizer)
            print(f"parameters: {count_parameters(objective):,} (vocabulary {vocab:,}; "
                  f"{count_parameters(objective, recipe.tokenizer.vocab_size):,} at "
                  f"tokenizer.vocab_size={recipe.tokenizer.vocab_size:,})")
            print("corpus: " + json.dumps(data.stats["corpus"]))
        print(f"# data statistics, phase {index} (max_seq_len {phase.max_seq_len}, "
              f"{phase.steps} steps)")
        for key, value in objective.data_report(data, phase).items():
            shown = f"{value:.4f}" if isinstance(value, float) else f"{value:,}"
            print(f"  {key}: {shown}")
    return 0


def count_parameters(objective, vocab_size: int | None = None) -> int:
    """Trainable + frozen parameters of a family's models, built on the meta device (no
    memory, no tokenizer needed when ``vocab_size`` is given)."""
    import torch

    with torch.device("meta"):
        models = {**objective.build_models(vocab_size), **objective.frozen_models()}
    seen = {id(p): p.numel() for m in models.values() for p in m.parameters()}
    return sum(seen.values())


def _prepare(args) -> int:
    from .registry import build_objective

    recipe = load_recipe(args.recipe, args.overrides)
    objective = build_objective(recipe)
    for phase in recipe.resolved_phases():
        data = objective.prepare(phase)
        print(f"{data.folder}: {data.stats['train_examples']:,} train / "
              f"{data.stats['eval_examples']:,} eval examples")
    return 0


def _recipes(args) -> int:
    from .registry import build_objective

    print(f"{'recipe':<14} {'family':<8} {'params':>8}  description")
    for name, path in bundled_recipes().items():
        recipe = load_recipe(path)
        params = count_parameters(build_objective(recipe), recipe.tokenizer.vocab_size)
        print(f"{name:<14} {recipe.objective.name:<8} {params / 1e6:>7.1f}M  "
              f"{recipe.description}")
    return 0


def _generate(args) -> int:
    from .generate import generate

    print(generate(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed))
    return 0


def _report(args) -> int:
    from .report import write_report

    print(write_report(args.run_dir, args.output))
    return 0


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    raise SystemExit(main())
