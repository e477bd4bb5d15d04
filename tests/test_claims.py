"""README claims about run control and data that no other test pins down: the time
budget, resume policies (never / PATH), checkpoint pruning, LAMB and the cosine /
constant schedules end to end, phases across a resume, `overture prepare` before
`pretrain`, corpus globs and static masks across `data.dupe_factor` copies.

Everything trains a tiny BERT (seq 32, batch 8) in-process on ~60 kB of real text; the
runs that several tests read are made once per session.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import prepare, records, tiny
from overture.atomic import COMPLETE
from overture.config import ConfigError, load_recipe
from overture.engine import train

LR = 0.02  # LAMB steps a layer by lr x its norm: a large lr to see learning in 8 steps


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _files(run: Path) -> dict[Path, int]:
    """Every file of a run folder and its mtime (the run lock's bookkeeping aside)."""
    return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".lock"}


def _losses(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if k == "loss" or k.endswith("_loss")}


def _assert_same_run(resumed: dict, straight: dict, steps) -> None:
    for step in steps:
        expected = {**_losses(straight[step]), "tokens_seen": straight[step]["tokens_seen"]}
        got = {k: resumed[step][k] for k in expected}
        assert got == pytest.approx(expected, abs=1e-5), step


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, real_text) -> Path:
    """~60 kB of real text: over a thousand examples of 32 tokens, a one-second prepare."""
    path = tmp_path_factory.mktemp("claims-corpus") / "claims.txt"
    path.write_text(real_text.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def recipe(cache_dir, corpus):
    """A tiny BERT recipe on ``corpus`` writing to ``run``; KEY=VALUE overrides on top."""

    def make(run, *overrides: str, family: str = "bert"):
        return tiny(family, run, cache_dir, corpus, "train.batch_size=8", "data.max_seq_len=32",
                    "train.eval_every=0", "train.eval_batches=2", *overrides)

    return make


# --------------------------------------------------------------------------- time budget


def test_max_time_stops_early_checkpoints_the_stopped_step_and_exports(recipe, tmp_path):
    run = tmp_path / "timed"
    budget = ("train.max_steps=100000", "train.log_every=100000", "train.save_every=0")
    started = time.time()
    train(recipe(run, *budget, "train.max_time=0.02"), progress=False)  # 1.2 s
    [checkpoint] = _checkpoints(run)  # saved once: where the time ran out
    stopped = json.loads((run / "checkpoints" / checkpoint / "train_state.json").read_text())["step"]
    assert 1 <= stopped < 100000 and checkpoint == f"step-{stopped:06d}"
    assert sorted(records(run)) == [stopped]  # the stopping step is logged
    # after the budget (minutes, counted from the first step), not long after it
    assert 1.2 <= records(run)[stopped]["time"] - started < 1.2 + 30
    assert max(records(run, "eval")) == stopped  # and evaluated
    # final/ is a loadable export of the model at the stopped step
    final = run / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    exported, saved = _weights(final), _weights(run / "checkpoints" / checkpoint)
    assert exported.keys() == {k.removeprefix("model.") for k in saved}
    for key, value in saved.items():
        assert torch.equal(exported[key.removeprefix("model.")], value), key
    # and the run continues from there (resume=auto) without the budget
    train(recipe(run, *budget[1:], f"train.max_steps={stopped + 1}"), progress=False)
    assert sorted(records(run)) == [stopped, stopped + 1]


# --------------------------------------------------------------------------- resume


@pytest.fixture(scope="session")
def stepped(tmp_path_factory, recipe):
    """6 steps, a checkpoint after each, a record every 2 steps, constant schedule with a
    4-step warmup: (recipe factory for this run's settings, run folder)."""
    settings = ("train.max_steps=6", "train.save_every=1", "train.keep_last=6",
                "train.log_every=2", "train.lr_schedule=constant", "train.warmup_steps=4",
                "train.lr=1e-3")
    run = tmp_path_factory.mktemp("stepped") / "run"
    train(recipe(run, *settings), progress=False)
    return (lambda where, *extra: recipe(where, *settings, *extra)), run


def test_constant_schedule_warms_up_linearly_then_holds_the_peak(stepped):
    _, run = stepped
    lrs = {step: r["lr"] for step, r in records(run).items()}
    assert lrs == pytest.approx({2: 0.5e-3, 4: 1e-3, 6: 1e-3}, rel=1e-9)


def test_resume_from_a_path_continues_from_that_checkpoint_not_the_latest(stepped, tmp_path):
    make, straight_run = stepped
    run = tmp_path / "run"
    for step in ("step-000002", "step-000006"):  # the latest here is step 6
        shutil.copytree(straight_run / "checkpoints" / step, run / "checkpoints" / step)
    train(make(run, f"train.resume={run / 'checkpoints' / 'step-000002'}"), progress=False)
    resumed, straight = records(run), records(straight_run)
    assert sorted(resumed) == [4, 6]  # steps 3..6 trained again: from step 2, not from 6
    _assert_same_run(resumed, straight, [4, 6])


def test_resume_from_a_path_into_a_new_folder_leaves_the_source_run_alone(stepped, tmp_path):
    make, straight_run = stepped
    before = _files(straight_run)
    run = tmp_path / "branch"
    train(make(run, f"train.resume={straight_run / 'checkpoints' / 'step-000004'}"),
          progress=False)
    assert sorted(records(run)) == [6]
    _assert_same_run(records(run), records(straight_run), [6])
    assert _files(straight_run) == before


def test_first_record_after_resuming_off_the_log_grid_averages_the_whole_interval(
        stepped, tmp_path):
    make, straight_run = stepped
    run = tmp_path / "off-grid"
    # checkpoint of step 3; the straight run's record at 4 averages steps 3 and 4
    train(make(run, f"train.resume={straight_run / 'checkpoints' / 'step-000003'}"),
          progress=False)
    resumed, straight = records(run), records(straight_run)
    assert sorted(resumed) == [4, 6]
    _assert_same_run(resumed, straight, [6])  # the state itself was restored exactly
    _assert_same_run(resumed, straight, [4])  # fails: step 4 alone


def test_resume_never_refuses_an_existing_run_and_touches_nothing(stepped, tmp_path):
    make, run = stepped
    before = _files(run)
    log = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(make(run, "train.resume=never"), progress=False)
    assert _files(run) == before
    assert (run / "metrics.jsonl").read_text() == log
    # a folder holding only final/ (checkpoints pruned or deleted) is a run too
    exported = tmp_path / "exported"
    shutil.copytree(run / "final", exported / "final")
    with pytest.raises(ConfigError, match="already holds a run"):
        train(make(exported, "train.resume=never"), progress=False)
    assert sorted(p.name for p in exported.iterdir() if p.name != ".lock") == ["final"]


def test_resume_never_starts_fresh_in_an_empty_folder(recipe, tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()  # exists, holds nothing
    train(recipe(run, "train.resume=never", "train.max_steps=1", "train.log_every=1"),
          progress=False)
    assert sorted(records(run)) == [1] and _checkpoints(run) == ["step-000001"]


# --------------------------------------------------------------------------- LAMB, cosine, keep_last


@pytest.fixture(scope="session")
def lamb_run(tmp_path_factory, recipe) -> Path:
    """LAMB at lr 0.02, cosine after a 2-step warmup, 8 steps, a checkpoint after each
    but only 3 kept, an evaluation before the first step and at the end."""
    run = tmp_path_factory.mktemp("lamb") / "run"
    train(recipe(run, "train.optimizer=lamb", f"train.lr={LR}", "train.lr_schedule=cosine",
                 "train.warmup_steps=2", "train.max_steps=8", "train.log_every=1",
                 "train.save_every=1", "train.keep_last=3", "train.eval_every=1000",
                 "train.eval_batches=20"), progress=False)
    return run


def _cosine(step: int, warmup: int = 2, total: int = 8) -> float:
    """The learning rate after ``step`` optimizer steps."""
    if step < warmup:
        return LR * step / warmup
    return LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_cosine_schedule_in_the_metrics_matches_the_formula(lamb_run):
    lrs = {step: r["lr"] for step, r in records(lamb_run).items()}
    assert sorted(lrs) == list(range(1, 9))
    assert lrs == pytest.approx({s: _cosine(s) for s in range(1, 9)}, rel=1e-9, abs=1e-12)
    # warmup to the peak, the half-way point of the decay, down to zero at the end
    assert lrs[1] == pytest.approx(LR / 2) and lrs[2] == pytest.approx(LR)
    assert lrs[5] == pytest.approx(LR / 2) and lrs[8] == pytest.approx(0, abs=1e-12)


def test_lamb_steps_every_weight_matrix_by_lr_times_its_norm_and_learns(lamb_run):
    before = _weights(lamb_run / "checkpoints" / "step-000006")
    after = _weights(lamb_run / "checkpoints" / "step-000007")
    lr = _cosine(6)  # the rate step 7 used
    matrices = [k for k, v in before.items() if v.ndim == 2]
    assert len(matrices) >= 8
    for key in matrices:  # trust ratio ||w|| / ||update||: the step is lr * ||w||
        ratio = ((after[key] - before[key]).norm() / before[key].norm()).item()
        assert ratio == pytest.approx(lr, rel=1e-3), key
    # biases and norms are not adapted (as in the LAMB reference): the step is not lr * ||w||
    others = [k for k, v in before.items() if v.ndim == 1 and before[k].norm() > 0
              and not torch.equal(after[k], before[k])]
    ratios = [((after[k] - before[k]).norm() / before[k].norm()).item() for k in others]
    assert others and not all(r == pytest.approx(lr, rel=1e-2) for r in ratios)
    evals = records(lamb_run, "eval")
    assert sorted(evals) == [0, 8]
    assert evals[8]["mlm_loss"] < evals[0]["mlm_loss"] - 0.1  # it learns


def test_keep_last_keeps_only_the_newest_complete_checkpoints(lamb_run):
    assert _checkpoints(lamb_run) == ["step-000006", "step-000007", "step-000008"]
    assert all((lamb_run / "checkpoints" / name / COMPLETE).is_file()
               for name in _checkpoints(lamb_run))
    state = json.loads((lamb_run / "checkpoints" / "step-000008" / "train_state.json").read_text())
    assert state["step"] == 8


def test_lamb_adapts_each_layer_even_without_weight_decay(recipe):
    from overture.optim import build_optimizer

    cfg = recipe("unused", "train.optimizer=lamb", "train.weight_decay=0.0", "train.lr=0.01").train
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16)
    optimizer = build_optimizer([layer], cfg, torch.device("cpu"))
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.randn(16, 16) * 1e-3
    layer.bias.grad = torch.randn(16)
    optimizer.step()
    # You et al. 2019, Alg. 2: x <- x - lr * ||x|| / ||r + wd x|| * (r + wd x), for any wd
    ratio = ((layer.weight.detach() - before).norm() / before.norm()).item()
    assert ratio == pytest.approx(0.01, rel=1e-3)


# --------------------------------------------------------------------------- phases + resume


@pytest.fixture(scope="session")
def phased(tmp_path_factory, recipe):
    """Two phases of 3 steps (seq 32 x 8, then seq 64 x 4), one cosine schedule over both,
    a checkpoint and a record after every step."""
    settings = ("phases=[{steps: 3, max_seq_len: 32, batch_size: 8}, "
                "{steps: 3, max_seq_len: 64, batch_size: 4}]",
                "train.lr_schedule=cosine", "train.warmup_steps=1", "train.lr=1e-3",
                "train.save_every=1", "train.keep_last=6", "train.log_every=1")
    run = tmp_path_factory.mktemp("phased") / "run"
    train(recipe(run, *settings), progress=False)
    return (lambda where, *extra: recipe(where, *settings, *extra)), run


def test_phases_run_in_order_under_one_cosine_schedule(phased):
    _, run = phased
    logged = records(run)
    assert [logged[s]["seq_len"] for s in range(1, 7)] == [32, 32, 32, 64, 64, 64]
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 5)) for s in range(1, 7)]
    assert [logged[s]["lr"] for s in range(1, 7)] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("resume_at", [3, 4], ids=["at-the-phase-boundary", "inside-phase-2"])
