"""Test helpers shared by several test files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from overture.config import load_recipe
from overture.registry import build_objective


# A trained text encoder, without gan-int-cls-digits' conditioning augmentation: with the
# tiny test encoder its projection steps by 10^3 to 10^4 in the tests' lr-1 SGD step, and
# float32 rounding there passes the 1e-6 these tests check to the other weights (the
# augmentation's accumulation with a frozen encoder: test_gan.py)
TRAINED_ENCODER = ("objective.train_text_encoder=true",
                   "objective.conditioning_augmentation=false", "objective.kl_weight=null")


def prepare(recipe, progress: bool = False, phase: int = 0) -> SimpleNamespace:
    """The family's objective and its prepared examples for ``phase``, in one namespace:
    objective, tokenizer, train, eval, stats, folder."""
    objective = build_objective(recipe)
    data = objective.prepare(recipe.resolved_phases()[phase], progress=progress)
    return SimpleNamespace(objective=objective, tokenizer=objective.tokenizer,
                           train=data.train, eval=data.eval, stats=data.stats,
                           folder=data.folder, data=data)


def records(run_dir: Path, split: str = "train") -> dict[int, dict]:
    """metrics.jsonl records of one split, by step."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == split}


IMAGE_TINY = {"image": "resnet-tiny-digits", "simclr": "simclr-tiny-digits",
              "gan-int-cls": "gan-int-cls-digits", "dfgan": "dfgan-digits"}
"""The CPU-sized recipe of each image family (text families: ``<family>-tiny``)."""
GAN_FAMILIES = ("gan-int-cls", "dfgan")
TEXT_ONLY = ("data.max_seq_len=", "data.corpus=", "tokenizer.")


def tiny_name(family: str) -> str:
    """The bundled CPU-sized recipe of ``family``."""
    return IMAGE_TINY.get(family, f"{family}-tiny")


def text_families() -> list[str]:
    """Registered families that train on text (tokens), classify excluded."""
    from overture.registry import get_family, list_families

    return [f for f in list_families() if get_family(f).unit == "tokens"]


def tiny(family: str, run_dir, cache_dir, corpus, *overrides: str):
    """The family's tiny recipe on ``corpus``, with a shared cache and a small vocabulary.
    Fine-tuning ("classify") gets a tiny BERT checkpoint and an SST-2-style task, both
    made from ``corpus`` (see ``classify_inputs``). Image families train on 64 of the
    bundled digits at 16x16 (the text-only overrides are dropped)."""
    # the helper's settings are defaults: a test's overrides replace them
    if family in GAN_FAMILIES:  # the tiny BERT of the fine-tuning tests as text encoder
        encoder, _ = classify_inputs(cache_dir, corpus)
        return load_recipe(IMAGE_TINY[family], [
            o for o in overrides if not o.startswith(TEXT_ONLY)], defaults=[
            f"data.cache_dir={cache_dir}", f"output_dir={run_dir}", "data.num_proc=1",
            "data.image_size=16", "data.max_train_examples=64", "train.batch_size=8",
            f"objective.text_encoder={encoder}", "objective.judge=null", "train.max_time=null",
            "model.noise_dim=8", "model.condition_dim=8", "model.generator_width=4",
            "model.discriminator_width=4", "objective.ema_decay=0.9",
            "objective.grid_columns=2", "train.eval_examples=null", "train.best_metric=null"])
    if family in IMAGE_TINY:
        return load_recipe(IMAGE_TINY[family], [
            o for o in overrides if not o.startswith(TEXT_ONLY)], defaults=[
            f"data.cache_dir={cache_dir}", f"output_dir={run_dir}", "data.num_proc=1",
            "data.image_size=16", "data.max_train_examples=64", "train.batch_size=8",
            "train.warmup_steps=2"])
    extra = []
    if family == "classify":
        checkpoint, glue = classify_inputs(cache_dir, corpus)
        # steps, not epochs, so that tests choose max_steps / save_every as for the others
        extra = [f"objective.checkpoint={checkpoint}", f"objective.data_dir={glue}",
                 "train.epochs=null", "train.interval_unit=steps", "train.eval_every=0",
                 "train.batch_size=8"]
    if family == "longformer":  # 1,024-token inputs are CPU minutes; the contract needs less
        extra = ["data.max_seq_len=256", "model.attention_window=32"]
    return load_recipe(f"{family}-tiny", list(overrides), defaults=[
        f"data.corpus=[{corpus}]", f"data.cache_dir={cache_dir}", f"output_dir={run_dir}",
        "data.num_proc=1", "tokenizer.vocab_size=1024", "tokenizer.min_frequency=1",
        *extra])


