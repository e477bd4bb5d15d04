"""The training loop beyond the per-family contract (tests/test_contract.py): unit
counting, phases, several updates and frozen models."""

from __future__ import annotations

import json
from collections import Counter

import torch

from helpers import records
from overture.engine import train
from overture.objective import Update


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




class TwoPlayers:
    """A toy objective with two updates (the second every other step) and a frozen
    encoder, in the shape of a GAN: what the contract promises beyond one optimizer."""

    unit = "images"
    heads = ("d", "g")

    def __init__(self, recipe, folder):
        self.recipe, self.folder = recipe, folder
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(4, 4)
        self.calls: Counter = Counter()

    def prepare(self, phase, progress=True):
        import datasets

        from overture.data.prepare import PreparedData

        rows = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)).tolist()
        data = datasets.Dataset.from_dict({"x": rows})
        return PreparedData(self.folder, data, data.select(range(16)), {})

    def build_models(self, vocab_size=None):
        torch.manual_seed(1)
        return {"generator": torch.nn.Linear(4, 4), "discriminator": torch.nn.Linear(4, 1)}

    def frozen_models(self):
        return {"encoder": self.encoder}

    def updates(self):
        return [Update("disc", ("discriminator",), ("d",)),
                Update("gen", ("generator",), ("g",), every=2)]

    def collator(self, phase):
        class Stack:
            def set_epoch(self, epoch):
                pass

            def __call__(self, rows):
                return {"x": torch.tensor(rows["columns"]["x"])}

        return Stack()

    def forward(self, models, batch, update):
        self.calls[update.name if update else "eval"] += 1
        real = self.encoder(batch["x"])
        fake = models["generator"](real)
        disc = models["discriminator"]
        out = {}
        if update is None or update.name == "disc":
            out["d_loss_sum"] = ((disc(real) - 1) ** 2).sum() + (disc(fake.detach()) ** 2).sum()
        if update is None or update.name == "gen":
            out["g_loss_sum"] = ((disc(fake) - 1) ** 2).sum()
        return out

    def target_counts(self, batch):
        n = torch.tensor(batch["x"].shape[0])
        return {"d": n, "g": n}

    def count_units(self, batch):
        return batch["x"].shape[0]

    def summarize(self, sums, counts):
        out = {f"{h}_loss": sums.get(f"{h}_loss_sum", 0.0) / max(counts[h], 1)
               for h in self.heads}
        return {**out, "loss": sum(out.values())}

    def flops_per_unit(self, phase):
        return 1.0

    def data_report(self, data, phase):
        return {}

    def export(self, models, state_dicts, folder):
        torch.save(state_dicts, folder / "models.pt")


def test_several_updates_run_on_their_schedule_and_frozen_models_stay_frozen(
        make_recipe, tmp_path, monkeypatch):
    import overture.engine as engine

    recipe = make_recipe(tmp_path / "gan", "train.max_steps=4", "train.log_every=1",
                         "train.save_every=0", "train.eval_every=0", "train.batch_size=8")
    objective = TwoPlayers(recipe, tmp_path)
    before = {k: v.clone() for k, v in objective.encoder.state_dict().items()}
    monkeypatch.setattr(engine, "build_objective", lambda r: objective)
    final = train(recipe, progress=False)
    assert objective.calls["disc"] == 4 and objective.calls["gen"] == 2  # steps 0 and 2
    for key, value in objective.encoder.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(not p.requires_grad for p in objective.encoder.parameters())
    saved = torch.load(final / "models.pt", weights_only=True)
    assert set(saved) == {"generator", "discriminator"}  # the frozen encoder is not trained
    logged = records(tmp_path / "gan")
    assert [logged[s]["images_seen"] for s in (1, 2, 3, 4)] == [8, 16, 24, 32]
    assert all(logged[s]["images_per_s"] > 0 for s in logged)


def test_loader_workers_kept_across_epochs_draw_each_epochs_randomness(tmp_path, cache_dir):
    """Loader workers live across epochs (persistent), so the collator in them learns the
    epoch from each batch: two workers give the losses of the in-process loader over
    three epochs of the digits, whose augmentations are drawn per epoch (a collator
    stuck at epoch 0 in the workers would repeat epoch 0's pixels from step 9 on)."""
    from helpers import tiny

    def run(name: str, *extra: str) -> dict[int, float]:
        folder = tmp_path / name
        # 64 images in batches of 8: an epoch every 8 steps
        train(tiny("image", folder, cache_dir, "unused", "train.max_steps=20",
                   "train.log_every=1", "train.eval_every=0", "train.save_every=0",
                   *extra), progress=False)
        return {step: r["loss"] for step, r in records(folder).items()}

    in_process = run("workers-0")
    workers = run("workers-2", "train.num_workers=2")
    assert sorted(workers) == list(range(1, 21))
    for step, loss in in_process.items():
        assert abs(workers[step] - loss) < 1e-5, step


