"""Fine-tuning on the engine: real SST-2, best-epoch selection, early stopping, epochs as
steps, length-grouped batches, MNLI's two dev sets, `overture finetune` / `glue`."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from helpers import classify_inputs, prepare, records, tiny
from overture.cli import main
from overture.config import load_recipe
from overture.engine import train
from overture.loaders import EpochSampler
from overture.finetune.classify import score_splits
from overture.finetune.run import finetune, finetune_recipe, run_glue
from overture.tasks import GLUE

GLUE_DIR = SHARED_DATA / "glue"


@pytest.fixture(scope="module")
def inputs(cache_dir, real_text):
    """(checkpoint, GLUE-layout folder) of the fine-tuning fixture (tests/helpers.py)."""
    return classify_inputs(cache_dir, real_text)


@pytest.mark.skipif(not (GLUE_DIR / "SST-2" / "dev.tsv").is_file(),
                    reason="../shared/data/glue is absent")
def test_a_few_steps_on_real_sst2_beat_the_majority_class(trained, cache_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    checkpoint = trained("bert") / "final"
    recipe = finetune_recipe(str(checkpoint), "sst2", str(GLUE_DIR), seed=0, overrides=[
        f"output_dir={tmp_path / 'sst2'}", f"data.cache_dir={cache_dir}", "train.epochs=null",
        "train.max_steps=300", "train.interval_unit=steps", "train.eval_every=0",
        "train.save_every=0", "train.lr=1e-3", "data.max_seq_len=64"])
    metrics = finetune(recipe, progress=False)
    dev = [line.split("\t") for line in
           (tmp_path / "sst2" / "dev_predictions.tsv").read_text().splitlines()[1:]]
    majority = max(np.mean([d[2] == "1" for d in dev]), np.mean([d[2] == "0" for d in dev]))
    assert len(dev) == 872
    assert metrics["dev"]["accuracy"] > majority + 0.03, (metrics["dev"], majority)
    assert metrics["dev"]["accuracy"] == pytest.approx(np.mean([d[2] == d[3] for d in dev]))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "sst2" / "final")
    assert model.config.id2label == {0: "0", 1: "1"}
    saved = json.loads((tmp_path / "sst2" / "metrics.json").read_text())
    assert saved["dev"] == metrics["dev"] and saved["task"] == "sst2"


def test_final_is_the_best_evaluation_and_scores_what_it_logged(inputs, cache_dir, real_text,
                                                                tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "best"
    recipe = tiny("classify", run, cache_dir, real_text, "train.max_steps=24",
                  "train.eval_every=6", "train.eval_batches=1000", "train.lr=1e-3",
                  "train.save_every=12")
    metrics = finetune(recipe, progress=False)
    evals = records(run, "eval")
    scored = {s: r["score"] for s, r in evals.items() if s > 0}
    best_step = max(scored, key=scored.get)  # the first of equals, as the engine keeps
    assert sorted(scored) == [6, 12, 18, 24]
    # the last checkpoint knows the final evaluation too (saved at 24 before it)
    state = json.loads((run / "checkpoints" / "step-000024" / "train_state.json").read_text())
    assert state["best_step"] == best_step
    assert state["evals_since_best"] == sum(s > best_step for s in scored)
    assert metrics["dev"]["score"] == pytest.approx(scored[best_step], abs=1e-6)
    final = load_file(str(run / "final" / "model.safetensors"))
    best = load_file(str(run / "best" / "model.safetensors"))
    assert all(torch.equal(final[k], best[k]) for k in best)
    dev = (run / "dev_predictions.tsv").read_text().splitlines()
    assert dev[0] == "split\tid\tlabel\tprediction" and len(dev) - 1 == metrics_rows(run)
    submission = (run / "submission" / "SST-2.tsv").read_text().splitlines()
    assert submission[0] == "index\tprediction" and len(submission) == 11
    assert {line.split("\t")[1] for line in submission[1:]} <= {"0", "1"}


def metrics_rows(run: Path) -> int:
    """Rows of the fixture's dev file."""
    recipe = load_recipe(run / "final" / "recipe.yaml")
    return len((Path(recipe.objective.data_dir) / "SST-2" / "dev.tsv").read_text()
               .splitlines()) - 1