def continued(family: str, checkpoint, run_dir, cache_dir, corpus, *overrides: str):
    """The family's tiny recipe continuing ``checkpoint`` (model.init_from): its
    ``model:`` and ``tokenizer:`` sections left out, as a user's continued-pretraining
    recipe does, so the checkpoint's sizes and tokenizer are used; the data settings
    are ``tiny``'s."""
    import tempfile

    import yaml

    from overture.config import resolve_recipe_path

    raw = yaml.safe_load(resolve_recipe_path(tiny_name(family)).read_text())
    raw.pop("tokenizer", None)
    raw["model"] = {k: v for k, v in raw.get("model", {}).items()
                    if k in ("attention_window", "attention_dilation")}
    raw["model"]["init_from"] = str(checkpoint)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(raw, f)
    extra = ["data.max_seq_len=256", "model.attention_window=32"] if family == "longformer" else []
    return load_recipe(f.name, list(overrides), defaults=[
        f"data.corpus=[{corpus}]", f"data.cache_dir={cache_dir}", f"output_dir={run_dir}",
        "data.num_proc=1", *extra])


def classify_inputs(cache_dir, corpus) -> tuple[Path, Path]:
    """(checkpoint, GLUE folder) for fine-tuning tests, made once per cache: a tiny BERT
    (seed-0 weights, tokenizer trained on ``corpus``) exported as a transformers folder,
    and SST-2/train.tsv + dev.tsv in the official layout whose label says whether the
    sentence contains "the" (learnable, unbalanced)."""
    import random

    import torch

    cache_dir = Path(cache_dir)
    tag = Path(corpus).stem
    checkpoint, glue = cache_dir / f"tiny-bert-{tag}", cache_dir / f"glue-{tag}"
    if not (checkpoint / "config.json").is_file():
        objective = build_objective(tiny("bert", "unused", cache_dir, corpus))
        objective.load_tokenizer()
        torch.manual_seed(0)
        models = objective.build_models()
        objective.export(models, {"model": models["model"].state_dict()}, checkpoint)
    if not (glue / "SST-2" / "dev.tsv").is_file():
        text = Path(corpus).read_text(encoding="utf-8")
        sentences = [s.replace("\t", " ").strip() for s in text.replace("\n", " . ").split(" . ")]
        sentences = [s for s in sentences if 4 <= len(s.split()) <= 40]
        random.Random(0).shuffle(sentences)
        rows = [f"{s}\t{int('the' in s.lower().split())}" for s in sentences]
        cut = max(16, len(rows) // 10)
        (glue / "SST-2").mkdir(parents=True, exist_ok=True)
        for name, part in (("dev", rows[:cut]), ("train", rows[cut:])):
            (glue / "SST-2" / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(part) + "\n")
        test = [f"{i}\t{s}" for i, s in enumerate(sentences[:10])]
        (glue / "SST-2" / "test.tsv").write_text("index\tsentence\n" + "\n".join(test) + "\n")
    return checkpoint, glue


def sgd_step(recipe, objective, batches: list[dict], accelerator,
             max_grad_norm: float | None = None):
    """Parameters after one ``train_step`` over ``batches`` (accumulated), from the
    seed-0 initial models, flattened into one vector.

    Plain SGD at lr 1 (new = old - gradient) and no dropout, so any error in the loss
    normalisation (a factor, a double division, local instead of global counts) shows
    in the parameters. Models go through ``accelerator.prepare``: DDP when launched on
    several processes.
    """
    import torch

    from overture.engine import Trainer, train_step

    torch.manual_seed(0)
    models = objective.build_models()
    for module in models.values():
        module.eval()
    updates = objective.updates()
    optimizers = {u.name: torch.optim.SGD(
        [p for m in u.models for p in models[m].parameters()], lr=1.0) for u in updates}
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
                  for name, opt in optimizers.items()}
    models = {name: accelerator.prepare_model(m) for name, m in models.items()}
    cfg = recipe.train
    cfg.gradient_accumulation_steps, cfg.max_grad_norm = len(batches), max_grad_norm
    train_step(Trainer(objective, models, updates, optimizers, schedulers), iter(batches),
               accelerator, cfg, step=0)
    return torch.cat([p.detach().flatten() for m in models.values()
                      for p in accelerator.unwrap_model(m).parameters()])


EVAL_SETTINGS = ("train.batch_size=4", "train.eval_batches=7")
"""28 held-out examples in batches of 4: on two processes the second one's last batch is
Accelerate's padding."""


def eval_metrics(recipe, accelerator) -> dict:
    """The engine's evaluation of the family's seed-0 models on ``recipe``'s held-out
    examples (``train.eval_batches`` batches), plus the number of examples evaluated."""
    import torch

    from overture.engine import Trainer
    from overture.evaluation import eval_loader, evaluate

    data = prepare(recipe)
    phase = recipe.resolved_phases()[0]
    torch.manual_seed(0)
    models = {name: accelerator.prepare_model(m)
              for name, m in data.objective.build_models().items()}
    loader = eval_loader(data.eval, data.objective.collator(phase), phase, recipe,
                          accelerator)
    metrics = evaluate(Trainer(data.objective, models, [], {}, {}), loader, accelerator)
    return {**metrics, "examples": len(loader.dataset)}
