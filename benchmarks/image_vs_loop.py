"""Image training speed: overture's engine against a minimal hand-written loop (run by hand).

Both sides train the same timm model (the recipe's), on the same prepared images, with
the same training transforms (the recipe's RandAugment / crop pipeline, built by timm),
batch size, loader workers, AdamW settings, label smoothing and gradient clipping. The
hand loop is what a user would write: a DataLoader over the decoded images, forward,
cross-entropy, backward, clip, step. Images/s over the steps after --warmup; the two
sides alternate, --repeats rounds. The engine's own share of step time spent waiting for
data (``data_wait_fraction``) is reported too.

    .venv/bin/python -m benchmarks.image_vs_loop                    # resnet-tiny-digits
    .venv/bin/python -m benchmarks.image_vs_loop --recipe resnet-tiny-digits --steps 60
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import (alternate, cli, engine_run, fmt, machine, quiet, record,
                               spread, table)


def hand_loop(recipe, objective, steps: int, warmup: int) -> dict:
    """The minimal torch loop: same model, data, transforms, batch and optimizer."""
    import torch
    import torch.nn.functional as F

    from overture.pretrain.image.family import augment_from
    from overture.pretrain.image.data import decode_row

    cfg, obj = recipe.train, recipe.objective
    rows = objective.prepare(recipe.resolved_phases()[0], progress=False).train
    transform = augment_from(obj, recipe.data, auto_augment=obj.auto_augment).train()

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            row = rows[i]
            image = decode_row(row["image"], row["path"], row["height"], row["width"])
            return transform(image), row["label"]

    torch.manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(Images(), batch_size=cfg.batch_size, shuffle=True,
                                         drop_last=True, num_workers=cfg.num_workers,
                                         persistent_workers=cfg.num_workers > 0)
    model = objective.build_models()["model"].train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                  fused=True)
    done, started = 0, time.perf_counter()  # restarted after the warm-up steps
    while done < warmup + steps:
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels, label_smoothing=obj.label_smoothing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == warmup:
                started = time.perf_counter()
            if done == warmup + steps:
                break
    return {"images_per_s": steps * cfg.batch_size / (time.perf_counter() - started)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="resnet-tiny-digits")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for both sides (train.num_workers=2)")
    args = parser.parse_args(argv)
    quiet()

    from overture.config import load_recipe
    from overture.registry import build_objective

    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(args.recipe, [
            f"output_dir={tmp}/run", f"data.cache_dir={tmp}/cache", "train.eval_every=0",
            "train.save_every=0", "train.eval_batches=1", "train.log_every=10",
            "objective.ema_decay=0", *args.set])
        objective = build_objective(recipe)
        objective.prepare(recipe.resolved_phases()[0], progress=False)
        runs = alternate({
            "overture": lambda: engine_run(recipe, args.steps, args.warmup, Path(tmp) / "run"),
            "loop": lambda: hand_loop(recipe, objective, args.steps, args.warmup)},
            args.repeats)
    ours = spread([r["per_s"] for r in runs["overture"]])
    theirs = spread([r["images_per_s"] for r in runs["loop"]])
    wait = spread([r["data_wait_fraction"] for r in runs["overture"]])
    result = {"recipe": args.recipe, "overture": ours, "loop": theirs,
              "ratio": ours["median"] / theirs["median"], "data_wait_fraction": wait}
    print(f"\n{info['cpu']}, {info['threads']} threads, torch {info['torch']}; "
          f"{args.recipe}, batch {recipe.train.batch_size}, {recipe.train.num_workers} loader "
          f"workers; images/s median (min-max) of {args.repeats}")
    print(table(["recipe", "overture", "hand-written loop", "ratio", "overture data wait"],
                [[args.recipe, fmt(ours), fmt(theirs), f"{result['ratio']:.2f}x",
                  f"{wait['median']:.1%}"]]))
    print(f"recorded in {record('image_vs_loop', vars(args), [result], info)}")
    return [result]


if __name__ == "__main__":
    cli(main)
