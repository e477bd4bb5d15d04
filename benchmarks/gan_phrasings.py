"""Caption consistency of a trained digits GAN by phrasing: the held-out phrasings (what
evaluation reports) against the training phrasings, for the same held-out images, noise
and attributes. A large gap says the text encoder does not carry a digit's name from one
sentence shape to another; a small one says the generator itself misses the digit. And
the text encoder alone (final/text_encoder): the share of held-out captions nearest the
mean embedding of their own digit's training captions.

    python benchmarks/gan_phrasings.py runs/gan-int-cls-digits [--seeds 3]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--seeds", type=int, default=3, help="noise draws per caption")
    args = parser.parse_args()

    from overture.config import load_recipe
    from overture.pretrain.gan import captions as cap
    from overture.pretrain.gan.family import (ENCODER_FOLDER, GENERATOR_FILE, _final, _load,
                                              build_generator)
    from overture.pretrain.gan.text import load_encoder
    from overture.registry import build_objective

    final = _final(args.run)
    recipe = load_recipe(final / "recipe.yaml")
    objective = build_objective(recipe)
    objective.prepare(recipe.resolved_phases()[0], progress=False)
    config = json.loads((final / "config.json").read_text())
    generator = build_generator(objective.name, config["generator"]).eval()
    _load(generator, final / GENERATOR_FILE, "run")
    judge = objective.frozen_models()["judge"].eval()
    obj = recipe.objective
    encoder = load_encoder(str(final / ENCODER_FOLDER))  # as trained (or the frozen one)
    labels = objective.labels["eval"]
    attributes = objective.captions.eval_attributes
    results = {}
    for name, phrasings in (("held-out", cap.HELD_OUT_PHRASINGS),
                            ("training", cap.TRAIN_PHRASINGS)):
        hits = total = 0
        for phrasing in phrasings:
            texts = [phrasing.format(word=cap.WORDS[y], number=str(y),
                                     thickness=cap.THICKNESS[t], slant=cap.SLANT[s],
                                     size=cap.SIZE[z])
                     for y, (t, s, z) in zip(labels, attributes)]
            h = torch.from_numpy(objective.standardize(encoder.encode(
                texts, pooling=obj.text_pooling, layer=obj.text_layer)))
            for seed in range(args.seeds):
                z = torch.randn(len(texts), recipe.model.noise_dim,
                                generator=torch.Generator().manual_seed(seed))
                with torch.no_grad():
                    images, _ = generator(z, h, None)
                    predicted = judge(images)[0].argmax(-1).numpy()
                hits += int((predicted == labels).sum())
                total += len(labels)
        results[name] = hits / total
        print(f"{name} phrasings ({len(phrasings)} x {len(labels)} images x {args.seeds} "
              f"noise draws): caption consistency {hits / total:.1%}")
    # the text encoder alone: is each held-out caption (as evaluation picks it) nearer the
    # mean of its own digit's training captions than of any other digit's?
    caps = objective.captions
    table = objective.standardize(encoder.encode(caps.texts, pooling=obj.text_pooling,
                                                 layer=obj.text_layer))
    rows = np.array([i for image in caps.train for i in image])
    digits = np.array([y for image, y in zip(caps.train, objective.labels["train"])
                       for _ in image])
    classes = np.unique(digits)
    centroids = np.stack([table[rows[digits == c]].mean(0) for c in classes])
    held = table[[image[k % len(image)] for k, image in enumerate(caps.eval)]]
    nearest = classes[((held[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    results["encoder_nearest_centroid"] = float((nearest == labels).mean())
    print(f"text encoder alone: held-out captions nearest their digit's training captions "
          f"{results['encoder_nearest_centroid']:.1%}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
