"""Run control beyond the contract: time budget, checkpoint retention, resume policies,
clipping, optimizers and schedules, evaluation records, trackers and mixed precision."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import prepare, records, sgd_step
from overture.checkpoint import find_resume_point
from overture.config import ConfigError
from overture.engine import train


def _steps(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_max_time_stops_checkpoints_and_exports(make_recipe, tmp_path):
    run = tmp_path / "timed"
    # 0.0001 minutes runs out during the first step
    train(make_recipe(run, "train.max_steps=50", "train.max_time=0.0001", "train.log_every=10",
                      "train.save_every=0"), progress=False)
    assert _steps(run) == ["step-000001"]
    assert (run / "final" / "model.safetensors").is_file()
    assert sorted(records(run)) == [1]  # the last step is logged even off the log interval


def test_keep_last_keeps_only_the_newest_checkpoints(make_recipe, tmp_path):
    run = tmp_path / "kept"
    train(make_recipe(run, "train.max_steps=4", "train.save_every=1", "train.keep_last=2",
                      "train.eval_every=0"), progress=False)
    assert _steps(run) == ["step-000003", "step-000004"]


def test_resume_never_refuses_to_start_over_a_run(make_recipe, trained):
    recipe = make_recipe(trained("bert"), "train.resume=never")
    with pytest.raises(ConfigError, match="already holds a run"):
        find_resume_point(recipe)


def test_resume_from_a_path_with_another_model_section_is_refused(trained, cache_dir, real_text):
    from helpers import tiny
    from overture.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(trained("bert"))
    recipe = tiny("bert", "elsewhere", cache_dir, real_text, "model.num_hidden_layers=3",
                  f"train.resume={checkpoint}")
    with pytest.raises(ConfigError, match="model.num_hidden_layers: 2 -> 3"):
        find_resume_point(recipe)


def test_gradient_clipping_caps_the_norm_of_the_update(make_recipe):
    from accelerate import Accelerator

    from overture.data.prepare import IndexedDataset

    recipe = make_recipe()
    data = prepare(recipe)
    batch = data.objective.collator(recipe.resolved_phases()[0])(
        IndexedDataset(data.train).__getitems__(list(range(8))))
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in data.objective.build_models()["model"]
                         .parameters()])
    free = sgd_step(recipe, data.objective, [batch], Accelerator(cpu=True))
    clipped = sgd_step(recipe, data.objective, [batch], Accelerator(cpu=True),
                       max_grad_norm=0.01)
    assert (free - initial).norm() > 0.1  # SGD at lr 1: the update is the gradient
    assert (clipped - initial).norm().item() == pytest.approx(0.01, rel=1e-3)


def test_lamb_is_timms_and_adamw_groups_skip_decay_on_biases_and_norms(make_recipe):
    from timm.optim import Lamb

    from overture.optim import build_optimizer

    recipe = make_recipe("unused", "train.optimizer=lamb")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer([model], recipe.train, torch.device("cpu"))
    assert isinstance(optimizer, Lamb)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model[0].weight)] == recipe.train.weight_decay
    assert decay[id(model[0].bias)] == decay[id(model[1].weight)] == 0.0


@pytest.mark.parametrize("schedule, expected", [
    ("linear", [0.5, 1.0, 0.75, 0.5, 0.25, 0.0]),
    ("cosine", [0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_warmup_then_the_chosen_decay(make_recipe, schedule, expected):
    from overture.optim import build_scheduler

    cfg = make_recipe("unused", f"train.lr_schedule={schedule}", "train.warmup_steps=2",
                      "train.lr=1.0").train
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, cfg, total_steps=6)
    lrs = []
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs == pytest.approx(expected)  # lr after each of the 6 steps


@pytest.mark.parametrize("family, heads", [("bert", ("mlm", "nsp")), ("albert", ("mlm", "sop")),
                                           ("roberta", ("mlm",)), ("gpt", ("lm",))])
def test_evaluation_records_every_heads_loss_accuracy_and_perplexity(trained, family, heads):
    evals = records(trained(family), "eval")
    last = evals[max(evals)]
    for head in heads:
        assert 0 < last[f"{head}_loss"] < 20 and 0 <= last[f"{head}_accuracy"] <= 1
    assert last["loss"] == pytest.approx(sum(last[f"{h}_loss"] for h in heads))
    assert last["perplexity"] == pytest.approx(math.exp(last[f"{heads[0]}_loss"]))


def test_a_run_without_held_out_examples_says_so_once_and_logs_no_evaluation(
        make_recipe, tmp_path, caplog):
    recipe = make_recipe(tmp_path / "run", "data.eval_fraction=0", "train.max_steps=4",
                         "train.eval_every=2", "train.log_every=2", "train.save_every=0")
    with caplog.at_level("WARNING", logger="overture.engine"):
        train(recipe, progress=False)
    said = [r.getMessage() for r in caplog.records if "held-out" in r.getMessage()]
    assert said == ["0 held-out examples (data.eval_fraction=0.0): no evaluation is run, "
                    "the final one included"]
    assert records(tmp_path / "run", "eval") == {}
    assert sorted(records(tmp_path / "run")) == [2, 4]
