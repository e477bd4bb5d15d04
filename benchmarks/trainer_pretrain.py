"""Pretraining speed: overture against transformers' Trainer, side by side (run by hand).

Both sides train the same transformers model class from the same config, on the same
cached examples (overture's prepared Arrow cache), at the same batch, learning rate,
schedule, betas, epsilon, weight decay and clipping. The Trainer side uses the model's
own pretraining loss and the stock collator (DataCollatorForLanguageModeling: dynamic
15% masks, or labels = inputs for GPT), as a user of the Trainer would. Tokens/s counts
real (non-padding) tokens over the steps after --warmup; the two sides alternate, one
run each per round, --repeats rounds.

    .venv/bin/python -m benchmarks.trainer_pretrain --family gpt --size 128x2
    .venv/bin/python -m benchmarks.trainer_pretrain --family bert --size 256x4 --repeats 3

GPT's and ALBERT's default activation in overture is gelu_pytorch_tanh (their gelu_new as
one fused kernel); the Trainer side uses GPT2Config's and AlbertConfig's default, gelu_new,
unless --same-activation.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from benchmarks.common import (SHARED_DATA, alternate, cli, engine_run, fmt, machine, quiet,
                               record, spread, table)

SIZES = {"128x2": (128, 2, 2), "256x4": (256, 4, 4), "base": (768, 12, 12)}
RECIPES = {"bert": "bert-tiny", "roberta": "roberta-tiny", "albert": "albert-tiny",
           "gpt": "gpt-tiny", "longformer": "longformer-tiny"}


def overrides(family: str, size: str, args) -> list[str]:
    """The recipe settings of one comparison."""
    hidden, layers, heads = SIZES[size]
    wikitext = SHARED_DATA / "wikitext-2"
    corpus = ([args.corpus] if args.corpus else
              [str(wikitext / "valid.txt"), str(wikitext / "test.txt")]
              if wikitext.is_dir() else ["default"])
    out = [f"data.corpus=[{','.join(corpus)}]", f"data.max_seq_len={args.seq}",
           f"tokenizer.vocab_size={args.vocab}", f"train.batch_size={args.batch}",
           "train.warmup_steps=10", "train.eval_every=0", "train.save_every=0",
           "train.eval_batches=1", "train.log_every=10", "data.eval_fraction=0.01"]
    if family == "gpt":
        out += [f"model.n_embd={hidden}", f"model.n_layer={layers}", f"model.n_head={heads}",
                f"model.n_positions={args.seq}"]
    else:
        out += [f"model.hidden_size={hidden}", f"model.num_hidden_layers={layers}",
                f"model.num_attention_heads={heads}", f"model.intermediate_size={4 * hidden}",
                # Longformer's recipe counts the positions past its padding index itself
                f"model.max_position_embeddings={args.seq + 2 * (family != 'longformer')}",
                f"objective.max_predictions_per_seq={round(0.15 * args.seq)}"]
    return out


def trainer_side(objective, recipe, family: str, same_activation: bool):
    """(model factory, dataset, collator) of the Trainer path."""
    import datasets
    from transformers import DataCollatorForLanguageModeling

    tok = copy.copy(objective.tokenizer)
    model = objective.build_models()["model"].model
    config = copy.deepcopy(model.config)
    # transformers' own kernel (overture's may train unpadded); Longformer has its own only
    config._attn_implementation = "eager" if family == "longformer" else "sdpa"
    if family == "gpt" and not same_activation:
        config.activation_function = "gelu_new"  # GPT2Config's default
    if family == "albert" and not same_activation:
        config.hidden_act = "gelu_new"  # AlbertConfig's default
    model_class = type(model)
    phase = recipe.resolved_phases()[0]
    rows = objective.prepare(phase, progress=False).train
    columns = {"input_ids": rows["input_ids"]}
    if "sentence_label" in rows.column_names:  # BERT's NSP or ALBERT's SOP pairs
        sep = tok.sep_token_id
        columns["token_type_ids"] = [[int(seen > 0 and not (t == sep and seen == 1))
                                      for seen, t in zip(_seps_before(ids, sep), ids)]
                                     for ids in rows["input_ids"]]
        # BERT's NSP / ALBERT's SOP label, under the stock model's argument name
        label = "sentence_order_label" if family == "albert" else "next_sentence_label"
        columns[label] = rows["sentence_label"]
    dataset = datasets.Dataset.from_dict(columns)
    if tok.pad_token is None:  # GPT-2's tokenizer has none; its blocks are full anyway
        tok.pad_token = tok.eos_token
    collator = DataCollatorForLanguageModeling(tok, mlm=family != "gpt", mlm_probability=0.15)
    if family == "longformer" and recipe.objective.global_attention == "first":
        collator = _first_token_global(collator)
    return (lambda: model_class(config)), dataset, collator


def _first_token_global(collator):
    """The stock collator's batch plus Longformer's global attention on each row's first
    token (<s>), as overture's recipe trains it; the model pads both to its window."""
    import torch

    def collate(examples):
        batch = collator(examples)
        glob = torch.zeros_like(batch["input_ids"])
        glob[:, 0] = 1
        return {**batch, "global_attention_mask": glob}

    return collate