def test_mnli_scores_both_dev_sets_and_predicts_the_diagnostic(inputs, cache_dir, real_text,
                                                              tmp_path):
    checkpoint, _ = inputs
    glue = tmp_path / "glue"
    header = "index\tgenre\tsentence1\tsentence2\tgold_label\n"
    labels = ("entailment", "neutral", "contradiction")
    sentences = [s for s in real_text.read_text(encoding="utf-8").splitlines()
                 if 5 < len(s.split()) < 30][:120]
    rows = [f"{i}\tfiction\t{a}\t{b}\t{labels[i % 3]}"
            for i, (a, b) in enumerate(zip(sentences[::2], sentences[1::2]))]
    (glue / "MNLI").mkdir(parents=True)
    (glue / "MNLI" / "train.tsv").write_text(header + "\n".join(rows[:40]) + "\n")
    (glue / "MNLI" / "dev_matched.tsv").write_text(header + "\n".join(rows[40:50]) + "\n")
    (glue / "MNLI" / "dev_mismatched.tsv").write_text(header + "\n".join(rows[50:60]) + "\n")
    (glue / "diagnostic").mkdir()
    (glue / "diagnostic" / "diagnostic.tsv").write_text(
        "index\tsentence1\tsentence2\n0\tThe cat sat.\tA cat sat.\n1\tIt rains.\tIt is dry.\n")
    recipe = finetune_recipe(str(checkpoint), "mnli", str(glue), seed=0, overrides=[
        f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}", "train.epochs=1",
        "train.batch_size=8", "data.max_seq_len=64"])
    metrics = finetune(recipe, progress=False)["dev"]
    assert set(metrics) >= {"dev_matched_accuracy", "dev_mismatched_accuracy", "accuracy"}
    assert metrics["accuracy"] == pytest.approx(
        (metrics["dev_matched_accuracy"] + metrics["dev_mismatched_accuracy"]) / 2)
    logged = records(tmp_path / "run", "eval")
    assert logged[max(logged)]["dev_matched_accuracy"] == pytest.approx(
        metrics["dev_matched_accuracy"])
    ax = (tmp_path / "run" / "submission" / "AX.tsv").read_text().splitlines()
    assert ax[0] == "index\tprediction" and len(ax) == 3
    assert {line.split("\t")[1] for line in ax[1:]} <= set(labels)


@pytest.mark.parametrize("task, epochs", [("sst2", 3), ("mrpc", 5), ("cola", 10), ("stsb", 10),
                                          ("rte", 10), ("wnli", 10), ("mnli", 3)])
def test_each_task_gets_its_default_epochs_and_the_papers_settings(task, epochs):
    recipe = finetune_recipe("some/checkpoint", task)
    cfg = recipe.train
    assert cfg.epochs == epochs and recipe.objective.task == task
    assert (cfg.lr, cfg.batch_size, recipe.data.max_seq_len, cfg.warmup_ratio) == (
        2e-5, 32, 128, 0.1)
    overridden = finetune_recipe("some/checkpoint", task, overrides=["train.epochs=1"])
    assert overridden.train.epochs == 1  # the user's override wins


def test_early_stopping_ends_the_run_after_evaluations_without_progress(inputs, cache_dir,
                                                                        real_text, tmp_path):
    run = tmp_path / "stopped"
    # lr 1e-12: the model does not move, so the second evaluation is no better
    train(tiny("classify", run, cache_dir, real_text, "train.max_steps=40", "train.eval_every=4",
               "train.eval_batches=1000", "train.lr=1e-12", "train.early_stopping_patience=1",
               "train.save_every=0", "train.log_every=1"), progress=False)
    assert max(records(run)) == 8  # stopped at the second evaluation, not step 40
    assert (run / "final" / "config.json").is_file()


def test_epochs_and_epoch_intervals_become_steps():
    recipe = load_recipe("glue-finetune", ["train.batch_size=8",
                                           "train.gradient_accumulation_steps=2",
                                           "train.epochs=3", "train.warmup_ratio=0.1"])
    resolved = recipe.for_dataset(examples=100, processes=1)  # 12 batches: 6 steps / epoch
    assert resolved.train.max_steps == 18 and resolved.total_steps == 18
    assert resolved.train.eval_every == 6 and resolved.train.save_every == 6
    assert resolved.train.warmup_steps == 2  # ceil(0.1 x 18)
    assert recipe.train.interval_unit == "epochs"  # the original is unchanged


