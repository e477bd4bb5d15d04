"""Fine-tune a checkpoint on a GLUE task with transformers' Trainer, at overture's
fine-tuning settings, to check `overture finetune`'s dev score against the path users
would otherwise take (same checkpoint, data files, lr, batch, steps, warmup, decay).

usage: python benchmarks/trainer_finetune.py CHECKPOINT GLUE_DIR [--task sst2] [--lr 1e-4]
           [--max-steps 600] [--epochs N] [--seed 42] [--batch-size 32] [--max-length 128]

Prints one JSON line: the task, the settings and the dev accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

COLUMNS = {"sst2": ("SST-2", ("sentence",), ("0", "1")),
           "rte": ("RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"))}


def read(path: Path, texts, labels):
    """Rows of a GLUE TSV (tab-separated, no quoting: a '"' is part of the text)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return {"texts": [[r[c] for c in texts] for r in rows],
            "label": [labels.index(r["label"]) for r in rows]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("glue_dir")
    p.add_argument("--task", default="sst2", choices=sorted(COLUMNS))
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--epochs", type=float, default=None, help="instead of --max-steps")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args()

    import datasets
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments, set_seed)

    folder, texts, labels = COLUMNS[args.task]
    tok = AutoTokenizer.from_pretrained(args.checkpoint)

    def encode(split):
        raw = read(Path(args.glue_dir) / folder / f"{split}.tsv", texts, labels)
        pairs = list(zip(*raw["texts"]))
        enc = tok(*[list(c) for c in pairs], truncation=True, max_length=args.max_length)
        return datasets.Dataset.from_dict({**enc, "labels": raw["label"]})

    train, dev = encode("train"), encode("dev")
    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.checkpoint, num_labels=2)
    steps = (math.ceil(args.epochs * (len(train) // args.batch_size)) if args.epochs
             else args.max_steps)
    with tempfile.TemporaryDirectory() as out:
        settings = TrainingArguments(  # overture's glue-finetune settings, 10% warmup
            output_dir=out, learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64, weight_decay=0.01, adam_epsilon=1e-8,
            warmup_steps=math.ceil(0.1 * steps), lr_scheduler_type="linear",
            max_grad_norm=1.0, max_steps=steps, seed=args.seed,
            train_sampling_strategy="group_by_length", save_strategy="no",
            eval_strategy="no", report_to=[], logging_steps=50, disable_tqdm=True,
            use_cpu=True)
        trainer = Trainer(model=model, args=settings, train_dataset=train,
                          data_collator=DataCollatorWithPadding(tok))
        trainer.train()
    # the dev rows in order (a length-grouped predict would reorder them), batches of 64
    import torch

    model.eval()
    collate = DataCollatorWithPadding(tok)
    rows = [{k: dev[i][k] for k in ("input_ids", "attention_mask", "token_type_ids")
             if k in dev.column_names} for i in range(len(dev))]
    with torch.inference_mode():
        predicted = np.concatenate([model(**collate(rows[i:i + 64])).logits.argmax(-1).numpy()
                                    for i in range(0, len(rows), 64)])
    accuracy = float(np.mean(predicted == np.asarray(dev["labels"])))
    print(json.dumps({"task": args.task, "checkpoint": args.checkpoint, "lr": args.lr,
                      "max_steps": args.max_steps, "epochs": args.epochs, "seed": args.seed,
                      "dev_accuracy": accuracy}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