def test_a_phased_run_resumed_equals_the_uninterrupted_one(phased, tmp_path, resume_at):
    make, straight_run = phased
    run = tmp_path / "resumed"
    checkpoint = straight_run / "checkpoints" / f"step-{resume_at:06d}"
    train(make(run, f"train.resume={checkpoint}"), progress=False)
    resumed, straight = records(run), records(straight_run)
    assert sorted(resumed) == list(range(resume_at + 1, 7))
    _assert_same_run(resumed, straight, range(resume_at + 1, 7))
    assert [resumed[s]["seq_len"] for s in resumed] == [64] * len(resumed)
    assert [resumed[s]["lr"] for s in resumed] == pytest.approx(
        [straight[s]["lr"] for s in resumed], abs=1e-12)
    assert _weights(run / "final").keys() == _weights(straight_run / "final").keys()
    for key, value in _weights(run / "final").items():
        assert torch.allclose(value, _weights(straight_run / "final")[key], atol=1e-5), key


def test_every_step_is_in_a_record_when_a_phase_ends_off_the_log_grid(phased, tmp_path):
    make, every_step = phased
    run = tmp_path / "sparse"
    train(make(run, "train.log_every=2", "train.save_every=0"), progress=False)
    sparse, nsp = records(run), {s: r["nsp_loss"] for s, r in records(every_step).items()}
    assert sparse[2]["nsp_loss"] == pytest.approx((nsp[1] + nsp[2]) / 2, abs=1e-5)
    assert sparse[6]["nsp_loss"] == pytest.approx((nsp[5] + nsp[6]) / 2, abs=1e-5)
    # NSP counts one target per sequence: 8 at step 3 (phase 1), 4 at step 4 (phase 2).
    # Step 3 is in a record of its own (logged at the phase end) or averaged into step 4's.
    if 3 in sparse:
        assert sparse[3]["nsp_loss"] == pytest.approx(nsp[3], abs=1e-5)
        assert sparse[4]["nsp_loss"] == pytest.approx(nsp[4], abs=1e-5)
    else:
        assert sparse[4]["nsp_loss"] == pytest.approx((8 * nsp[3] + 4 * nsp[4]) / 12, abs=1e-5)


