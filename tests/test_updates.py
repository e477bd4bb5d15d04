"""The engine with several updates (a GAN's shape), on the two-update toy family of
tests/toy_family.py: honest head statistics, per-update optimizer settings across a
resume, per-optimizer skip accounting, evaluation under a forked RNG with its artefacts,
and the family's DDP options."""

from __future__ import annotations

import pytest

from helpers import records
from overture import registry
from overture.config import ConfigError, recipe_from_dict
from overture.engine import train


@pytest.fixture(autouse=True)
def toy(monkeypatch):
    monkeypatch.setitem(registry.FAMILIES, "toy", "toy_family:Toy")


def toy_recipe(run, **train_settings):
    objective = train_settings.pop("objective", {})
    settings = {"max_steps": 6, "batch_size": 8, "log_every": 3, "eval_every": 0,
                "save_every": 0, "lr": 1e-3, "lr_schedule": "constant", **train_settings}
    return recipe_from_dict({"name": "toy", "output_dir": str(run),
                             "objective": {"name": "toy", **objective}, "train": settings})


def test_a_head_updated_every_third_step_is_logged_at_its_own_loss(tmp_path):
    """b's loss is exactly 2.0 per target. Its update runs at steps 1 and 4 (every 3):
    each record of 3 steps holds one b update, so b_loss must be 2.0, not 2.0 / 3."""
    train(toy_recipe(tmp_path / "run"), progress=False)
    logged = records(tmp_path / "run")
    assert sorted(logged) == [3, 6]
    assert [logged[s]["b_loss"] for s in (3, 6)] == [pytest.approx(2.0, abs=1e-6)] * 2
    train(toy_recipe(tmp_path / "by6", log_every=6), progress=False)  # two b updates
    assert records(tmp_path / "by6")[6]["b_loss"] == pytest.approx(2.0, abs=1e-6)


def test_each_update_has_its_own_lr_logged_by_name_and_kept_across_a_resume(tmp_path):
    settings = {"updates": {"gen": {"lr": 1e-2, "adam_beta1": 0.0}}, "log_every": 1}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(toy_recipe(straight, **settings), progress=False)
    train(toy_recipe(resumed, **settings, max_steps=3, save_every=3), progress=False)
    train(toy_recipe(resumed, **settings), progress=False)  # 3 -> 6
    for run in (straight, resumed):
        logged = records(run)
        assert {s: (r["lr_disc"], r["lr_gen"]) for s, r in logged.items()} == {
            s: (pytest.approx(1e-3), pytest.approx(1e-2)) for s in range(1, 7)}
        assert all(r["lr"] == r["lr_disc"] for r in logged.values())  # the first update's
    assert ({s: r["a_loss"] for s, r in records(resumed).items()}
            == pytest.approx({s: r["a_loss"] for s, r in records(straight).items()}, abs=1e-6))
    # a resume with a new lr for one update changes that update only, from the next step
    train(toy_recipe(resumed, max_steps=8, log_every=1,
                     updates={"gen": {"lr": 5e-3, "adam_beta1": 0.0}}), progress=False)
    logged = records(resumed)
    assert (logged[7]["lr_gen"], logged[7]["lr_disc"]) == (pytest.approx(5e-3),
                                                           pytest.approx(1e-3))


def test_the_optimizer_settings_of_an_update_reach_its_optimizer(tmp_path):
    from accelerate import Accelerator

    from overture.engine import setup_trainer
    from overture.registry import build_objective

    recipe = toy_recipe(tmp_path / "run", updates={"gen": {"lr": 1e-4, "adam_beta1": 0.0,
                                                           "adam_beta2": 0.9}})
    trainer = setup_trainer(recipe, build_objective(recipe), Accelerator(cpu=True))
    gen, disc = (trainer.optimizers[n].optimizer.param_groups[0] for n in ("gen", "disc"))
    assert (gen["lr"], gen["betas"]) == (pytest.approx(1e-4), (0.0, 0.9))
    assert (disc["lr"], disc["betas"]) == (pytest.approx(1e-3), (0.9, 0.999))


def test_settings_for_an_unknown_update_are_refused_naming_the_updates(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.updates\.generator: objective 'toy' has "
                                          r"the updates disc, gen"):
        train(toy_recipe(tmp_path / "run", updates={"generator": {"lr": 1e-4}}),
              progress=False)
    with pytest.raises(ConfigError, match=r"train\.updates\.gen\.lr=-1\.0 must be a positive"):
        toy_recipe(tmp_path / "run", updates={"gen": {"lr": -1}})


def test_an_update_with_previous_steps_on_the_previous_updates_backward(tmp_path):
    """Toy "side" shares gen's backward: one forward per group (disc, gen; never side);
    SGD at lr 1 moves gen and side by exactly the gradients of b's loss on that one
    backward (each row by -mean(x), each bias by -1); b counted once, so its logged loss
    is 2.0, not 1.0; side's own lr is logged under its name."""
    import torch
    from accelerate import Accelerator

    from helpers import sgd_step
    from overture.objective import Update, due_groups
    from overture.registry import build_objective

    recipe = toy_recipe(tmp_path / "run", objective={"share": True})
    objective = build_objective(recipe)
    data = objective.prepare(None)
    batch = objective.collator(None)({"columns": data.train[:8]})
    torch.manual_seed(0)
    initial = {n: m.state_dict() for n, m in objective.build_models().items()}
    after = sgd_step(recipe, objective, [batch], Accelerator(cpu=True))
    assert objective.forwarded == ["disc", "gen"]
    mean = batch["x"].mean(0)
    gen = torch.cat([(initial["gen"]["weight"] - mean).flatten(), initial["gen"]["bias"] - 1])
    side = torch.cat([(initial["side"]["weight"] - mean).flatten(), initial["side"]["bias"] - 1])
    torch.testing.assert_close(after[4:], torch.cat([gen, side]), atol=1e-6, rtol=0)

    train(toy_recipe(tmp_path / "run", objective={"share": True},
                     updates={"side": {"lr": 5e-3}}), progress=False)
    logged = records(tmp_path / "run")
    assert [logged[s]["b_loss"] for s in (3, 6)] == [pytest.approx(2.0, abs=1e-6)] * 2
    assert [logged[s]["lr_side"] for s in (3, 6)] == [pytest.approx(5e-3)] * 2

    a, b = Update("a", ("x",), ("h",)), Update("b", ("y",), ("h",), with_previous=True)
    assert [[u.name for u in g] for g in due_groups([a, b], 0)] == [["a", "b"]]
    with pytest.raises(ValueError, match="with_previous needs a previous update"):
        due_groups([b, a], 0)
    with pytest.raises(ConfigError, match="fp16's loss scaling does not support; use bf16"):
        build_objective(toy_recipe(tmp_path / "fp16", objective={"share": True},
                                   mixed_precision="fp16"))


