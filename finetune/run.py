"""`overture finetune` and `overture glue`: fine-tune on the engine, then write the
metrics, dev / test predictions and leaderboard files; run several tasks and seeds and
tabulate them."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

from overture.atomic import write_text_atomic
from overture.config import ConfigError, Recipe, load_recipe, parse_overrides
from overture.data.prepare import IndexedDataset
from overture.finetune.classify import (ClassifierModule, refuse_image_checkpoint,
                                         score_splits)
from overture.tasks import GLUE, SCORED, get_task, load_task
from overture.tasks.metrics import glue_score
from overture.tasks.submission import prediction_strings, write_submission

BASE_RECIPE = "glue-finetune"


def finetune_recipe(checkpoint: str, task: str, data_dir: str | None = None,
                    seed: int | None = None, overrides: list[str] | None = None) -> Recipe:
    """The fine-tuning recipe: glue-finetune's settings, the task's epochs, output folder
    and name as defaults, then the options and the user's KEY=VALUE overrides (which
    win). A ``train.max_steps`` given by the user replaces the epochs (as in
    ``transformers.Trainer``); giving both is an error (``load_recipe``)."""
    refuse_image_checkpoint(checkpoint, "--checkpoint")
    source = load_task(task, data_dir)
    name = source.task.name
    defaults = [f"train.epochs={source.task.epochs}", f"output_dir=runs/finetune/{name}",
                f"name=finetune-{name}"]
    options = [f"objective.checkpoint={checkpoint}", f"objective.task={task}",
               *([f"objective.data_dir={data_dir}"] if data_dir else []),
               *([f"train.seed={seed}"] if seed is not None else [])]
    # --checkpoint / --seed and a KEY=VALUE for the same key: refused, not one ignored
    parse_overrides([*options, *(overrides or [])], unique=True)
    return load_recipe(BASE_RECIPE, [*options, *(overrides or [])], defaults=defaults)


def finetune(recipe: Recipe, progress: bool = True) -> dict:
    """Train (or resume) ``recipe``, then evaluate final/ (the best dev epoch) on the dev
    splits, write ``metrics.json``, ``dev_predictions.tsv`` and, for test splits,
    ``submission/<TASK>.tsv``; returns the metrics."""
    from overture.engine import train
    from overture.registry import build_objective

    final = train(recipe, progress=progress)
    objective = build_objective(recipe)
    data = objective.prepare(recipe.resolved_phases()[0], progress=False)
    model = _load_classifier(final)
    run_dir = Path(recipe.output_dir)
    task = objective.task
    predictions, references, splits = _predict(model, objective, data.eval, recipe)
    dev = score_splits(task, predictions, references, splits)
    ids = json.loads((data.folder / "ids.json").read_text())
    lines = ["split\tid\tlabel\tprediction"]
    rows = np.asarray(data.eval["row"])
    for split_index, split in enumerate(task.dev_splits):
        keep = splits == split_index
        gold = prediction_strings(task, references[keep])
        pred = prediction_strings(task, predictions[keep])
        lines += [f"{split.name}\t{ids[split.name][r]}\t{g}\t{p}"
                  for r, g, p in zip(rows[keep], gold, pred)]
    write_text_atomic(run_dir / "dev_predictions.tsv", "\n".join(lines) + "\n")
    for name, dataset in objective.test.items():
        test_pred, _, _ = _predict(model, objective, dataset, recipe)
        order = np.asarray(dataset["row"])
        write_submission(run_dir / "submission", task, task.split(name),
                         [ids[name][r] for r in order], test_pred)
    if task.name == "mnli":
        _predict_diagnostic(model, objective, recipe, run_dir / "submission")
    best = _best_step(run_dir)
    metrics = {"task": task.name, "checkpoint": recipe.objective.checkpoint,
               "init": recipe.objective.init, "seed": recipe.train.seed,
               "epochs": recipe.train.epochs, "best_step": best, "dev": dev,
               "train_examples": data.stats["train_examples"],
               "train_truncated": data.stats.get("train_truncated", 0),
               "final": str(final)}
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _load_classifier(folder: Path):
    from transformers import AutoModelForSequenceClassification

    from overture.hub import load_pretrained

    return load_pretrained(AutoModelForSequenceClassification, str(folder)).eval()


def _predict(model, objective, dataset, recipe):
    """(predictions, references, split index) of every row of ``dataset``, in order."""
    import torch

    collator = objective.collator(recipe.resolved_phases()[0])
    rows = IndexedDataset(dataset)
    out = {"predictions": [], "references": [], "eval_split": []}
    wrapped = ClassifierModule(model, objective.task.is_regression)
    batch_size = recipe.train.batch_size
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = collator(rows.__getitems__(list(range(start, min(start + batch_size,
                                                                      len(rows))))))
            result = objective.forward({"model": wrapped}, batch, None)
            for key in out:
                out[key].append(result[key].cpu())
    return tuple(torch.cat(out[k]).numpy() for k in ("predictions", "references", "eval_split"))


def _predict_diagnostic(model, objective, recipe, folder: Path) -> None:
    """AX.tsv: the diagnostic set predicted by the MNLI model, when its file is there."""
    import torch

    source = load_task("ax", recipe.objective.data_dir, recipe.objective.hub_dataset)
    split = source.task.split("test")
    if not source.has(split):
        return
    rows = source.read(split)
    tok, predictions = objective.load_tokenizer(), []
    size = recipe.train.batch_size
    with torch.inference_mode():
        for start in range(0, len(rows), size):
            first, second = zip(*rows.texts[start:start + size])
            batch = tok(list(first), list(second), truncation=True, padding=True,
                        max_length=recipe.data.max_seq_len, return_tensors="pt")
            predictions.append(model(**batch).logits.argmax(-1))
    write_submission(folder, source.task, split, rows.ids, torch.cat(predictions).numpy())


def _best_step(run_dir: Path) -> int | None:
    state_files = sorted((run_dir / "checkpoints").glob("step-*/train_state.json"))
    if not state_files:
        return None
    return json.loads(state_files[-1].read_text()).get("best_step")


# --------------------------------------------------------------------------- glue


def run_glue(checkpoint: str, tasks: list[str], seeds: int, data_dir: str | None,
             output_dir: str, overrides: list[str] | None = None,
             progress: bool = True) -> dict:
    """Fine-tune every task ``seeds`` times (seeds 42, 43, ...), then tabulate the dev
    scores (mean ± std over seeds) and the GLUE score; tasks without data are named and
    skipped, and none that can run is an error. Writes ``glue.json`` and ``glue.md`` into
    ``output_dir``: they describe every result there, earlier runs' seed folders (their
    metrics.json) included; this run's seeds replace the same seeds of an earlier run."""
    load_recipe(BASE_RECIPE, overrides or [])  # the user's overrides: one line, before any work
    for item in overrides or []:  # every task and seed would train in (and resume from) one folder
        if item.partition("=")[0].strip() == "output_dir":
            raise ConfigError(f"{item}: glue writes each run to --output-dir/<task>/seed-<N>; "
                              "give --output-dir instead")
    runnable: list[str] = []
    skipped: dict[str, str] = {}
    why_not: dict[str, str] = {}  # every task that cannot run, AX included
    for name in tasks:
        task = get_task(name)
        if task.predict_with:  # AX: predicted with the MNLI model, no dev score
            why_not[task.name] = (f"predicted by the {task.predict_with} model, no dev score; "
                                  f"run {task.predict_with}")
            continue
        source = load_task(name, data_dir)
        missing = [str(source.path(s)) for s in (task.split("train"), *task.dev_splits)
                   if not source.has(s)]
        if missing:
            skipped[task.name] = why_not[task.name] = f"missing {', '.join(missing)}"
        elif task.name not in runnable:
            runnable.append(task.name)
    if not runnable:  # before any work
        given = ",".join(tasks) or "''"
        raise ConfigError(f"--tasks {given}: no task can run ("
                          + "; ".join(f"{n}: {why}" for n, why in why_not.items()) + ")")
    for name, why in skipped.items():
        print(f"glue: skipping {name}: {why}", file=sys.stderr)
    out = Path(output_dir)
    earlier = glue_results(out)  # what earlier runs left in output_dir
    results: dict[str, dict[int, dict]] = {}
    for name in runnable:
        for i in range(seeds):
            recipe = finetune_recipe(checkpoint, name, data_dir, seed=42 + i, overrides=[
                f"output_dir={out / name / f'seed-{42 + i}'}", *(overrides or [])])
            results.setdefault(name, {})[42 + i] = finetune(recipe, progress=progress)
    kept = {name: sorted(set(by_seed) - set(results.get(name, {})))
            for name, by_seed in earlier.items()}
    kept = {name: seeds_kept for name, seeds_kept in kept.items() if seeds_kept}
    if kept:
        print(f"glue: {out}/glue.md keeps earlier results: " + ", ".join(
            f"{n} (seed{'s' * (len(k) > 1)} {', '.join(map(str, k))})"
            for n, k in kept.items()), file=sys.stderr)
    merged = {name: {**earlier.get(name, {}), **results.get(name, {})}
              for name in GLUE if name in earlier or name in results}
    table = glue_table({name: [by_seed[s] for s in sorted(by_seed)]
                        for name, by_seed in merged.items()})
    table["skipped"] = {n: why for n, why in skipped.items() if n not in merged}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "glue.json", json.dumps(table, indent=2) + "\n")
    markdown = glue_markdown(table)
    write_text_atomic(out / "glue.md", markdown)
    print(markdown)
    return table