# --------------------------------------------------------------------------- prepare, then pretrain


def test_prepare_builds_every_phase_so_that_pretrain_builds_nothing(corpus, tmp_path,
                                                                     monkeypatch, capsys):
    import overture.data.prepare as prepare_module
    import overture.data.tokenizer as tokenizer_module
    from overture.cli import main

    cache, run = tmp_path / "cache", tmp_path / "run"
    overrides = [f"data.corpus=[{corpus}]", f"data.cache_dir={cache}", f"output_dir={run}",
                 "data.num_proc=1", "tokenizer.vocab_size=1024", "tokenizer.min_frequency=1",
                 "train.batch_size=8", "train.eval_every=0", "train.eval_batches=2",
                 "train.log_every=1",
                 "phases=[{steps: 1, max_seq_len: 32}, {steps: 1, max_seq_len: 48}]"]
    assert main(["prepare", "bert-tiny", *overrides]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "train /" in line]
    assert len(printed) == 2  # one cache per phase
    built = sorted(p.name for p in (cache / "examples").iterdir())
    assert len(built) == 2 and not run.exists()

    def rebuilt(*args, **kwargs):
        raise AssertionError("pretrain rebuilt what prepare had cached")

    monkeypatch.setattr(prepare_module, "_build", rebuilt)
    monkeypatch.setattr(tokenizer_module, "_train", rebuilt)
    train(load_recipe("bert-tiny", overrides), progress=False)
    assert [r["seq_len"] for r in records(run).values()] == [32, 48]
    assert sorted(p.name for p in (cache / "examples").iterdir()) == built


