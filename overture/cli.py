"""`overture <command>`: pretrain, prepare, recipes, finetune, glue, generate, features,
probe, convert-long, report.

RECIPE is a YAML path or a bundled recipe name; KEY=VALUE overrides use dotted paths
(``train.max_steps=50 output_dir=runs/x``). Exit codes: 0 success (also when the run
was already finished), 1 an unexpected error or a failed save, 2 bad input (the message
names the key, file or path), 3 a non-finite loss stopped the run, 130 / 143 stopped by
SIGINT / SIGTERM (after saving a checkpoint once training has started; the same command
continues; SIGTERM before that stops at once, or with one line while examples are built).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from .config import ConfigError, bundled_recipes, load_recipe, parse_overrides
from .registry import family_name
from .errors import Interrupted, RunError, one_line
from .interrupts import Terminated, interrupts_raise


def main(argv: list[str] | None = None) -> int:
    """The ``overture`` command; its exit code (see the module docstring)."""
    from .launch import run_main

    return run_main(_main, argv)  # a multi-process run ends cleanly (overture.launch)


def _interrupted(message: str) -> None:
    """Print an interruption's one line after ending the progress bars it left open."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(message, file=sys.stderr)


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    argv = _negative_values_attached(sys.argv[1:] if argv is None else list(argv))
    # parse_known_args so that options may stand before or after the KEY=VALUE overrides
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:  # the same key twice on the command line: refused, not one silently winning
        parse_overrides(getattr(args, "overrides", []), unique=True)
    except ConfigError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("datasets", "transformers", "accelerate", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        with interrupts_raise(signal.SIGINT):  # KeyboardInterrupt, deferred where asked
            return args.func(args)
    except ConfigError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"interrupted: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    except RunError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # `overture recipes | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # a file the checks above did not foresee: still one line
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # outside the training loop: nothing to save
        signum = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
        _interrupted(f"stopped by {signum.name} (nothing half-written was kept; run the "
                     "same command again)")
        return 128 + signum


def _negative_values_attached(argv: list[str]) -> list[str]:
    """``--layer -4,-3,-2,-1`` as ``--layer=-4,-3,-2,-1``: argparse takes a value that
    starts with "-" (other than one plain number) for an option and refuses it."""
    out = []
    for arg in argv:
        if out and out[-1] == "--layer" and arg.startswith("-"):
            out[-1] = f"--layer={arg}"
        else:
            out.append(arg)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block before them)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="overture", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a recipe (resumes from the latest checkpoint)")
    p.add_argument("recipe", help="YAML path or bundled recipe name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved recipe, parameter count and data statistics; "
                        "do not train")
    p.add_argument("--accelerate-config", metavar="FILE",
                   help="with --dry-run: check an `accelerate launch --config_file` file "
                        "against the recipe (recipes/accelerate/ holds working ones)")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("prepare", help="build the cached dataset only (before a multi-GPU launch)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("recipes", help="list the bundled recipes: name, family, size, purpose")
    p.set_defaults(func=_recipes)

    p = sub.add_parser("generate", help="sample text from a causal-LM checkpoint (GPT), or "
                                        "images from a text-to-image one (gan-int-cls, dfgan)")
    p.add_argument("--checkpoint", required=True,
                   help="a final/ folder (or a run folder holding one), or a Hub model name")
    p.add_argument("--prompt", required=True)
    # text options default to None so that one given to an image checkpoint is refused
    p.add_argument("--max-new-tokens", type=int, default=None, help="text; default 40")
    p.add_argument("--temperature", type=float, default=None,
                   help="text; 0 decodes greedily; default 1.0")
    p.add_argument("--top-k", type=int, default=None,
                   help="text; 0 disables top-k filtering; default 50")
    p.add_argument("--top-p", type=float, default=None,
                   help="text; nucleus sampling mass; default 1.0")
    p.add_argument("--n", type=int, default=None, help="images: how many (default 16)")
    p.add_argument("--output", default=None, help="images: the .png grid to write")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint on a GLUE or custom task, "
                                        "or an image checkpoint on a labelled image folder")
    p.add_argument("--checkpoint", required=True,
                   help="a final/ folder (or a run folder holding one), a transformers "
                        "folder or a Hub model name; with --images: an image final/ folder, "
                        "or a .safetensors / .pth weights file of model.name=NAME")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--task", help="a GLUE task (sst2, ...) or a task YAML")
    task.add_argument("--images", help="labelled images: an ImageFolder folder "
                                       "(DIR/<class>/<image>), digits, hf:NAME, a .parquet file")
    p.add_argument("--eval-images", help="with --images: held-out images (default: 20%% of "
                                         "--images)")
    p.add_argument("--data-dir", help="the official GLUE distribution (SST-2/train.tsv, "
                                      "...); default: the Hub glue dataset")
    p.add_argument("--seed", type=int)
    p.add_argument("--random-init", action="store_true",
                   help="the checkpoint's architecture with fresh weights (a baseline)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("glue", help="fine-tune on several GLUE tasks and seeds; a table")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tasks", default="all", help="all, or a comma-separated list")
    p.add_argument("--seeds", type=int, default=3, help="runs per task (seeds 42, 43, ...)")
    p.add_argument("--data-dir", help="the official GLUE distribution; default: the Hub")
    p.add_argument("--output-dir", default="runs/glue")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                   help="fine-tune every point of these values (repeatable: their product) "
                        "with every seed; each task reports the point with the best mean dev "
                        "score, e.g. --grid train.lr=2e-5,5e-5,1e-4")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_glue)

    p = sub.add_parser("features", help="embed texts with any encoder checkpoint, or images "
                                        "with an image checkpoint")
    p.add_argument("--checkpoint", required=True,
                   help="a final/ folder (or a run folder holding one), a transformers "
                        "folder or a Hub model name")
    p.add_argument("--input", required=True,
                   help=".txt (one text per line) or .csv / .tsv / .jsonl / .parquet; for an "
                        "image checkpoint: a folder of images or a .txt list of image paths")
    p.add_argument("--output", required=True, help=".npy, .safetensors or .parquet")
    p.add_argument("--column", help="text column of a table input (default: text)")
    p.add_argument("--id-column", help="id column kept with the embeddings")
    p.add_argument("--layer", default="-1",
                   help="hidden state index (0 embeddings, -1 last) or several, "
                        "comma-separated, averaged")
    p.add_argument("--pooling", default="mean", help="cls, mean, max or pooler")
    p.add_argument("--normalize", action="store_true", help="unit-length embeddings")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, help="default: the tokenizer's limit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=_features)

    p = sub.add_parser("probe", help="top-1 of a linear classifier on an image "
                                     "checkpoint's frozen features")
    p.add_argument("--checkpoint", required=True, help="an image final/ folder (or a run "
                                                       "folder holding one)")
    p.add_argument("--data", required=True, help="labelled images: an ImageFolder folder, "
                                                 "digits, hf:NAME, .parquet, cifar10:ROOT")
    p.add_argument("--eval-data", help="held-out images (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.2,
                   help="held out of --data when --eval-data is not given (as a recipe's "
                        "data.eval_fraction: the same split as that run's evaluation)")
    p.add_argument("--method", default="logreg", help="logreg (scikit-learn) or linear (torch)")
    p.add_argument("--random-init", action="store_true",
                   help="the checkpoint's architecture with fresh weights (the baseline)")
    p.add_argument("--seed", type=int, default=0, help="of --random-init and the probe")
    p.add_argument("--data-seed", type=int, default=12345,
                   help="seed of the held-out split (as a recipe's data.seed)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cache-dir", default="~/.cache/overture",
                   help="where the prepared images are cached (as data.cache_dir)")
    p.set_defaults(func=_probe)

    p = sub.add_parser("convert-long",
                       help="make a BERT / RoBERTa masked LM a Longformer (tiled positions)")
    p.add_argument("--checkpoint", required=True,
                   help="a final/ folder (or a run folder holding one), a transformers "
                        "folder with a masked-LM head or a Hub model name")
    p.add_argument("--output", required=True, help="a new folder for the Longformer")
    p.add_argument("--max-length", type=int, default=4096, help="tokens per input")
    p.add_argument("--window", type=int, default=512,
                   help="sliding-window size (even; tokens attended, both sides together)")
    p.set_defaults(func=_convert_long)

    p = sub.add_parser("report", help="draw loss, learning rate and throughput to PNG")
    p.add_argument("run_dir")
    p.add_argument("--output", help="PNG path (default RUN_DIR/report.png)")
    p.set_defaults(func=_report)
    return parser