def test_data_wait_fraction_is_the_share_of_time_spent_waiting_for_batches(tmp_path,
                                                                          cache_dir,
                                                                          monkeypatch):
    """A collator slowed down by 1 s a batch makes the loader the bottleneck: the
    logged data_wait_fraction says so; without the delay it is small."""
    import time

    from helpers import tiny
    from overture.pretrain.image.transforms import ImageCollator

    def run(name: str) -> list[float]:
        folder = tmp_path / name
        train(tiny("image", folder, cache_dir, "unused", "train.max_steps=6",
                   "train.log_every=3", "train.eval_every=0", "train.save_every=0",
                   "train.eval_batches=1"), progress=False)
        return [r["data_wait_fraction"] for r in records(folder).values()]

    fast = run("fast")
    collate = ImageCollator.__call__
    monkeypatch.setattr(ImageCollator, "__call__",
                        lambda self, rows: time.sleep(1.0) or collate(self, rows))
    slow = run("slow")
    assert all(0 <= f < 0.5 for f in fast), fast
    assert slow[-1] > 0.6, slow  # the first record also holds the start-up


def test_training_loader_pins_memory_on_cuda_and_uses_the_recipes_workers(
        make_recipe, tmp_path, monkeypatch):
    from accelerate import Accelerator

    from helpers import prepare
    from overture import loaders

    recipe = make_recipe(tmp_path / "run", "train.num_workers=2")
    data = prepare(recipe)
    phase = recipe.resolved_phases()[0]
    for cuda in (False, True):
        monkeypatch.setattr(loaders.torch.cuda, "is_available", lambda: cuda)
        loader, _ = loaders.train_loader(data.train, data.objective.collator(phase), phase,
                                         recipe, Accelerator(cpu=True))
        assert loader.pin_memory is cuda and loader.num_workers == 2


def test_one_loader_iterator_runs_through_epochs_in_each_epochs_order(monkeypatch):
    """The stream crosses three epoch ends with one loader iterator (its workers
    prefetch the next epoch's first batch while the last one trains); the batches are
    each epoch's seeded order cut into batches, its incomplete tail dropped, and the data
    position counts batches within the epoch."""
    from accelerate import Accelerator

    from overture import loaders
    from overture.config import load_recipe
    from overture.state import TrainState

    class Examples:  # 23 examples: 5 batches of 4 per epoch, 3 left over
        column_names = ["input_ids"]

        def __len__(self):
            return 23

        def __getitem__(self, rows):
            return {"input_ids": list(rows)}

    class Collator:  # the worker's copy learns each batch's epoch (EpochCollate)
        epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __call__(self, rows):
            return {**rows, "epoch": self.epoch}

    recipe = load_recipe("bert-tiny", ["train.batch_size=4", "train.num_workers=1"])
    iterators = []
    original = torch.utils.data.DataLoader.__iter__

    def counted(self):
        iterators.append(self)
        return original(self)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", counted)
    loader, epochs = loaders.train_loader(Examples(), Collator(), recipe.resolved_phases()[0],
                                          recipe, Accelerator(cpu=True))
    state = TrainState()
    stream = loaders.micro_batches(loader, epochs, state)
    seen, positions = [], []
    for _ in range(16):  # 3 epochs of 5 batches, and one more
        batch = next(stream)
        seen.append(batch["indices"])
        positions.append((state.epoch, state.batch_in_epoch))
        assert batch["epoch"] == state.epoch
    assert len(iterators) == 1 and epochs.per_process == 5
    expected = []
    for epoch in range(4):
        sampler = loaders.EpochSampler(23, recipe.train.seed)
        sampler.set_epoch(epoch)
        order = list(sampler)
        expected += [order[b * 4:(b + 1) * 4] for b in range(5)]
    assert seen == expected[:16]
    assert positions == [(e, b) for e in range(3) for b in range(1, 6)] + [(3, 1)]
    assert expected[0:5] != expected[5:10]  # a new order each epoch


def test_dynamic_masks_in_loader_workers_follow_the_epoch(tmp_path, cache_dir, real_text):
    """RoBERTa's dynamic masks are drawn per (epoch, example): two persistent loader
    workers give the in-process losses across an epoch boundary."""
    from helpers import prepare, tiny

    corpus = tmp_path / "small.txt"
    corpus.write_text(real_text.read_text(encoding="utf-8")[:8_000], encoding="utf-8")
    base = ("train.batch_size=4", "data.max_seq_len=32", "train.log_every=1",
            "train.eval_every=0", "train.save_every=0")
    per_epoch = len(prepare(tiny("roberta", "unused", tmp_path / "cache", corpus,
                                 *base)).train) // 4
    losses = {}
    for workers in (0, 2):
        run = tmp_path / f"workers-{workers}"
        train(tiny("roberta", run, tmp_path / "cache", corpus, *base,
                   f"train.max_steps={per_epoch + 3}", f"train.num_workers={workers}"),
              progress=False)
        losses[workers] = {s: r["loss"] for s, r in records(run).items()}
    assert per_epoch >= 2 and sorted(losses[2]) == list(range(1, per_epoch + 4))
    for step, loss in losses[0].items():
        assert abs(losses[2][step] - loss) < 1e-5, step
