"""The training loop: accumulation equivalence, resume equivalence, phases, HF export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from overture.checkpoint import COMPLETE, latest_checkpoint
from overture.engine import train, train_step
from overture.pretrain.text.bert import IndexedDataset


def _records(run_dir: Path, split: str = "train") -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == split}


def test_gradient_accumulation_matches_one_big_batch(make_recipe):
    from accelerate import Accelerator

    from overture.pretrain import build_objective

    recipe = make_recipe("unused", "model.hidden_dropout_prob=0", "model.attention_probs_dropout_prob=0")
    objective = build_objective(recipe)
    phase = recipe.resolved_phases()[0]
    data = objective.prepare(phase, progress=False)
    collator = objective.collator(phase)
    rows = IndexedDataset(data.train)
    accelerator = Accelerator()

    def one_step(batches: list[dict], accumulation: int):
        torch.manual_seed(0)
        model = objective.build_model()
        cfg = recipe.train
        cfg.gradient_accumulation_steps = accumulation
        cfg.max_grad_norm = None
        # Plain SGD at lr 1: new parameters = old - gradient, so any error in the loss
        # normalization (a factor, a double division) shows in the parameters.
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        train_step(model, optimizer, scheduler, iter(batches), objective, accelerator, cfg)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    big = collator(rows.__getitems__(list(range(8))))
    halves = [collator(rows.__getitems__(list(range(0, 4)))),
              collator(rows.__getitems__(list(range(4, 8))))]
    # the halves are padded to their own widths; the masked tokens are the same ones
    assert sum((h["labels"] != -100).sum() for h in halves) == (big["labels"] != -100).sum()
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in objective.build_model().parameters()])
    straight = one_step([big], 1)
    accumulated = one_step(halves, 2)
    assert (straight - initial).abs().max() > 1e-3  # the step really moved the weights
    assert torch.allclose(straight, accumulated, atol=1e-6, rtol=0)


def test_resume_reproduces_the_uninterrupted_run(make_recipe, tmp_path, real_text):
    from overture.data.prepare import prepare

    # A small corpus, so that the run crosses an epoch boundary and the checkpoint it
    # resumes from lies inside the second epoch.
    corpus = tmp_path / "small.txt"
    corpus.write_text(real_text.read_text(encoding="utf-8")[:4_000], encoding="utf-8")
    run = tmp_path / "run"
    base = ("train.log_every=1", "train.eval_every=0", "train.batch_size=8",
            "train.keep_last=5", "objective.masking=dynamic", f"data.corpus=[{corpus}]",
            f"data.cache_dir={tmp_path / 'cache'}", "tokenizer.vocab_size=500",
            "tokenizer.min_frequency=1")
    per_epoch = len(prepare(make_recipe(run, *base), progress=False).train) // 8
    resume_at, total = per_epoch + 1, per_epoch + 4
    overrides = (*base, f"train.max_steps={total}", f"train.save_every={resume_at}")
    train(make_recipe(run, *overrides), progress=False)
    straight = _records(run)
    assert sorted(straight) == list(range(1, total + 1))

    # Simulate a crash after step `resume_at`: the later checkpoint, final/ and the log
    # are lost, and a half-written checkpoint without its marker is left behind.
    checkpoints = run / "checkpoints"
    shutil.rmtree(checkpoints / f"step-{total:06d}")
    shutil.rmtree(run / "final")
    half = checkpoints / f"step-{total - 1:06d}"
    shutil.copytree(checkpoints / f"step-{resume_at:06d}", half)
    (half / COMPLETE).unlink()
    assert latest_checkpoint(run).name == f"step-{resume_at:06d}"
    state = json.loads((checkpoints / f"step-{resume_at:06d}" / "train_state.json").read_text())
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 1  # inside the second epoch
    (run / "metrics.jsonl").write_text("")

    train(make_recipe(run, *overrides, "train.resume=auto"), progress=False)
    resumed = _records(run)
    assert sorted(resumed) == list(range(resume_at + 1, total + 1))  # continued, not restarted
    for step in resumed:
        for key in ("loss", "mlm_loss", "nsp_loss"):
            assert resumed[step][key] == pytest.approx(straight[step][key], abs=1e-5), (step, key)
    assert (run / "final" / "model.safetensors").is_file()


def test_phases_switch_sequence_length_and_continue_the_schedule(make_recipe, tmp_path):
    run = tmp_path / "phased"
    recipe = make_recipe(run, "train.log_every=1", "train.save_every=0", "train.warmup_steps=0",
                         "phases=[{steps: 2, max_seq_len: 32, batch_size: 8}, "
                         "{steps: 2, max_seq_len: 64, batch_size: 4}]")
    assert recipe.total_steps == 4
    train(recipe, progress=False)
    records = _records(run)
    assert [records[s]["seq_len"] for s in (1, 2, 3, 4)] == [32, 32, 64, 64]
    lrs = [records[s]["lr"] for s in (1, 2, 3, 4)]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == 0.0  # one linear decay over both


def test_final_loads_with_plain_transformers_and_gives_the_same_logits(make_recipe, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertForPreTraining

    run = tmp_path / "export"
    train(make_recipe(run, "train.max_steps=5", "train.save_every=0"), progress=False)
    final = run / "final"
    text = "the cat sat on the mat."
    # A Python that never imports overture loads final/ and writes its logits.
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForPreTraining, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(final)!r})
        model = AutoModelForPreTraining.from_pretrained({str(final)!r}).eval()
        enc = tok({text!r}, "and then it left.", return_tensors="pt")
        with torch.no_grad():
            out = model(**enc)
        assert not any(m.startswith("overture") for m in sys.modules)
        json.dump({{"ids": enc["input_ids"].tolist(), "type": type(model).__name__,
                   "mlm": out.prediction_logits.tolist(),
                   "nsp": out.seq_relationship_logits.tolist()}}, sys.stdout)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout)
    assert loaded["type"] == "BertForPreTraining"

    # The trained weights, as the training state saved them (not via final/).
    trained = BertForPreTraining(BertConfig.from_pretrained(final)).eval()
    state = {k.removeprefix("model."): v for k, v in
             load_file(str(latest_checkpoint(run) / "model.safetensors")).items()}
    missing, unexpected = trained.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"cls.predictions.decoder.weight",
                                               "cls.predictions.decoder.bias"}
    trained.tie_weights()
    enc = AutoTokenizer.from_pretrained(final)(text, "and then it left.", return_tensors="pt")
    assert enc["input_ids"].tolist() == loaded["ids"]
    with torch.no_grad():
        out = trained(**enc)
    assert torch.allclose(out.prediction_logits, torch.tensor(loaded["mlm"]), atol=1e-5)
    assert torch.allclose(out.seq_relationship_logits, torch.tensor(loaded["nsp"]), atol=1e-5)