def test_a_skipped_generator_step_is_not_counted_on_discriminator_only_steps(
        tmp_path, monkeypatch):
    """fp16's scaler reports skips per optimizer; only the optimizers that stepped count
    (no scaler on CPU: the gen optimizer's flag is stubbed to say "skipped" always)."""
    from accelerate.optimizer import AcceleratedOptimizer

    def skipped(self):  # gen's weight is 3 x 3, disc's 1 x 3
        return self.optimizer.param_groups[0]["params"][0].shape[0] > 1

    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(skipped))
    train(toy_recipe(tmp_path / "run", log_every=1), progress=False)
    logged = records(tmp_path / "run")
    # gen steps at steps 1 and 4 only
    assert [logged[s]["scaler_skipped_steps"] for s in range(1, 7)] == [1, 1, 1, 2, 2, 2]


def test_an_evaluation_that_samples_does_not_change_the_training_losses(tmp_path):
    """Evaluation draws noise from the global RNG (toy: sample_at_eval), yet the training
    losses, which draw noise every step, equal those of a run without evaluation."""
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    train(toy_recipe(plain, log_every=1), progress=False)
    train(toy_recipe(evaluated, log_every=1, eval_every=1,
                     objective={"sample_at_eval": True}), progress=False)
    assert sorted(records(evaluated, "eval")) == list(range(7))  # step 0 .. 6
    assert ({s: r["a_loss"] for s, r in records(evaluated).items()}
            == {s: r["a_loss"] for s, r in records(plain).items()})


def test_after_evaluate_writes_an_artefact_per_evaluation_and_to_the_tracker(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(toy_recipe(run, eval_every=3, report_to=["tensorboard"]), progress=False)
    pngs = sorted(p.name for p in (run / "samples").iterdir())
    assert pngs == ["step-000000.png", "step-000003.png", "step-000006.png"]
    assert all((run / "samples" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    steps = []
    for events in run.rglob("events.out.tfevents.*"):  # the scalars' writer and others
        accumulator = EventAccumulator(str(events)).Reload()
        if "samples" in accumulator.Tags()["images"]:
            steps += [e.step for e in accumulator.Images("samples")]
    assert steps == [0, 3, 6]


def test_eval_examples_sets_the_size_of_an_evaluation(tmp_path):
    from overture.evaluation import eval_size

    recipe = toy_recipe(tmp_path / "run", eval_examples=5)
    assert eval_size(recipe, recipe.resolved_phases()[0]) == 5
    recipe = toy_recipe(tmp_path / "run", eval_batches=2)
    assert eval_size(recipe, recipe.resolved_phases()[0]) == 16
    with pytest.raises(ConfigError, match="train.eval_examples=0 must be positive"):
        toy_recipe(tmp_path / "run", eval_examples=0)


def test_a_familys_ddp_options_reach_accelerate(tmp_path):
    from overture.engine import ddp_kwargs

    [handler] = ddp_kwargs(registry.get_family("toy"))
    assert handler.to_kwargs() == {"broadcast_buffers": False}
    assert ddp_kwargs(registry.get_family("bert")) == []


def test_an_update_that_runs_every_zero_steps_is_refused():
    from overture.objective import Update

    with pytest.raises(ValueError, match="every=0 must be a positive integer"):
        Update("gen", ("gen",), ("b",), every=0)


def test_a_resume_that_adds_settings_for_an_update_is_refused_except_its_lr(tmp_path):
    """train.updates.NAME exists only where given: an entry added since the checkpoint is
    compared with null, so new betas are refused like train.adam_beta1 would be."""
    run = tmp_path / "run"
    train(toy_recipe(run, max_steps=3, save_every=3), progress=False)
    with pytest.raises(ConfigError, match=r"train\.updates\.gen\.adam_beta1: None -> 0\.5"):
        train(toy_recipe(run, updates={"gen": {"adam_beta1": 0.5}}), progress=False)
    train(toy_recipe(run, log_every=1, updates={"gen": {"lr": 2e-3}}), progress=False)
    assert records(run)[4]["lr_gen"] == pytest.approx(2e-3)


def test_a_fresh_start_over_a_stale_log_keeps_no_record_of_the_dead_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"split": "eval", "step": 0, "a_loss": 9.0}\n'
                                       '{"split": "train", "step": 3, "a_loss": 9.0}\n')
    train(toy_recipe(run, eval_every=3), progress=False)  # no checkpoint: starts over
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [(r["split"], r["step"]) for r in map(__import__("json").loads, lines)] == [
        ("eval", 0), ("train", 3), ("eval", 3), ("train", 6), ("eval", 6)]
    assert records(run, "eval")[0]["a_loss"] != 9.0