# --------------------------------------------------------------------------- corpus globs


def _split_corpus(corpus: Path, folder: Path) -> tuple[Path, Path]:
    """The corpus cut in two files at a blank line: b.txt (first part) and a.txt."""
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = next(i for i in range(len(lines) // 2, len(lines)) if not lines[i].strip())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "b.txt").write_text("".join(lines[:cut]), encoding="utf-8")
    (folder / "a.txt").write_text("".join(lines[cut:]), encoding="utf-8")
    return folder / "a.txt", folder / "b.txt"


def test_a_corpus_glob_reads_every_match_in_sorted_order(corpus, tmp_path):
    from overture.data.corpus import Source, corpus_fingerprint, resolve_sources

    a, b = _split_corpus(corpus, tmp_path / "texts")
    (tmp_path / "texts" / "notes.md").write_text("not matched\n")
    (tmp_path / "texts" / "sub").mkdir()
    (tmp_path / "texts" / "sub" / "c.txt").write_text("deeper\n")
    found = resolve_sources([str(tmp_path / "texts" / "*.txt")], tmp_path)
    assert found == [Source("text", str(a)), Source("text", str(b))]
    deep = resolve_sources([str(tmp_path / "texts" / "**" / "*.txt")], tmp_path)
    assert [Path(s.location).name for s in deep] == ["a.txt", "b.txt", "c.txt"]
    # the same sources as the sorted explicit list, so the same cache; order matters
    explicit = resolve_sources([str(a), str(b)], tmp_path)
    assert corpus_fingerprint(found) == corpus_fingerprint(explicit)
    assert corpus_fingerprint(found) != corpus_fingerprint(explicit[::-1])


def test_a_corpus_glob_trains_on_all_matching_files(corpus, cache_dir, tmp_path):
    a, b = _split_corpus(corpus, tmp_path / "texts")
    pattern = tmp_path / "texts" / "*.txt"
    globbed = prepare(tiny("bert", "unused", cache_dir, pattern, "data.max_seq_len=32"))
    assert globbed.stats["corpus"]["bytes"] == a.stat().st_size + b.stat().st_size
    # the same examples as the sorted explicit list: the same cache, not rebuilt
    listed = prepare(tiny("bert", "unused", cache_dir, f"{a},{b}", "data.max_seq_len=32"))
    assert listed.folder == globbed.folder


def test_a_corpus_glob_matching_nothing_is_a_clear_error(tmp_path, capsys):
    from overture.cli import main

    pattern = str(tmp_path / "nowhere" / "*.txt")
    code = main(["pretrain", "bert-tiny", f"data.corpus=[{pattern}]",
                 f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no file matches the glob" in err and pattern in err
    assert not list((tmp_path / "run").glob("checkpoints/*"))


# --------------------------------------------------------------------------- dupe_factor


def test_dupe_factor_copies_of_a_document_get_different_static_masks(cache_dir, corpus):
    # RoBERTa's packing draws no randomness, so copy 2 holds the same token rows as copy 1
    data = prepare(tiny("roberta", "unused", cache_dir, corpus, "objective.masking=static",
                        "data.dupe_factor=2", "data.max_seq_len=32"))
    assert data.stats["windows"] == 1  # one window: its copies follow each other
    rows = data.train.with_format("numpy")[:]
    n = len(data.train)
    assert n % 2 == 0 and n >= 200
    originals, positions = [], []
    for ids, pos, true_ids in zip(rows["input_ids"], rows["mlm_positions"], rows["mlm_ids"]):
        ids = np.array(ids, dtype=np.int64)
        ids[pos] = true_ids
        originals.append(ids)
        positions.append(tuple(pos))
    half = n // 2
    assert all(np.array_equal(x, y) for x, y in zip(originals[:half], originals[half:]))
    differ = sum(p != q for p, q in zip(positions[:half], positions[half:]))
    assert differ / half > 0.9, differ / half
    rate = sum(map(len, positions)) / sum(map(len, originals))
    assert 0.09 < rate < 0.16  # ~15% of the non-special tokens, both copies
