"""The training loop beyond the per-family contract (tests/test_contract.py): unit
counting, phases, several updates and frozen models."""

from __future__ import annotations

import json

from helpers import records
from overture.engine import train


def test_units_are_counted_every_step_not_only_when_logged(make_recipe, tmp_path):
    # Logged every step, the run reports how many tokens it has seen after step 3.
    logged = tmp_path / "logged"
    train(make_recipe(logged, "train.max_steps=3", "train.log_every=1", "train.save_every=0",
                      "train.eval_every=0"), progress=False)
    expected = records(logged)[3]["tokens_seen"]
    # Logged only at the end but checkpointed at step 3: the checkpoint holds the same
    # count, so a run resumed from it reports the true total.
    sparse = tmp_path / "sparse"
    train(make_recipe(sparse, "train.max_steps=4", "train.log_every=4", "train.save_every=3",
                      "train.eval_every=0", "train.keep_last=5"), progress=False)
    state = json.loads((sparse / "checkpoints" / "step-000003" / "train_state.json").read_text())
    assert state["units_seen"] == expected > 0


def test_phases_switch_sequence_length_and_continue_the_schedule(make_recipe, tmp_path):
    run = tmp_path / "phased"
    recipe = make_recipe(run, "train.log_every=1", "train.save_every=0", "train.warmup_steps=0",
                         "phases=[{steps: 2, max_seq_len: 32, batch_size: 8}, "
                         "{steps: 2, max_seq_len: 64, batch_size: 4}]")
    assert recipe.total_steps == 4
    train(recipe, progress=False)
    logged = records(run)
    assert [logged[s]["seq_len"] for s in (1, 2, 3, 4)] == [32, 32, 64, 64]
    lrs = [logged[s]["lr"] for s in (1, 2, 3, 4)]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == 0.0  # one linear decay over both


