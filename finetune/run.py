"""`overture finetune` and `overture glue`: fine-tune on the engine, then write the
metrics, dev / test predictions and leaderboard files; run several tasks and seeds and
tabulate them."""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
from pathlib import Path

import numpy as np

from overture.atomic import write_text_atomic
from overture.config import ConfigError, Recipe, load_recipe, parse_overrides
from overture.data.prepare import IndexedDataset
from overture.finetune.classify import (LR_GRID, ClassifierModule,
                                         refuse_image_checkpoint, score_splits)
from overture.tasks import GLUE, SCORED, Task, get_task, load_task
from overture.tasks.metrics import glue_score
from overture.tasks.submission import prediction_strings, write_submission

BASE_RECIPE = "glue-finetune"
OPTION_KEYS = {"train.seed": "--seeds", "objective.task": "--tasks",
               "objective.checkpoint": "--checkpoint", "objective.data_dir": "--data-dir"}
"""Recipe keys that glue's own options set (a grid over them is refused)."""

log = logging.getLogger(__name__)


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


def finetune(recipe: Recipe, progress: bool = True, point: dict | None = None) -> dict:
    """Train (or resume) ``recipe``, then evaluate final/ (the best dev epoch) on the dev
    splits, write ``metrics.json``, ``dev_predictions.tsv`` and, for test splits,
    ``submission/<TASK>.tsv``; returns the metrics. They hold the majority-class
    baseline on the same dev sets, the label a collapsed model predicts for every
    example (warned about), each evaluation's training loss and dev metrics, and the
    grid ``point`` (the settings ``overture glue --grid`` varied), if any."""
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
    majority = majority_baseline(task, data.stats, references, splits)
    collapsed = one_class(task, predictions)
    if collapsed is not None:
        log.warning("%s: every dev prediction is class %r, so the model predicts one class "
                    "only (the majority-class baseline scores %.1f); try other learning "
                    "rates: %s", task.name, collapsed,
                    100 * majority["score"] if majority else float("nan"), LR_GRID)
    metrics = {"task": task.name, "checkpoint": recipe.objective.checkpoint,
               "init": recipe.objective.init, "seed": recipe.train.seed,
               "epochs": recipe.train.epochs, "lr": recipe.train.lr, "best_step": best,
               "dev": dev, "majority": majority, "collapsed_to": collapsed,
               "history": history(run_dir, recipe, data.stats["train_examples"]),
               "train_examples": data.stats["train_examples"],
               "train_truncated": data.stats.get("train_truncated", 0),
               "final": str(final), **({"point": point} if point else {})}
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def majority_baseline(task: Task, stats: dict, references, splits) -> dict | None:
    """The task's metrics on the dev splits for a model that always predicts the most
    frequent training label (``label``: its name); None for regression."""
    if task.is_regression:
        return None
    counts = [stats.get(f"train_label_{i}", 0) for i in range(task.num_labels)]
    label = int(np.argmax(counts))  # ties: the first label
    scores = score_splits(task, np.full_like(references, label), references, splits)
    return {**scores, "label": task.labels[label]}


def one_class(task: Task, predictions) -> str | None:
    """The label every prediction is, when the classifier predicts one class only on a
    dev set of more than one example; else None."""
    values = np.unique(np.asarray(predictions))
    if task.is_regression or len(predictions) < 2 or len(values) != 1:
        return None
    return task.labels[int(values[0])]


def history(run_dir: Path, recipe: Recipe, train_examples: int) -> list[dict]:
    """Every evaluation of the run from metrics.jsonl: its step, epoch, the mean training
    loss since the evaluation before (null at step 0) and the dev metrics."""
    from accelerate import PartialState

    from overture.metrics_log import read_records

    per_epoch = recipe.steps_per_epoch(train_examples, PartialState().num_processes)
    records, _ = read_records(run_dir / "metrics.jsonl")
    out = []
    for r in records:
        if r.get("split") != "eval":
            continue
        metrics = {k: v for k, v in r.items() if k not in ("split", "step", "train_loss", "time")
                   and isinstance(v, (int, float))}
        out.append({"step": r["step"], "epoch": r["step"] / per_epoch,
                    "train_loss": r.get("train_loss"), "dev": metrics})
    return out