def _pretrain(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.accelerate_config:
        if not args.dry_run:
            raise ConfigError("--accelerate-config is checked with --dry-run; to train, pass "
                              "the file to `accelerate launch --config_file`")
        from .launch import check_accelerate_config

        for note in check_accelerate_config(args.accelerate_config, recipe):
            print(f"accelerate config: {note}")
        print(f"accelerate config: {args.accelerate_config} fits this recipe")
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
    phases = recipe.resolved_phases()
    for index in range(len(phases)):
        data = objective.prepare(phases[index])
        if index == 0:
            # epochs become steps once the examples are counted
            phases = recipe.for_dataset(len(data.train), 1).resolved_phases()
            params = count_parameters(objective)
            if getattr(objective, "tokenizer", None) is None:  # images: no vocabulary
                print(f"parameters: {params:,}")
            else:
                vocab = len(objective.tokenizer)
                at_recipe = count_parameters(objective, recipe.tokenizer.vocab_size)
                print(f"parameters: {params:,} (vocabulary {vocab:,}" + (
                    f"; {at_recipe:,} at tokenizer.vocab_size={recipe.tokenizer.vocab_size:,})"
                    if at_recipe != params else ")"))
            if "corpus" in data.stats:
                print("corpus: " + json.dumps(data.stats["corpus"]))
        phase = phases[index]
        shape = (f"max_seq_len {phase.max_seq_len}" if phase.max_seq_len is not None
                 else f"image_size {recipe.data.image_size}")
        print(f"# data statistics, phase {index} ({shape}, {phase.steps} steps)")
        for key, value in objective.data_report(data, phase).items():
            shown = f"{value:.4f}" if isinstance(value, float) else f"{value:,}"
            print(f"  {key}: {shown}")
    return 0


def count_parameters(objective, vocab_size: int | None = None) -> int:
    """Trainable + frozen parameters of a family's models, built on the meta device (no
    memory, no tokenizer needed when ``vocab_size`` is given). Frozen modules that only
    measure (a GAN's judge, ``measures_only = True``) are not the model's."""
    import torch

    with torch.device("meta"):
        frozen = {k: m for k, m in objective.frozen_models().items()
                  if not getattr(m, "measures_only", False)}
        models = {**objective.build_models(vocab_size), **frozen}
    seen = {id(p): p.numel() for m in models.values() for p in m.parameters()}
    return sum(seen.values())


def _prepare(args) -> int:
    from .registry import build_objective

    recipe = load_recipe(args.recipe, args.overrides)
    objective = build_objective(recipe)
    for phase in recipe.resolved_phases():
        data = objective.prepare(phase)
        print(f"{data.folder}: {data.stats['train_examples']:,} train / "
              f"{data.stats.get('eval_examples', 0):,} eval examples")
    return 0


def _recipes(args) -> int:
    from .registry import build_objective

    print(f"{'recipe':<28} {'family':<12} {'params':>8}  description")
    for name, path in bundled_recipes().items():
        recipe = load_recipe(path, checkpoint=False)  # init_from folders made by other runs
        if (getattr(recipe.objective, "checkpoint", None) is not None
                or "model.init_from" in recipe.requires):
            size = "ckpt"  # fine-tuning, continued pretraining: the checkpoint's size
        else:
            objective = build_objective(recipe)
            try:
                params = count_parameters(objective, recipe.tokenizer.vocab_size)
                size = f"{params / 1e6:.1f}M"
            except ConfigError:
                if not getattr(objective, "makes_images", False):
                    raise
                size = "?"  # sized by the text encoder it names, which is not here
        print(f"{name:<28} {recipe.objective.name:<12} {size:>8}  {recipe.description}")
    return 0


def _generate(args) -> int:
    from .generate import generate

    family = _checkpoint_family(args.checkpoint)
    if family is not None and not hasattr(family, "sample"):
        raise ConfigError(f"--checkpoint {args.checkpoint} is {_a(family_name(family))} "
                          "checkpoint, which generates nothing: generate takes a GPT-style "
                          "one (a gpt family final/ or a transformers causal LM) or a "
                          "text-to-image one (gan-int-cls, dfgan)")
    text = {"--max-new-tokens": args.max_new_tokens, "--temperature": args.temperature,
            "--top-k": args.top_k, "--top-p": args.top_p}
    images = {"--n": args.n, "--output": args.output}
    if getattr(family, "makes_images", False):
        given = [k for k, v in text.items() if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: text sampling options; "
                              f"--checkpoint {args.checkpoint} makes images (use --n, --output)")
        print(family.sample(args.checkpoint, args.prompt, n=16 if args.n is None else args.n,
                            seed=args.seed, output=args.output))
        return 0
    given = [k for k, v in images.items() if v is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: image options; --checkpoint "
                          f"{args.checkpoint} makes text")
    sample = family.sample if family is not None else generate  # another causal LM
    defaults = {"max_new_tokens": 40, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    options = {k: v if (v := getattr(args, k)) is not None else d for k, d in defaults.items()}
    print(sample(args.checkpoint, args.prompt, seed=args.seed, **options))
    return 0


def _checkpoint_family(checkpoint: str):
    """The family of a checkpoint (None: another transformers model), once the path or
    Hub name is known to exist (a missing one is named at once)."""
    from .hub import resolve_checkpoint
    from .registry import checkpoint_family

    return checkpoint_family(resolve_checkpoint(checkpoint))


def _a(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _finetune(args) -> int:
    from .finetune.run import finetune, finetune_recipe

    if args.images:
        from .finetune.images import finetune_images, image_finetune_recipe

        recipe = image_finetune_recipe(args.checkpoint, args.images, args.eval_images,
                                       args.seed, args.random_init, args.overrides)
        metrics = finetune_images(recipe, progress=_is_main_process())
        if _is_main_process():
            print(json.dumps(metrics, indent=2))
        return 0
    if args.eval_images:
        raise ConfigError("--eval-images goes with --images")

    overrides = [*(["objective.init=random"] if args.random_init else []), *args.overrides]
    recipe = finetune_recipe(args.checkpoint, args.task, args.data_dir, args.seed, overrides)
    metrics = finetune(recipe, progress=_is_main_process())
    if _is_main_process():
        from .finetune.run import epoch_table

        print(epoch_table(metrics))
        print(json.dumps(metrics["dev"], indent=2))
    return 0


def _glue(args) -> int:
    from .finetune.run import parse_tasks, run_glue

    if args.seeds < 1:
        raise ConfigError(f"--seeds={args.seeds} must be at least 1")
    run_glue(args.checkpoint, parse_tasks(args.tasks), args.seeds, args.data_dir,
             args.output_dir, args.overrides, progress=_is_main_process(), grid=args.grid)
    return 0


def _probe(args) -> int:
    if not 0 < args.eval_fraction < 1:
        raise ConfigError(f"--eval-fraction={args.eval_fraction} must be between 0 and 1")
    family = _checkpoint_family(args.checkpoint)
    if not hasattr(family, "probe"):
        what = _a(family_name(family)) if family is not None else "a transformers"
        raise ConfigError(f"--checkpoint {args.checkpoint} is {what} checkpoint; probe takes "
                          "an image checkpoint (a final/ of the image or simclr family)")
    print(json.dumps(family.probe(
        args.checkpoint, args.data, eval_data=args.eval_data, eval_fraction=args.eval_fraction,
        method=args.method, random_init=args.random_init, seed=args.seed,
        batch_size=args.batch_size, cache_dir=args.cache_dir, data_seed=args.data_seed),
        indent=2))
    return 0


def _features(args) -> int:
    from pathlib import Path

    from .features import (OUTPUT_FORMATS, check_arguments, check_checkpoint, check_output,
                           load, read_texts, write_features)

    try:
        layers = [int(x) for x in str(args.layer).split(",")]
    except ValueError:
        raise ConfigError(f"--layer={args.layer!r}: give integers, e.g. -1 or -4,-3,-2,-1")
    # every check that needs no model comes before it loads: an error is one line
    check_arguments(args.pooling, args.batch_size, args.max_length)
    output = Path(args.output)
    if output.suffix.lower() not in OUTPUT_FORMATS:  # before the work, not after
        raise ConfigError(f"--output {output}: use one of {', '.join(OUTPUT_FORMATS)}")
    check_output(output, args.overwrite)  # a folder, or a file without --overwrite
    family = _checkpoint_family(args.checkpoint)
    if getattr(family, "makes_images", False):
        raise ConfigError(f"--checkpoint {args.checkpoint} is {_a(family_name(family))} "
                          "checkpoint, which makes images: features takes an encoder (a text "
                          "or image final/)")
    if family is not None and family.unit == "images":
        if args.layer != "-1" or args.pooling != "mean" or args.max_length is not None:
            raise ConfigError("--layer, --pooling and --max-length are for text checkpoints; "
                              "an image checkpoint gives its pooled features")
        files = family.inputs(Path(args.input))
        embeddings = family.encoder(args.checkpoint).encode(
            files, batch_size=args.batch_size, normalize=args.normalize, progress=True)
        write_features(output, files, embeddings, overwrite=args.overwrite)
        return 0
    if Path(args.input).is_dir():  # a folder of images: only an image checkpoint reads it
        raise ConfigError(f"--input {args.input} is a folder, which needs an image checkpoint; "
                          f"--checkpoint {args.checkpoint} is not one (no config.json of a "
                          "timm / torchvision model there or in its final/)")
    check_checkpoint(args.checkpoint, args.max_length, layers)  # its config, no weights
    ids, texts = read_texts(Path(args.input), args.column, args.id_column)
    # the family's encoder; any other transformers encoder embeds too
    encoder = (family.encoder if family is not None else load)(args.checkpoint,
                                                                max_length=args.max_length)
    embeddings = encoder.encode(texts, pooling=args.pooling, layer=layers,
                                normalize=args.normalize, batch_size=args.batch_size,
                                progress=True)
    write_features(output, ids, embeddings, overwrite=args.overwrite)
    return 0


def _convert_long(args) -> int:
    from .registry import get_family

    print(get_family("longformer").convert_from(args.checkpoint, args.output,
                                                args.max_length, args.window))
    return 0


def _report(args) -> int:
    from .report import write_report

    print(write_report(args.run_dir, args.output))
    return 0


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    raise SystemExit(main())