def test_length_grouped_order_is_a_seeded_permutation_with_sorted_groups():
    lengths = torch.randint(1, 100, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = EpochSampler(1000, seed=1, lengths=lengths, group=100)
    first = list(sampler)
    assert sorted(first) == list(range(1000)) and list(sampler) == first
    for start in range(0, 1000, 100):
        group = [lengths[i] for i in first[start:start + 100]]
        assert group == sorted(group, reverse=True)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_two_dev_sets_are_scored_apart_and_averaged():
    mnli = GLUE["mnli"]
    predictions = np.array([0, 1, 2, 0, 0, 0])
    references = np.array([0, 1, 2, 0, 1, 2])
    splits = np.array([0, 0, 0, 1, 1, 1])
    got = score_splits(mnli, predictions, references, splits)
    assert got["dev_matched_accuracy"] == 1.0
    assert got["dev_mismatched_accuracy"] == pytest.approx(1 / 3)
    assert got["accuracy"] == got["score"] == pytest.approx(2 / 3)


def test_finetune_command_errors_are_one_line_with_exit_2(inputs, tmp_path, capsys):
    import shutil

    checkpoint, glue = inputs
    broken_tokenizer, no_weights = tmp_path / "broken-tokenizer", tmp_path / "no-weights"
    shutil.copytree(checkpoint, broken_tokenizer)
    (broken_tokenizer / "tokenizer.json").write_text('{"model": ')
    shutil.copytree(checkpoint, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    cases = [(["--task", "sst3"], "did you mean 'sst2'"),
             (["--task", "ax"], "predicted by a mnli model"),
             (["--task", "sst2", "--data-dir", str(tmp_path)],
              str(tmp_path / "SST-2" / "train.tsv")),
             (["--task", "sst2", "--data-dir", str(glue), "--checkpoint", str(tmp_path)],
              "no config.json"),
             (["--task", "sst2", "--data-dir", str(glue), "--checkpoint", str(checkpoint),
               "train.epochs=-1"], "train.epochs=-1.0 must be positive"),
             (["--task", "sst2", "--data-dir", str(glue), "--checkpoint", str(broken_tokenizer)],
              f"objective.checkpoint='{broken_tokenizer}': cannot load its tokenizer ("),
             (["--task", "sst2", "--data-dir", str(glue), "--checkpoint", str(no_weights),
               "data.max_seq_len=32", f"data.cache_dir={tmp_path / 'cache'}"],
              f"objective.checkpoint='{no_weights}': cannot load its weights (")]
    for args, message in cases:
        argv = ["finetune", "--checkpoint", str(tmp_path / "nowhere"), *args,
                f"output_dir={tmp_path / 'run'}"]
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()  # nothing made for a bad input


def test_glue_tabulates_seeds_and_names_missing_tasks(inputs, cache_dir, real_text, tmp_path):
    checkpoint, glue = inputs
    table = run_glue(str(checkpoint), ["sst2", "rte"], seeds=2, data_dir=str(glue),
                     output_dir=str(tmp_path / "glue"), progress=False, overrides=[
                         f"data.cache_dir={cache_dir}",  # max_steps wins over sst2's epochs
                         "train.max_steps=6", "train.interval_unit=steps", "train.eval_every=0",
                         "train.save_every=0", "data.max_seq_len=32", "train.batch_size=8"])
    sst2 = table["tasks"]["sst2"]["metrics"]["accuracy"]
    assert len(sst2["values"]) == 2 and sst2["mean"] == pytest.approx(np.mean(sst2["values"]))
    assert "rte" in table["skipped"] and "RTE" in table["skipped"]["rte"]
    markdown = (tmp_path / "glue" / "glue.md").read_text()
    assert "| sst2 | accuracy |" in markdown and "skipped rte" in markdown
    assert "over 1 of 9 tasks" in markdown
    assert json.loads((tmp_path / "glue" / "glue.json").read_text())["glue_tasks"] == ["sst2"]
    for seed in (42, 43):
        assert (tmp_path / "glue" / "sst2" / f"seed-{seed}" / "final" / "config.json").is_file()
        assert max(records(tmp_path / "glue" / "sst2" / f"seed-{seed}")) == 6


GLUE_QUICK = ["train.max_steps=1", "train.interval_unit=steps", "train.eval_every=0",
              "train.save_every=0", "data.max_seq_len=32", "train.batch_size=8"]


def _sst2_and_rte(glue: Path, folder: Path, rows: int = 64) -> Path:
    """The first ``rows`` of the fixture's SST-2 train / dev, and an RTE made of them
    (label: "the" in the first sentence)."""
    (folder / "SST-2").mkdir(parents=True)
    (folder / "RTE").mkdir()
    for split in ("train", "dev"):
        lines = (glue / "SST-2" / f"{split}.tsv").read_text().splitlines()[:rows + 1]
        (folder / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        pairs = [line.split("\t") for line in lines[1:]]
        (folder / "RTE" / f"{split}.tsv").write_text(
            "index\tsentence1\tsentence2\tlabel\n" + "".join(
                f"{i}\t{s}\t{s[::-1]}\t{'entailment' if y == '1' else 'not_entailment'}\n"
                for i, (s, y) in enumerate(pairs)))
    return folder


def test_glue_table_keeps_earlier_tasks_and_a_rerun_replaces_its_own_seed(
        inputs, cache_dir, tmp_path, capsys):
    checkpoint, glue = inputs
    data, out = _sst2_and_rte(glue, tmp_path / "data"), tmp_path / "G"
    common = ["--checkpoint", str(checkpoint), "--data-dir", str(data), "--seeds", "1",
              "--output-dir", str(out), f"data.cache_dir={cache_dir}", *GLUE_QUICK]
    assert main(["glue", "--tasks", "rte", *common]) == 0
    earlier = json.loads((out / "rte" / "seed-42" / "metrics.json").read_text())
    rte = earlier["dev"]["accuracy"]
    # an earlier sst2 seed 42 too: this run's seed 42 replaces it (it shows if it were kept)
    (out / "sst2" / "seed-42").mkdir(parents=True)
    (out / "sst2" / "seed-42" / "metrics.json").write_text(json.dumps(
        {**earlier, "task": "sst2", "dev": {"accuracy": 0.123, "score": 0.123}}))
    capsys.readouterr()
    assert main(["glue", "--tasks", "sst2", *common]) == 0
    kept = [line for line in capsys.readouterr().err.splitlines() if "earlier" in line]
    assert kept == [f"glue: {out}/glue.md keeps earlier results: rte (seed 42)"]
    table = json.loads((out / "glue.json").read_text())
    sst2 = json.loads((out / "sst2" / "seed-42" / "metrics.json").read_text())["dev"]["accuracy"]
    assert list(table["tasks"]) == ["sst2", "rte"] and table["glue_tasks"] == ["rte", "sst2"]
    assert table["tasks"]["rte"]["metrics"]["accuracy"]["values"] == [rte]
    assert table["tasks"]["sst2"]["metrics"]["accuracy"]["values"] == [sst2]
    # one seed: the std is undefined, so null in glue.json and no "± 0.0" in glue.md
    assert table["tasks"]["rte"]["metrics"]["accuracy"]["std"] is None
    assert table["tasks"]["rte"]["seed_list"] == [42]
    markdown = (out / "glue.md").read_text()
    assert f"| rte | accuracy | {100 * rte:.1f} (1 seed) | 1 |" in markdown
    assert f"| sst2 | accuracy | {100 * sst2:.1f} (1 seed) | 1 |" in markdown
    assert "± 0.0" not in markdown and "over 2 of 9 tasks: rte, sst2" in markdown
    assert sst2 != 0.123


def test_glue_with_no_task_that_can_run_is_a_one_line_error(inputs, tmp_path, capsys):
    checkpoint, glue = inputs
    base = ["glue", "--checkpoint", str(checkpoint), "--data-dir", str(glue),
            "--output-dir", str(tmp_path / "G")]
    cases = {"": "error: --tasks '' names no task; give all, or a comma-separated list such "
                 "as sst2,rte",
             " , ": "error: --tasks ' , ' names no task; give all, or a comma-separated list "
                    "such as sst2,rte",
             "mrpc": f"error: --tasks mrpc: no task can run (mrpc: missing "
                     f"{glue / 'MRPC' / 'train.tsv'}, {glue / 'MRPC' / 'dev.tsv'})",
             "ax,rte": f"error: --tasks ax,rte: no task can run (ax: predicted by the mnli "
                       f"model, no dev score; run mnli; rte: missing "
                       f"{glue / 'RTE' / 'train.tsv'}, {glue / 'RTE' / 'dev.tsv'})"}
    for tasks, message in cases.items():
        assert main([*base, "--tasks", tasks]) == 2, tasks
        assert capsys.readouterr().err.strip().splitlines() == [message]
    assert not (tmp_path / "G").exists()


def test_glue_refuses_an_output_dir_override_that_would_train_every_run_in_one_folder(
        inputs, tmp_path, capsys):
    checkpoint, glue = inputs
    assert main(["glue", "--checkpoint", str(checkpoint), "--data-dir", str(glue), "--tasks",
                 "sst2", "--output-dir", str(tmp_path / "G"), "--seeds", "2",
                 f"output_dir={tmp_path / 'one'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: output_dir={tmp_path / 'one'}: glue writes each run to "
        "--output-dir/<task>/seed-<N>; give --output-dir instead"]
    assert list(tmp_path.iterdir()) == []


def test_long_inputs_are_cut_to_max_seq_len_and_counted(inputs, cache_dir, real_text):
    from helpers import prepare

    recipe = tiny("classify", "unused", cache_dir, real_text, "data.max_seq_len=24")
    data = prepare(recipe)
    tok = data.tokenizer
    glue = Path(recipe.objective.data_dir)
    sentences = [line.split("\t")[0] for line in
                 (glue / "SST-2" / "train.tsv").read_text().splitlines()[1:]]
    long = sum(len(tok(s)["input_ids"]) > 24 for s in sentences)
    assert data.stats["train_truncated"] == long > 0
    lengths = data.train["length"]
    assert max(lengths) == 24 and sum(n == 24 for n in lengths) >= long
    assert all(len(ids) == n for ids, n in zip(data.train["input_ids"], lengths))


# ----------------------------------------------------------------------------- issue 18


def test_a_custom_tsv_task_with_quoted_sentences_prepares_every_row(inputs, cache_dir,
                                                                   real_text, tmp_path):
    from helpers import prepare
    from test_tasks import write_mrpc_style_task

    spec, train_rows, dev_rows = write_mrpc_style_task(tmp_path)
    recipe = tiny("classify", "unused", cache_dir, real_text, f"objective.task={spec}",
                  "data.max_seq_len=128")
    data = prepare(recipe)
    assert data.stats["train_examples"] == len(data.train) == 40
    assert data.stats["dev_examples"] == 8 and data.stats["train_skipped"] == 0
    tok = data.tokenizer
    for i in (0, 3, 5):  # rows whose first or second sentence starts with a quote
        row = train_rows[i]
        assert data.train["input_ids"][i] == tok(row[3], row[4])["input_ids"]
    assert data.train["label"] == [int(r[0]) for r in train_rows]


def _steps(run: Path) -> tuple[int, list[str]]:
    """(last train step logged, checkpoint folder names) of a run."""
    return max(records(run)), sorted(p.name for p in (run / "checkpoints").iterdir())


def test_max_steps_given_by_the_user_wins_over_the_task_epochs(inputs, cache_dir, tmp_path,
                                                              capsys):
    from test_tasks import write_mrpc_style_task

    checkpoint, _ = inputs
    spec, _, _ = write_mrpc_style_task(tmp_path)
    run = tmp_path / "run"
    # the task's 3 epochs of 40 rows at batch 4 would be 30 steps
    assert main(["finetune", "--checkpoint", str(checkpoint), "--task", str(spec),
                 f"output_dir={run}", f"data.cache_dir={cache_dir}", "train.max_steps=3",
                 "train.batch_size=4", "data.max_seq_len=64"]) == 0
    assert _steps(run) == (3, ["step-000003"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] is None and metrics["best_step"] == 3
    assert metrics["train_examples"] == 40  # every MRPC-style row, quotes and all
    assert set(metrics["dev"]) == {"accuracy", "f1", "score"}
    # the recipe alone: max_steps stays what was given, however many examples
    for overrides in (["train.max_steps=20"], ["train.epochs=null", "train.max_steps=20"]):
        recipe = finetune_recipe("some/checkpoint", "mrpc", overrides=overrides)
        assert recipe.train.epochs is None
        assert recipe.for_dataset(examples=3668, processes=1).train.max_steps == 20
    phased = finetune_recipe("some/checkpoint", "mrpc", overrides=["phases=[{steps: 7}]"])
    assert phased.for_dataset(examples=3668, processes=1).total_steps == 7
    default = finetune_recipe("some/checkpoint", "mrpc")  # no max_steps: the task's epochs
    assert default.train.epochs == 5
    assert default.for_dataset(examples=3668, processes=1).train.max_steps == 570  # 5 x 114


def test_max_steps_and_epochs_together_are_refused_in_one_line(inputs, tmp_path, capsys):
    checkpoint, glue = inputs
    for command in ("finetune", "glue"):
        task = (["--task", "sst2"] if command == "finetune"
                else ["--tasks", "sst2", "--output-dir", str(tmp_path / "run")])
        assert main([command, "--checkpoint", str(checkpoint), *task, "--data-dir", str(glue),
                     f"output_dir={tmp_path / 'run'}", "train.max_steps=20",
                     "train.epochs=2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert ("command-line overrides 'train.max_steps=20' and 'train.epochs=2' both set "
                "the length of training") in err[0]
    assert not (tmp_path / "run").exists()


def test_an_image_checkpoint_with_a_task_points_to_images(trained, inputs, tmp_path, capsys):
    _, glue = inputs
    image_run = trained("image")
    for checkpoint in (image_run, image_run / "final"):
        assert main(["finetune", "--checkpoint", str(checkpoint), "--task", "sst2",
                     "--data-dir", str(glue), f"output_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --checkpoint {checkpoint}: an image checkpoint (timm / "
                       "torchvision) has no tokenizer; fine-tune it on labelled images "
                       "with --images DIR instead of --task"]
    assert not (tmp_path / "run").exists()


def test_a_gpt_checkpoint_fine_tunes_and_padding_does_not_change_its_predictions(
        trained, inputs, cache_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from test_tasks import write_mrpc_style_task

    spec, _, _ = write_mrpc_style_task(tmp_path)
    run = tmp_path / "gpt-pairs"
    recipe = finetune_recipe(str(trained("gpt")), str(spec), seed=0, overrides=[
        f"output_dir={run}", f"data.cache_dir={cache_dir}", "train.max_steps=2",
        "train.batch_size=4", "data.max_seq_len=64", "train.lr=1e-3"])
    finetune(recipe, progress=False)
    assert _steps(run) == (2, ["step-000002"])
    tok = AutoTokenizer.from_pretrained(run / "final")
    model = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    assert tok.pad_token == tok.eos_token and model.config.pad_token_id == tok.pad_token_id
    texts = ["the cat sat on the mat and looked at the door for a long time .", "it rains ."]
    with torch.inference_mode():
        batch = tok(texts, padding=True, return_tensors="pt")
        assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # padded
        padded = model(**batch).logits
        single = torch.cat([model(**tok([t], return_tensors="pt")).logits for t in texts])
    assert torch.allclose(padded, single, atol=1e-5), (padded, single)
    assert padded.argmax(-1).tolist() == single.argmax(-1).tolist()


def test_building_the_classifier_logs_one_line_instead_of_the_load_report(
        inputs, cache_dir, real_text, capfd, caplog):
    import logging

    from overture.registry import build_objective

    objective = build_objective(tiny("classify", "unused", cache_dir, real_text))
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="overture.hub"):
        objective.build_models()
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "UNEXPECTED" not in out + err
    lines = [r.getMessage() for r in caplog.records if r.name == "overture.hub"]
    assert len(lines) == 1 and lines[0].endswith(
        "cls.* unused (7 tensors); classifier.* new (2 tensors)"), lines


def test_an_option_and_an_override_of_the_same_key_are_refused(inputs, tmp_path, capsys):
    """--checkpoint A objective.checkpoint=B would check A and train B; --seed 1
    train.seed=2 would run one seed twice: both refused in one line, nothing written."""
    checkpoint, glue = inputs
    for option, override in ((["--checkpoint", str(checkpoint)], "objective.checkpoint=other"),
                             (["--checkpoint", str(checkpoint), "--seed", "1"], "train.seed=2")):
        assert main(["finetune", *option, "--task", "sst2", "--data-dir", str(glue),
                     f"output_dir={tmp_path / 'run'}", override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "set the same key; give it once" in err[0], err
        assert override in err[0]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- diagnostics


def test_each_evaluation_logs_the_training_loss_since_the_one_before_and_the_table_shows_it(
        inputs, cache_dir, real_text, tmp_path):
    from overture.finetune.run import epoch_table

    run = tmp_path / "run"
    recipe = lambda out, *extra: tiny(  # noqa: E731
        "classify", out, cache_dir, real_text, "train.max_steps=6", "train.log_every=1",
        "train.eval_every=3", "train.save_every=4", "train.lr=1e-3", *extra)
    metrics = finetune(recipe(run), progress=False)
    steps, evals = records(run), records(run, "eval")
    # batches of 8 examples: every step weighs the same, so the mean of the step losses
    assert evals[3]["train_loss"] == pytest.approx(np.mean([steps[s]["loss"] for s in (1, 2, 3)]))
    assert evals[6]["train_loss"] == pytest.approx(np.mean([steps[s]["loss"] for s in (4, 5, 6)]))
    assert "train_loss" not in evals[0]  # the untrained baseline follows no training
    # resumed from step 4, the sums of step 4 come back with the checkpoint
    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "checkpoints" / "step-000006")
    shutil.rmtree(again / "final")
    (again / "metrics.jsonl").write_text("")
    finetune(recipe(again), progress=False)
    assert records(again, "eval")[6]["train_loss"] == pytest.approx(evals[6]["train_loss"],
                                                                    abs=1e-6)
    # the console table: each evaluation's epoch, step, training loss and dev accuracy
    per_epoch = recipe(run).steps_per_epoch(metrics["train_examples"], 1)
    table = epoch_table(metrics).splitlines()
    assert table[0] == "| epoch | step | train loss | dev accuracy |"
    assert table[2] == f"| 0.00 | 0 |  | {100 * evals[0]['accuracy']:.1f} |"
    assert table[4] == (f"| {6 / per_epoch:.2f} | 6 | {evals[6]['train_loss']:.4f} | "
                        f"{100 * evals[6]['accuracy']:.1f} |")
    dev = [line.split("\t") for line in (run / "dev_predictions.tsv").read_text().splitlines()[1:]]
    majority = metrics["majority"]
    assert table[5] == f"majority class ({majority['label']!r}): accuracy {100 * majority['accuracy']:.1f}"
    assert table[6] == (f"final/: step {metrics['best_step']}, accuracy "
                        f"{100 * metrics['dev']['accuracy']:.1f}")
    # the majority label is the training set's; its score is its share of dev
    train_labels = [line.split("\t")[1] for line in
                    (inputs[1] / "SST-2" / "train.tsv").read_text().splitlines()[1:]]
    label = max(("0", "1"), key=train_labels.count)
    assert majority["label"] == label
    assert majority["accuracy"] == pytest.approx(np.mean([d[2] == label for d in dev]))


def test_the_collapse_warning_fires_on_a_constant_predictor_and_not_otherwise(
        inputs, cache_dir, real_text, tmp_path, monkeypatch, caplog):
    import overture.finetune.run as run_module
    from overture.finetune.run import one_class

    task = GLUE["sst2"]
    assert one_class(task, np.zeros(7, int)) == "0" and one_class(task, np.ones(7, int)) == "1"
    assert one_class(task, np.array([0, 1, 1])) is None
    assert one_class(task, np.array([1])) is None  # one example is no evidence
    assert one_class(GLUE["stsb"], np.full(5, 2.5)) is None  # regression: no classes

    def run(name):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="overture.finetune.run"):
            metrics = finetune(tiny("classify", tmp_path / name, cache_dir, real_text,
                                    "train.max_steps=120", "train.lr=1e-3",
                                    "data.max_seq_len=32"), progress=False)
        return metrics, [r.getMessage() for r in caplog.records if "one class" in r.getMessage()]

    metrics, warned = run("learns")
    predicted = {line.split("\t")[3] for line in
                 (tmp_path / "learns" / "dev_predictions.tsv").read_text().splitlines()[1:]}
    assert len(predicted) == 2 and metrics["collapsed_to"] is None and warned == []
    # the same run whose classifier then says "1" for everything
    real = run_module._predict

    def constant(*args):
        predictions, references, splits = real(*args)
        return np.ones_like(predictions), references, splits

    monkeypatch.setattr(run_module, "_predict", constant)
    metrics, warned = run("constant")
    assert metrics["collapsed_to"] == "1"
    assert warned == [f"sst2: every dev prediction is class '1', so the model predicts one class "
                      f"only (the majority-class baseline scores "
                      f"{100 * metrics['majority']['score']:.1f}); try other learning rates: "
                      "overture glue --grid train.lr=2e-5,5e-5,1e-4,3e-4"]
    saved = json.loads((tmp_path / "constant" / "metrics.json").read_text())
    assert saved["collapsed_to"] == "1"


def test_fine_tuning_logs_the_flops_of_its_examples(inputs, cache_dir, real_text, tmp_path):
    from transformers import AutoConfig

    run = tmp_path / "run"
    recipe = tiny("classify", run, cache_dir, real_text, "train.max_steps=4", "train.log_every=2")
    train(recipe, progress=False)
    data = prepare(recipe)
    lengths = np.asarray(data.train["length"], dtype=float)
    c = AutoConfig.from_pretrained(inputs[0])
    L, H, inner = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    # 6 x the layers' weights per token, and attention over each example's own length
    per_example = (6 * L * (4 * H * H + 2 * H * inner) * lengths.mean()
                   + 12 * L * H * (lengths ** 2).mean())
    for record in records(run).values():
        assert record["tflops"] == pytest.approx(
            per_example * record["examples_per_s"] / 1e12, rel=1e-9)
        assert record["tflops"] > 0


def test_the_grid_picks_the_point_with_the_best_mean_over_seeds(inputs, cache_dir, tmp_path,
                                                              capsys):
    from overture.finetune.run import glue_table

    # the best single run is at point a, the best mean at point b: b is chosen
    def result(score, seed):
        return {"task": "rte", "seed": seed, "dev": {"accuracy": score, "score": score},
                "majority": {"accuracy": 0.5, "score": 0.5, "label": "entailment"}}

    table = glue_table({"rte": {"train.lr=1e-3": [result(0.90, 42), result(0.50, 43)],
                                "train.lr=1e-4": [result(0.75, 42), result(0.74, 43)]}})
    assert table["tasks"]["rte"]["point"] == "train.lr=1e-4"
    assert table["tasks"]["rte"]["metrics"]["accuracy"]["values"] == [0.75, 0.74]
    assert table["tasks"]["rte"]["grid"]["train.lr=1e-3"]["score"]["mean"] == pytest.approx(0.7)

    # a real grid on the toy task: an lr that cannot move the weights against one that learns
    checkpoint, glue = inputs
    out = tmp_path / "G"
    assert main(["glue", "--checkpoint", str(checkpoint), "--tasks", "sst2", "--seeds", "2",
                 "--data-dir", str(glue), "--output-dir", str(out), f"data.cache_dir={cache_dir}",
                 "--grid", "train.lr=1e-9,1e-3", "train.max_steps=120",
                 "train.interval_unit=steps", "train.eval_every=0", "train.save_every=0",
                 "data.max_seq_len=32", "train.batch_size=8"]) == 0
    table = json.loads((out / "glue.json").read_text())["tasks"]["sst2"]
    means = {p: g["score"]["mean"] for p, g in table["grid"].items()}
    assert set(means) == {"train.lr=1e-9", "train.lr=1e-3"}
    assert means["train.lr=1e-3"] > means["train.lr=1e-9"] + 0.05
    assert table["point"] == "train.lr=1e-3" and table["seed_list"] == [42, 43]
    runs = [json.loads((out / "sst2" / "train.lr=1e-3" / f"seed-{s}" / "metrics.json").read_text())
            for s in (42, 43)]
    assert [r["lr"] for r in runs] == [1e-3, 1e-3] and runs[0]["point"] == {"train.lr": "1e-3"}
    assert table["metrics"]["score"]["values"] == [r["dev"]["score"] for r in runs]
    markdown = (out / "glue.md").read_text()
    mean, std = table["metrics"]["accuracy"]["mean"], table["metrics"]["accuracy"]["std"]
    majority = 100 * runs[0]["majority"]["accuracy"]
    assert (f"| sst2 | accuracy | {100 * mean:.1f} ± {100 * std:.1f} | 2 | {majority:.1f} | "
            "train.lr=1e-3 |") in markdown
    assert f"| sst2 | train.lr=1e-3 (chosen) | {100 * mean:.1f} ± {100 * std:.1f} | 2 |" in markdown


def test_grid_options_that_cannot_run_are_one_line_errors(inputs, tmp_path, capsys):
    checkpoint, glue = inputs
    base = ["glue", "--checkpoint", str(checkpoint), "--data-dir", str(glue), "--tasks", "sst2",
            "--output-dir", str(tmp_path / "G")]
    cases = {
        ("--grid", "train.lr"): "error: --grid 'train.lr': give KEY=V1,V2,... (e.g. --grid "
                                "train.lr=2e-5,5e-5,1e-4)",
        ("--grid", "train.lr=1e-4,"): "error: --grid 'train.lr=1e-4,': give KEY=V1,V2,...",
        ("--grid", "train.lr=1e-4", "--grid", "train.lr=2e-4"):
            "error: --grid 'train.lr=2e-4': train.lr is already a grid axis",
        ("--grid", "train.lr=1e-4", "train.lr=3e-4"):
            "error: --grid 'train.lr=1e-4': train.lr is also set by an override",
        ("--grid", "output_dir=a,b"): "error: --grid 'output_dir=a,b': each point has its "
                                      "folder under --output-dir",
        ("--grid", "train.seed=1,2"): "error: --grid 'train.seed=1,2': train.seed is set by "
                                      "--seeds; give a grid of training settings",
        ("--grid", "train.lrr=1e-4"): "error: command-line override 'train.lrr=1e-4'",
        ("--grid", "train.epochs=1,2", "train.max_steps=5"): "error: command-line overrides",
    }
    for extra, message in cases.items():
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), (extra, err)
    assert not (tmp_path / "G").exists()


def test_a_small_model_at_bert_bases_lr_is_warned_with_its_width(inputs, cache_dir, real_text,
                                                                  caplog):
    from overture.registry import build_objective

    for lr, warned in (("2e-5", True), ("1e-4", False)):
        caplog.clear()
        objective = build_objective(tiny("classify", "unused", cache_dir, real_text,
                                         f"train.lr={lr}"))
        with caplog.at_level(logging.WARNING, logger="overture.finetune.classify"):
            objective.build_models()
        said = [r.getMessage() for r in caplog.records]
        assert said == ([f"train.lr={lr.replace('e-5', 'e-05')} is BERT-base's; a model 128 "
                         "wide barely moves at it in a few epochs: try 1e-4 or more, or a grid: "
                         "overture glue --grid train.lr=2e-5,5e-5,1e-4,3e-4"] if warned else [])


def test_glue_md_names_collapsed_seeds_and_that_a_grid_choice_is_optimistic():
    from overture.finetune.run import glue_markdown, glue_table

    def result(score, seed, collapsed=None):
        return {"task": "rte", "seed": seed, "collapsed_to": collapsed,
                "dev": {"accuracy": score, "score": score},
                "majority": {"accuracy": 0.527, "score": 0.527, "label": "not_entailment"}}

    one = glue_markdown(glue_table({"rte": {"": [result(0.527, 42, "not_entailment"),
                                                 result(0.61, 43)]}}))
    assert "| rte | accuracy | 56.9 ± 5.9 | 2 | 52.7 | — |" in one
    assert "rte: the model of seed 42 predicts one class only on dev" in one
    assert "optimistic" not in one  # one point: nothing was chosen
    grid = glue_markdown(glue_table({"rte": {"train.lr=1e-4": [result(0.6, 42)],
                                             "train.lr=2e-5": [result(0.5, 42)]}}))
    assert "A task's point is chosen on the dev scores it reports, so they are optimistic" in grid
    assert "| rte | train.lr=1e-4 (chosen) | 60.0 | 1 |" in grid
    assert "| rte | train.lr=2e-5 | 50.0 | 1 |" in grid


def test_the_training_loss_of_an_evaluation_is_not_counted_again_after_a_max_time_stop(
        inputs, cache_dir, real_text, tmp_path):
    run = tmp_path / "run"
    settings = ("train.max_steps=6", "train.log_every=1", "train.eval_every=0",
                "train.best_metric=null", "train.lr=1e-3")
    # stopped by the clock after its first step: the finishing evaluation reports step 1
    finetune(tiny("classify", run, cache_dir, real_text, *settings, "train.max_time=1e-9"),
             progress=False)
    assert sorted(records(run)) == [1] and sorted(records(run, "eval")) == [1]
    finetune(tiny("classify", run, cache_dir, real_text, *settings), progress=False)
    steps, evals = records(run), records(run, "eval")
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert evals[1]["train_loss"] == pytest.approx(steps[1]["loss"])
    assert evals[6]["train_loss"] == pytest.approx(np.mean([steps[s]["loss"] for s in range(2, 7)]))
