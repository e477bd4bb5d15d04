"""Launched on two processes by test_contract.py: each rank takes its half of a saved
batch, runs one DDP training step, and rank 0 saves the resulting parameters; then the
seed-0 model is evaluated on held-out examples and rank 0 saves the metrics.

usage: torchrun --standalone --nproc_per_node 2 ddp_step.py CACHE_DIR CORPUS WORK_DIR ITEM...
(ITEM: FAMILY, FAMILY+init=CHECKPOINT for a continued run, or GAN_FAMILY+text_encoder
for a GAN with a trained text encoder: the last two take their step only)
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

import json

from helpers import (EVAL_SETTINGS, TRAINED_ENCODER, continued, eval_metrics, prepare, sgd_step,
                     tiny)

cache_dir, corpus, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
for item in sys.argv[4:]:
    # FAMILY, or FAMILY+init=CHECKPOINT: the family continuing a checkpoint (step only)
    name, _, checkpoint = item.partition("=")
    family, _, variant = name.partition("+")
    extra = list(TRAINED_ENCODER) if variant == "text_encoder" else []
    recipe = (continued(family, checkpoint, "unused", cache_dir, corpus) if checkpoint
              else tiny(family, "unused", cache_dir, corpus, *extra))
    big = torch.load(work / f"{name}-batch.pt", weights_only=True)
    share = len(next(iter(big.values()))) // world
    mine = {k: v[rank * share:(rank + 1) * share] for k, v in big.items()}
    params = sgd_step(recipe, prepare(recipe).objective, [mine], accelerator)
    if variant:
        if accelerator.is_main_process:
            torch.save(params, work / f"{name}-ddp.pt")
        accelerator.wait_for_everyone()
        continue
    metrics = eval_metrics(tiny(family, "unused", cache_dir, corpus, *EVAL_SETTINGS),
                           accelerator)
    if accelerator.is_main_process:
        torch.save(params, work / f"{family}-ddp.pt")
        (work / f"{family}-eval.json").write_text(json.dumps(metrics))
    accelerator.wait_for_everyone()