def glue_results(output_dir: Path) -> dict[str, dict[int, dict]]:
    """The finished runs in a glue ``output_dir`` by task then seed: each
    ``<task>/seed-<N>/metrics.json`` of a GLUE task that holds its dev scores. A run that
    did not finish (no metrics.json) is not a result; an unreadable one is named."""
    found: dict[str, dict[int, dict]] = {}
    for name, task in GLUE.items():
        for path in sorted(Path(output_dir).glob(f"{name}/seed-*/metrics.json")):
            seed = path.parent.name[len("seed-"):]
            if not (seed.isascii() and seed.isdigit()):
                continue
            try:
                metrics = json.loads(path.read_text(encoding="utf-8"))
                dev = metrics["dev"]
                complete = metrics["task"] == name and all(
                    isinstance(dev[k], (int, float)) for k in (*task.metrics, "score"))
            except (OSError, ValueError, KeyError, TypeError):
                complete = False
            if not complete:
                print(f"glue: {path} is not a finished {name} result; left out of the "
                      "table", file=sys.stderr)
                continue
            found.setdefault(name, {})[int(seed)] = metrics
    return found


def glue_table(results: dict[str, list[dict]]) -> dict:
    """Per task: each metric's mean and std over seeds (std null for one seed: it is
    undefined), and the task score; the GLUE score over the scored tasks present."""
    tasks = {}
    for name, runs in results.items():
        task = get_task(name)
        metrics = {}
        for key in (*task.metrics, "score"):
            values = [r["dev"][key] for r in runs]
            metrics[key] = {"mean": statistics.fmean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else None,
                            "values": values}
        tasks[name] = {"seeds": len(runs), "seed_list": [r.get("seed") for r in runs],
                       "metrics": metrics}
    scored = {n: t["metrics"]["score"]["mean"] for n, t in tasks.items() if n in SCORED}
    return {"tasks": tasks, "glue_score": glue_score(scored) if scored else None,
            "glue_tasks": sorted(scored), "glue_complete": sorted(scored) == sorted(SCORED)}