def _seps_before(ids: list[int], sep: int) -> list[int]:
    """For each position, how many [SEP] come at or before it."""
    out, seen = [], 0
    for t in ids:
        seen += t == sep
        out.append(seen)
    return out


def trainer_run(make_model, dataset, collator, cfg, steps: int, warmup: int,
                out: Path) -> dict:
    """Tokens/s of transformers' Trainer over the steps after ``warmup``."""
    import torch
    from transformers import (PrinterCallback, Trainer, TrainerCallback, TrainingArguments,
                              set_seed)

    counted = {"tokens": 0}

    def counting(examples):
        batch = collator(examples)
        mask = batch.get("attention_mask")
        counted["tokens"] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch

    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + steps):
                marks[state.global_step] = (time.perf_counter(), counted["tokens"])

    set_seed(cfg.seed)
    settings = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, adam_epsilon=cfg.adam_epsilon, max_grad_norm=cfg.max_grad_norm,
        warmup_steps=cfg.warmup_steps, lr_scheduler_type=cfg.lr_schedule,
        max_steps=warmup + steps, save_strategy="no", eval_strategy="no", report_to=[],
        logging_steps=10_000, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        bf16=cfg.mixed_precision == "bf16", dataloader_num_workers=0, seed=cfg.seed)
    trainer = Trainer(model=make_model(), args=settings, train_dataset=dataset,
                      data_collator=counting, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # its dict of totals would break up the table
    trainer.train()
    (t0, n0), (t1, n1) = marks[warmup], marks[warmup + steps]
    return {"tokens_per_s": (n1 - n0) / (t1 - t0)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=["bert", "roberta", "gpt"],
                        choices=sorted(RECIPES))
    parser.add_argument("--size", nargs="+", default=["128x2", "256x4"], choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--corpus", default=None,
                        help="a text file (default: WikiText-2 valid + test, or the default corpus)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--same-activation", action="store_true",
                        help="GPT, ALBERT: the Trainer's model uses overture's activation "
                        "kernel too")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more recipe overrides for overture's side (train.compile=true)")
    args = parser.parse_args(argv)
    quiet()

    from overture.config import load_recipe
    from overture.registry import build_objective

    info = machine()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.family:
            for size in args.size:
                recipe = load_recipe(RECIPES[family], [
                    f"output_dir={tmp}/run", f"data.cache_dir={tmp}/cache",
                    *overrides(family, size, args), *args.set])
                objective = build_objective(recipe)
                objective.prepare(recipe.resolved_phases()[0], progress=False)
                make_model, dataset, collator = trainer_side(objective, recipe, family,
                                                             args.same_activation)
                runs = alternate({
                    "overture": lambda: engine_run(recipe, args.steps, args.warmup,
                                                   Path(tmp) / "run"),
                    "trainer": lambda: trainer_run(make_model, dataset, collator, recipe.train,
                                                   args.steps, args.warmup, Path(tmp) / "hf"),
                }, args.repeats)
                ours = spread([r["per_s"] for r in runs["overture"]])
                theirs = spread([r["tokens_per_s"] for r in runs["trainer"]])
                mfu = spread([r["mfu"] for r in runs["overture"]])
                tflops = spread([r["tflops"] for r in runs["overture"]])
                wait = spread([r["data_wait_fraction"] for r in runs["overture"]])
                results.append({"family": family, "size": size,
                                "vocab": len(objective.tokenizer), "overture": ours,
                                "trainer": theirs, "ratio": ours["median"] / theirs["median"],
                                "overture_mfu": mfu, "overture_tflops": tflops,
                                "overture_data_wait": wait})
                print(f"{family} {size}: overture {fmt(ours)}, Trainer {fmt(theirs)} tokens/s, "
                      f"{results[-1]['ratio']:.2f}x, MFU {mfu['median']:.1%}", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("family", "size")}
    rows = [[f"{r['family']} {r['size']}, V={r['vocab']:,}", fmt(r["overture"]), fmt(r["trainer"]),
             f"{r['ratio']:.2f}x", f"{r['overture_mfu']['median']:.1%}",
             f"{r['overture_data_wait']['median']:.1%}"] for r in results]
    print(f"\n{info['cpu']}, {info['threads']} threads, torch {info['torch']}, transformers "
          f"{info['transformers']}; peak {info['peak_tflops']:.3f} TFLOP/s "
          f"({info['peak_source']}); batch {args.batch} x {args.seq}, vocab {args.vocab}, "
          f"tokens/s median (min-max) of {args.repeats}")
    if results and recipe.train.mixed_precision != "no":  # both sides ran in it
        import torch

        from overture.peak import run_peak

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        peak, source = run_peak(recipe.train.peak_tflops, device, recipe.train.mixed_precision)
        info[f"{recipe.train.mixed_precision}_peak_tflops"] = peak
        against = source if peak is None else f"against {peak:.3f} TFLOP/s ({source.split(';')[0]})"
        print(f"both sides in {recipe.train.mixed_precision}; the MFU column: {against}")
    print(table(["family, size, vocabulary", "overture", "Trainer", "ratio", "overture MFU",
                 "overture data wait"], rows))
    print(f"recorded in {record('trainer_pretrain', settings, results, info)}")
    return results


if __name__ == "__main__":
    cli(main)
