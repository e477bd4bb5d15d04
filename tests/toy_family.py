"""A two-player toy family for the engine's generic tests: a "disc" update every step on
head "a" and a "gen" update every ``objective.every`` steps on head "b", as a GAN has.

Head b's loss is exactly ``objective.b_loss`` per target whatever the weights (its value
is a constant, its gradient real), so a logged b_loss can be checked by hand. Head a's
loss depends on noise drawn from the global RNG at every training step, so anything that
draws from that stream elsewhere (an evaluation that samples) shows in it.

Registered in a test with ``monkeypatch.setitem(registry.FAMILIES, "toy", "toy_family:Toy")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from overture.config import ConfigError
from overture.data.prepare import PreparedData
from overture.objective import Update


@dataclass
class ToyData:
    examples: int = 48
    eval_examples: int = 16
    width: int = 3

    def validate(self) -> None:
        if self.examples < 1 or self.eval_examples < 0:
            raise ConfigError("data.examples must be positive")


@dataclass
class ToyModel:
    def validate(self) -> None:
        pass

    def position_limit(self) -> tuple[str, int]:
        return "none", 1 << 30


@dataclass
class ToyObjective:
    name: str = "toy"
    every: int = 3
    """The gen update's period."""
    b_loss: float = 2.0
    sample_at_eval: bool = False
    """Draw from the global RNG at every evaluation (as a GAN's noise)."""
    share: bool = False
    """A third model "side" in head b's loss, stepped by update "side" on gen's backward
    (``Update.with_previous``), as a GAN's trained text encoder on D's."""

    def validate(self) -> None:
        pass


class ToyCollator:
    def set_epoch(self, epoch: int) -> None:
        pass

    def __call__(self, rows: dict) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor(rows["columns"]["x"], dtype=torch.float32)}


class Toy:
    model_config = ToyModel
    objective_config = ToyObjective
    data_config = ToyData
    unit = "examples"
    heads = ("a", "b")
    auto_class = ""
    ddp_options = {"broadcast_buffers": False}

    def __init__(self, recipe):
        self.recipe = recipe
        self.tokenizer = None
        self.evaluated: list[int] = []
        self.forwarded: list[str | None] = []  # the update of every forward call

    def prepare(self, phase, progress: bool = True) -> PreparedData:
        import datasets

        data = self.recipe.data
        rows = torch.randn(data.examples + data.eval_examples, data.width,
                           generator=torch.Generator().manual_seed(0)).tolist()
        split = data.examples
        return PreparedData(folder=Path(self.recipe.output_dir),
                            train=datasets.Dataset.from_dict({"x": rows[:split]}),
                            eval=datasets.Dataset.from_dict({"x": rows[split:]}),
                            stats={"train_examples": split, "eval_examples": len(rows) - split})

    def build_models(self, vocab_size=None) -> dict[str, nn.Module]:
        width = self.recipe.data.width
        models = {"disc": nn.Linear(width, 1), "gen": nn.Linear(width, width)}
        if self.recipe.objective.share:
            models["side"] = nn.Linear(width, 1)
        return models

    def frozen_models(self) -> dict[str, nn.Module]:
        return {}

    def updates(self) -> list[Update]:
        every = self.recipe.objective.every
        updates = [Update("disc", ("disc",), ("a",)), Update("gen", ("gen",), ("b",), every=every)]
        if self.recipe.objective.share:
            updates.append(Update("side", ("side",), ("b",), every=every, with_previous=True))
        return updates

    def collator(self, phase) -> ToyCollator:
        return ToyCollator()

    def forward(self, models, batch, update) -> dict[str, torch.Tensor]:
        x, out = batch["x"], {}
        n = len(x)
        self.forwarded.append(update.name if update is not None else None)
        if update is None or "a" in update.heads:
            noise = torch.randn_like(x) if update is not None else 0.0
            out["a_loss_sum"] = (models["disc"](x + noise) ** 2).sum()
        if update is None or "b" in update.heads:
            y = models["gen"](x).sum()
            if "side" in models:
                y = y + models["side"](x).sum()
            out["b_loss_sum"] = y - y.detach() + self.recipe.objective.b_loss * n
        if update is None and self.recipe.objective.sample_at_eval:
            torch.randn(100)  # noise for samples: a draw from the global stream
        return out

    def target_counts(self, batch) -> dict[str, torch.Tensor]:
        n = torch.tensor(len(batch["x"]))
        return {"a": n, "b": n}

    def count_units(self, batch) -> torch.Tensor:
        return torch.tensor(len(batch["x"]))

    def summarize(self, sums: dict, counts: dict) -> dict[str, float]:
        out = {f"{h}_loss": sums[f"{h}_loss_sum"] / counts[h]
               for h in self.heads if counts.get(h) and f"{h}_loss_sum" in sums}
        out["loss"] = sum(out.values())
        return out

    def flops_per_unit(self, phase) -> float:
        return 0.0

    def data_report(self, data, phase) -> dict:
        return {}

    def after_evaluate(self, models, step: int, run_dir: Path) -> dict[str, Path]:
        """The gen weights as a grey PNG, one per evaluation."""
        from PIL import Image

        weight = models["gen"].weight.detach()
        pixels = ((weight - weight.min()) / (weight.max() - weight.min() + 1e-9) * 255)
        path = Path(run_dir) / "samples" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.to(torch.uint8).numpy()).resize((12, 12)).save(path)
        self.evaluated.append(step)
        return {"samples": path}

    def export(self, models, state_dicts, folder: Path) -> None:
        from safetensors.torch import save_file

        for name, state in state_dicts.items():
            save_file({k: v.contiguous() for k, v in state.items()},
                      str(Path(folder) / f"{name}.safetensors"))