def glue_markdown(table: dict) -> str:
    """The table as Markdown: one row per task, metrics as mean ± std (×100)."""
    lines = ["| task | metric | dev (mean ± std) | seeds |", "|---|---|---|---|"]
    for name, entry in table["tasks"].items():
        task = get_task(name)
        if entry["seeds"] > 1:
            shown = " / ".join(f"{100 * entry['metrics'][m]['mean']:.1f} ± "
                               f"{100 * entry['metrics'][m]['std']:.1f}" for m in task.metrics)
        else:  # the std of one value is undefined: the value alone
            shown = " / ".join(f"{100 * entry['metrics'][m]['mean']:.1f}"
                               for m in task.metrics) + " (1 seed)"
        lines.append(f"| {name} | {' / '.join(task.metrics)} | {shown} | {entry['seeds']} |")
    score = table["glue_score"]
    if score is not None and not math.isnan(score):
        partial = "" if table["glue_complete"] else (
            f" (over {len(table['glue_tasks'])} of 9 tasks: {', '.join(table['glue_tasks'])})")
        lines.append(f"\nGLUE score: {100 * score:.1f}{partial}")
    for name, why in table.get("skipped", {}).items():
        lines.append(f"\nskipped {name}: {why}")
    return "\n".join(lines) + "\n"


def parse_tasks(spec: str) -> list[str]:
    """"all" or a comma-separated list of GLUE task names (at least one)."""
    if spec == "all":
        return list(GLUE)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"--tasks {spec!r} names no task; give all, or a comma-separated "
                          "list such as sst2,rte")
    for name in names:
        try:
            get_task(name)
        except KeyError as err:
            raise ConfigError(f"--tasks: {err.args[0]}") from None
    return names
