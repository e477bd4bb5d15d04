"""Linear probes: a linear classifier on frozen features, the standard measure of a
pretrained image representation (``overture probe``).

``logreg``: scikit-learn's multinomial logistic regression on standardised features.
``linear``: one ``nn.Linear`` layer trained with L-BFGS on the same standardised
features (cross-entropy, a small L2 penalty), in torch.
"""

from __future__ import annotations

import numpy as np
import torch

from overture.config import ConfigError

METHODS = ("logreg", "linear")


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray,
              eval_y: np.ndarray, method: str = "logreg", l2: float = 1e-4,
              seed: int = 0) -> dict[str, float]:
    """Fit on (train_x, train_y), score top-1 on both splits."""
    if method not in METHODS:
        raise ConfigError(f"--method={method!r} is not one of {', '.join(METHODS)}")
    if len(np.unique(train_y)) < 2:
        raise ConfigError("the probe needs at least two classes in the training images")
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, eval_x = (train_x - mean) / std, (eval_x - mean) / std
    if method == "logreg":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=2000, C=1.0 / max(l2 * len(train_x), 1e-12),
                                 random_state=seed)
        clf.fit(train_x, train_y)
        predict = clf.predict
    else:
        predict = _fit_linear(train_x, train_y, l2, seed)
    return {"top1": float((predict(eval_x) == eval_y).mean()) if len(eval_y) else float("nan"),
            "train_top1": float((predict(train_x) == train_y).mean()),
            "train_images": int(len(train_y)), "eval_images": int(len(eval_y)),
            "features": int(train_x.shape[1])}


def _fit_linear(x: np.ndarray, y: np.ndarray, l2: float, seed: int):
    torch.manual_seed(seed)
    classes = int(y.max()) + 1
    inputs, targets = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    layer = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(inputs), targets) \
            + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)

    def predict(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return layer(torch.from_numpy(features).float()).argmax(-1).numpy()

    return predict


SEED_MAX = 2**32 - 1
"""The largest seed numpy and scikit-learn take (seeds are 0..2**32 - 1)."""


def check_seed(option: str, value) -> None:
    """Refuse a seed numpy / scikit-learn would reject, naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{option}={value} must be an integer from 0 to {SEED_MAX} "
                          "(2**32 - 1)")


def probe(checkpoint: str, data: str, eval_data: str | None = None,
          eval_fraction: float = 0.2, method: str = "logreg", random_init: bool = False,
          seed: int = 0, batch_size: int = 256, cache_dir: str = "~/.cache/overture",
          data_seed: int = 12345) -> dict[str, float]:
    """Top-1 of a linear probe on ``checkpoint``'s frozen features: fitted on ``data``'s
    training images, scored on ``eval_data`` (or the held-out ``eval_fraction`` of
    ``data``: with the same fraction and seed as a recipe's data section, the same
    held-out images as that run's evaluation)."""
    from .data import ImageDataConfig, prepare_images
    from .features import ImageEncoder

    for option, value in (("--seed", seed), ("--data-seed", data_seed)):  # before any work
        check_seed(option, value)
    if method not in METHODS:  # before any work
        raise ConfigError(f"--method={method!r} is not one of {', '.join(METHODS)}")
    encoder = ImageEncoder(checkpoint, random_init=random_init, seed=seed)
    cfg = ImageDataConfig(source=[data], eval_source=[eval_data] if eval_data else [],
                          eval_fraction=eval_fraction, image_size=encoder.image_size,
                          cache_dir=cache_dir, seed=data_seed)
    cfg.validate()
    prepared = prepare_images(cfg, labelled=True, progress=False)
    if len(prepared.eval) == 0:
        raise ConfigError(f"--data {data}: no held-out images (raise --eval-fraction or "
                          "give --eval-data)")
    train_x = encoder.encode_rows(prepared.train, batch_size)
    eval_x = encoder.encode_rows(prepared.eval, batch_size)
    result = fit_probe(train_x, np.asarray(prepared.train["label"]), eval_x,
                       np.asarray(prepared.eval["label"]), method=method, seed=seed)
    return {"checkpoint": str(checkpoint), "init": "random" if random_init else "trained",
            "method": method, **result}