def epoch_table(metrics: dict) -> str:
    """The console table of a fine-tuning run: each evaluation's epoch, step, training
    loss since the one before and the task's dev metrics (x100), then the majority-class
    baseline and the evaluation final/ holds."""
    task = get_task(metrics["task"]) if metrics["task"] in GLUE else None
    names = task.metrics if task else tuple(k for k in metrics["dev"] if k != "score")
    lines = ["| epoch | step | train loss | " + " | ".join(f"dev {n}" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for h in metrics["history"]:
        loss = "" if h["train_loss"] is None else f"{h['train_loss']:.4f}"
        shown = " | ".join(f"{100 * h['dev'][n]:.1f}" if n in h["dev"] else ""
                           for n in names)
        lines.append(f"| {h['epoch']:.2f} | {h['step']} | {loss} | {shown} |")
    majority = metrics.get("majority")
    if majority:
        lines.append(f"majority class ({majority['label']!r}): " + ", ".join(
            f"{n} {100 * majority[n]:.1f}" for n in names))
    best = metrics.get("best_step")
    lines.append(f"final/: step {best}, " if best is not None else "final/: ")
    lines[-1] += ", ".join(f"{n} {100 * metrics['dev'][n]:.1f}" for n in names)
    return "\n".join(lines) + "\n"


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


def parse_grid(items: list[str] | None, overrides: list[str] | None = None) -> list[dict]:
    """``--grid KEY=V1,V2,...`` options -> every point of their product, in order, each
    ``{key: value as typed}`` ([{}] without a grid). A key given twice, in the grid and
    as an override, or with no value, is refused in one line; so is any value that the
    recipe would refuse."""
    keys: dict[str, list[str]] = {}
    given = {item.partition("=")[0].strip() for item in overrides or []}
    for item in items or []:
        key, sep, values = (part.strip() for part in item.partition("="))
        options = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(options):
            raise ConfigError(f"--grid {item!r}: give KEY=V1,V2,... (e.g. --grid "
                              "train.lr=2e-5,5e-5,1e-4)")
        if key in keys:
            raise ConfigError(f"--grid {item!r}: {key} is already a grid axis; give its "
                              "values in one --grid")
        if key == "output_dir":
            raise ConfigError(f"--grid {item!r}: each point has its folder under --output-dir")
        if key in OPTION_KEYS:
            raise ConfigError(f"--grid {item!r}: {key} is set by {OPTION_KEYS[key]}; give a "
                              "grid of training settings (train.lr, train.epochs, ...)")
        if key in given:
            raise ConfigError(f"--grid {item!r}: {key} is also set by an override; give it "
                              "one way")
        for value in options:  # a bad value is named before any work
            load_recipe(BASE_RECIPE, [*(overrides or []), f"{key}={value}"])
        keys[key] = list(dict.fromkeys(options))
    points = [{}]
    for key, options in keys.items():
        points = [{**p, key: v} for p in points for v in options]
    return points


def point_name(point: dict) -> str:
    """A grid point as a folder name and a table label: "train.lr=2e-5,train.epochs=3"
    ("" without a grid)."""
    return ",".join(f"{k}={v}" for k, v in point.items()).replace("/", "_")


def run_glue(checkpoint: str, tasks: list[str], seeds: int, data_dir: str | None,
             output_dir: str, overrides: list[str] | None = None,
             progress: bool = True, grid: list[str] | None = None) -> dict:
    """Fine-tune every task ``seeds`` times (seeds 42, 43, ...) at every point of the
    ``grid`` (``KEY=V1,V2`` items), then tabulate the dev scores (mean ± std over seeds)
    and the GLUE score. With a grid, each task's reported point is the one with the best
    mean dev score over seeds, as Devlin et al. chose theirs. Tasks without data are named
    and skipped, and none that can run is an error. Writes ``glue.json`` and ``glue.md``
    into ``output_dir``: they describe every result there, earlier runs' seed folders
    (their metrics.json) included; this run's points and seeds replace the same ones of an
    earlier run."""
    load_recipe(BASE_RECIPE, overrides or [])  # the user's overrides: one line, before any work
    for item in overrides or []:  # every task and seed would train in (and resume from) one folder
        if item.partition("=")[0].strip() == "output_dir":
            raise ConfigError(f"{item}: glue writes each run to --output-dir/<task>/seed-<N>; "
                              "give --output-dir instead")
    points = parse_grid(grid, overrides)
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
    results: dict[str, dict[str, dict[int, dict]]] = {}
    for name in runnable:
        for point in points:
            label = point_name(point)
            for i in range(seeds):
                folder = out / name / label / f"seed-{42 + i}" if label else \
                    out / name / f"seed-{42 + i}"
                settings = [f"{k}={v}" for k, v in point.items()]
                recipe = finetune_recipe(checkpoint, name, data_dir, seed=42 + i, overrides=[
                    f"output_dir={folder}", *(overrides or []), *settings])
                metrics = finetune(recipe, progress=progress, point=point)
                print(f"glue: {name}{' ' + label if label else ''} seed {42 + i}\n"
                      + epoch_table(metrics))
                results.setdefault(name, {}).setdefault(label, {})[42 + i] = metrics
    kept = {}
    for name, by_point in earlier.items():
        for label, by_seed in by_point.items():
            left = sorted(set(by_seed) - set(results.get(name, {}).get(label, {})))
            if left:
                kept.setdefault(name, []).append((label, left))
    if kept:
        print(f"glue: {out}/glue.md keeps earlier results: " + ", ".join(
            f"{n} ({label + ' ' if label else ''}seed{'s' * (len(k) > 1)} "
            f"{', '.join(map(str, k))})" for n, items in kept.items() for label, k in items),
            file=sys.stderr)
    merged: dict[str, dict[str, list[dict]]] = {}
    for name in GLUE:
        labels = {*earlier.get(name, {}), *results.get(name, {})}
        for label in sorted(labels):
            by_seed = {**earlier.get(name, {}).get(label, {}),
                       **results.get(name, {}).get(label, {})}
            merged.setdefault(name, {})[label] = [by_seed[s] for s in sorted(by_seed)]
    table = glue_table(merged)
    table["skipped"] = {n: why for n, why in skipped.items() if n not in merged}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "glue.json", json.dumps(table, indent=2) + "\n")
    markdown = glue_markdown(table)
    write_text_atomic(out / "glue.md", markdown)
    print(markdown)
    return table


def glue_results(output_dir: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """The finished runs in a glue ``output_dir`` by task, grid point ("" without a grid)
    then seed: each ``<task>/[<point>/]seed-<N>/metrics.json`` of a GLUE task that holds
    its dev scores. A run that did not finish (no metrics.json) is not a result; an
    unreadable one is named."""
    found: dict[str, dict[str, dict[int, dict]]] = {}
    for name, task in GLUE.items():
        paths = [*Path(output_dir).glob(f"{name}/seed-*/metrics.json"),
                 *Path(output_dir).glob(f"{name}/*/seed-*/metrics.json")]
        for path in sorted(paths):
            seed = path.parent.name[len("seed-"):]
            if not (seed.isascii() and seed.isdigit()):
                continue
            label = "" if path.parent.parent.name == name else path.parent.parent.name
            try:
                metrics = json.loads(path.read_text(encoding="utf-8"))
                dev = metrics["dev"]
                complete = (metrics["task"] == name
                            and point_name(metrics.get("point") or {}) == label
                            and all(isinstance(dev[k], (int, float))
                                    for k in (*task.metrics, "score")))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                complete = False
            if not complete:
                print(f"glue: {path} is not a finished {name} result; left out of the "
                      "table", file=sys.stderr)
                continue
            found.setdefault(name, {}).setdefault(label, {})[int(seed)] = metrics
    return found


def _summary(task: Task, runs: list[dict]) -> dict:
    """Each metric's mean and std over seeds (std null for one seed: it is undefined)."""
    metrics = {}
    for key in (*task.metrics, "score"):
        values = [r["dev"][key] for r in runs]
        metrics[key] = {"mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else None,
                        "values": values}
    return metrics


def glue_table(results: dict[str, dict[str, list[dict]]]) -> dict:
    """Per task and grid point: each metric's mean and std over seeds. Per task, the
    point with the best mean score is reported, with the majority-class baseline and
    the seeds whose model predicted one class only; the GLUE score is over the scored
    tasks present."""
    tasks = {}
    for name, by_point in results.items():
        task = get_task(name)
        grid = {label: _summary(task, runs) for label, runs in by_point.items()}
        chosen = max(grid, key=lambda label: grid[label]["score"]["mean"])
        runs = by_point[chosen]
        majority = next((r["majority"] for r in runs if r.get("majority")), None)
        tasks[name] = {"seeds": len(runs), "seed_list": [r.get("seed") for r in runs],
                       "point": chosen, "metrics": grid[chosen], "majority": majority,
                       "collapsed_seeds": [r.get("seed") for r in runs if r.get("collapsed_to")],
                       "grid": {label: {"seeds": len(by_point[label]),
                                        "score": grid[label]["score"]} for label in grid}}
    scored = {n: t["metrics"]["score"]["mean"] for n, t in tasks.items() if n in SCORED}
    return {"tasks": tasks, "glue_score": glue_score(scored) if scored else None,
            "glue_tasks": sorted(scored), "glue_complete": sorted(scored) == sorted(SCORED)}


def _mean_std(metric: dict, seeds: int) -> str:
    if seeds > 1:
        return f"{100 * metric['mean']:.1f} ± {100 * metric['std']:.1f}"
    return f"{100 * metric['mean']:.1f}"  # the std of one value is undefined: the value alone


def glue_markdown(table: dict) -> str:
    """The table as Markdown: one row per task, metrics as mean ± std (×100), the
    majority-class baseline beside them and the grid point chosen; with a grid, every
    point's score after it."""
    lines = ["| task | metric | dev (mean ± std) | seeds | majority class | point |",
             "|---|---|---|---|---|---|"]
    for name, entry in table["tasks"].items():
        task = get_task(name)
        seeds = entry["seeds"]
        shown = " / ".join(_mean_std(entry["metrics"][m], seeds) for m in task.metrics)
        shown += "" if seeds > 1 else " (1 seed)"
        majority = entry.get("majority")
        base = " / ".join(f"{100 * majority[m]:.1f}" for m in task.metrics) if majority else "—"
        lines.append(f"| {name} | {' / '.join(task.metrics)} | {shown} | {seeds} | {base} | "
                     f"{entry.get('point') or '—'} |")
    score = table["glue_score"]
    if score is not None and not math.isnan(score):
        partial = "" if table["glue_complete"] else (
            f" (over {len(table['glue_tasks'])} of 9 tasks: {', '.join(table['glue_tasks'])})")
        lines.append(f"\nGLUE score: {100 * score:.1f}{partial}")
    if any(len(e.get("grid", {})) > 1 for e in table["tasks"].values()):
        lines.append("\nA task's point is chosen on the dev scores it reports, so they are "
                     "optimistic: compare test scores (submission/) for a fair figure.")
    for name, entry in table["tasks"].items():
        if entry.get("collapsed_seeds"):
            lines.append(f"\n{name}: the model of seed{'s' * (len(entry['collapsed_seeds']) > 1)} "
                         f"{', '.join(map(str, entry['collapsed_seeds']))} predicts one class "
                         "only on dev (see the majority-class column)")
    grids = {n: e["grid"] for n, e in table["tasks"].items() if len(e.get("grid", {})) > 1}
    if grids:
        lines += ["", "| task | point | dev score (mean ± std) | seeds |", "|---|---|---|---|"]
        for name, grid in grids.items():
            for label, entry in grid.items():
                mark = " (chosen)" if label == table["tasks"][name]["point"] else ""
                lines.append(f"| {name} | {label}{mark} | "
                             f"{_mean_std(entry['score'], entry['seeds'])} | {entry['seeds']} |")
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
