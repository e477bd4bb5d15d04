"""The objective contract, checked for every registered family (overture/registry.py).

A new family gets these tests by adding its registry line and a ``<family>-tiny``
recipe: a few steps learn, one batch of 8 equals two accumulated batches of 4, a resumed
run equals the uninterrupted one, final/ reloads in a process without overture with the
same logits, and --dry-run reports its data statistics.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (EVAL_SETTINGS, GAN_FAMILIES, IMAGE_TINY, TRAINED_ENCODER, classify_inputs,
                     continued, eval_metrics, prepare, records, sgd_step, text_families, tiny,
                     tiny_name)
from overture.atomic import COMPLETE
from overture.checkpoint import latest_checkpoint
from overture.config import bundled_recipes, load_recipe
from overture.data.prepare import IndexedDataset
from overture.engine import train
from overture.registry import build_objective, list_families

FAMILIES = list_families()
TEXT = text_families()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, real_text) -> Path:
    """~12 kB of real text: a few dozen examples, so short runs cross epochs."""
    path = tmp_path_factory.mktemp("small") / "small.txt"
    path.write_text(real_text.read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    return path


def test_every_family_has_a_tiny_and_a_full_size_recipe():
    recipes = bundled_recipes()
    for family in FAMILIES:
        assert tiny_name(family) in recipes, family
        assert any(load_recipe(path, checkpoint=False).objective.name == family
                   for name, path in recipes.items() if "tiny" not in name), family


def test_the_engine_imports_no_family():
    script = ("import sys, overture.engine, overture.checkpoint, overture.cli; "
              "print([m for m in sys.modules if m.startswith('overture.pretrain')])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _batch_of_8(family, cache_dir, real_text, checkpoint=None, *overrides):
    """The family's recipe (continuing ``checkpoint`` when given), objective and one
    collated batch of 8 real examples."""
    recipe = (tiny(family, "unused", cache_dir, real_text, *overrides) if checkpoint is None
              else continued(family, checkpoint, "unused", cache_dir, real_text))
    data = prepare(recipe)
    batch = data.objective.collator(recipe.resolved_phases()[0])(
        IndexedDataset(data.train).__getitems__(list(range(8))))
    return recipe, data.objective, batch


def _halves(batch: dict) -> list[dict]:
    """The same rows, masks and padding, split in two."""
    return [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_batch_of_8_equals_two_accumulated_batches_of_4(family, cache_dir, real_text):
    from accelerate import Accelerator

    recipe, objective, big = _batch_of_8(family, cache_dir, real_text)
    if getattr(objective, "batch_coupled", False):  # declared: each micro-batch is its own set of negatives
        pytest.skip(f"{family}: an example's loss depends on its micro-batch "
                    "(contrastive); the two-process test checks its gradient instead")
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for m in objective.build_models().values()
                         for p in m.parameters()])
    straight = sgd_step(recipe, objective, [big], accelerator)
    accumulated = sgd_step(recipe, objective, _halves(big), accelerator)
    assert (straight - initial).abs().max() > 1e-3  # the step really moved the weights
    assert torch.allclose(straight, accumulated, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def two_processes(cache_dir, real_text, tmp_path_factory, trained) -> Path:
    """tests/ddp_step.py run once on two DDP processes (gloo, CPU) for every family: it
    takes one training step on half of a saved batch of 8 each, and evaluates the seed-0
    model on held-out examples. Returns the folder of its outputs."""
    from accelerate import Accelerator

    work = tmp_path_factory.mktemp("ddp")
    for family in FAMILIES:
        _, _, big = _batch_of_8(family, cache_dir, real_text)
        torch.save(big, work / f"{family}-batch.pt")
    for family in TEXT:  # continued pretraining: the weights of the trained tiny run
        _, _, big = _batch_of_8(family, cache_dir, real_text, trained(family))
        torch.save(big, work / f"{family}+init-batch.pt")
    for family in GAN_FAMILIES:  # with a trained text encoder
        _, _, big = _batch_of_8(family, cache_dir, real_text, None, *TRAINED_ENCODER)
        torch.save(big, work / f"{family}+text_encoder-batch.pt")
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--standalone", str(tests / "ddp_step.py"), str(cache_dir), str(real_text),
         str(work), *FAMILIES, *(f"{f}+init={trained(f)}" for f in TEXT),
         *(f"{f}+text_encoder" for f in GAN_FAMILIES)],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    Accelerator(cpu=True)  # this process's Accelerate state, for the comparisons
    return work


def test_two_processes_of_4_equal_one_batch_of_8(cache_dir, real_text, two_processes):
    """Data parallelism: two DDP processes (gloo, CPU), each with half the batch, take
    the step one process takes with all of it, for every family. The halves hold
    different numbers of targets, so normalising by a process's own count would fail."""
    from accelerate import Accelerator

    for family in FAMILIES:
        recipe, objective, big = _batch_of_8(family, cache_dir, real_text)
        expected = sgd_step(recipe, objective, [big], Accelerator(cpu=True))
        parallel = torch.load(two_processes / f"{family}-ddp.pt", weights_only=True)
        assert torch.allclose(expected, parallel, atol=1e-6, rtol=0), family


def test_a_continued_run_takes_the_same_step_on_two_processes(cache_dir, real_text,
                                                             two_processes, trained):
    """model.init_from for every text family: the checkpoint's weights (and any fresh
    head) are the same on both ranks, so DDP takes one process's step."""
    from accelerate import Accelerator

    for family in TEXT:
        recipe, objective, big = _batch_of_8(family, cache_dir, real_text, trained(family))
        expected = sgd_step(recipe, objective, [big], Accelerator(cpu=True))
        parallel = torch.load(two_processes / f"{family}+init-ddp.pt", weights_only=True)
        assert torch.allclose(expected, parallel, atol=1e-6, rtol=0), family


def test_a_gan_with_a_trained_text_encoder_takes_the_same_step_on_two_processes(
        cache_dir, real_text, two_processes):
    """The encoder (BERT's pooler unused under mean pooling, caption tables as buffers)
    and the discriminator step on one shared backward under DDP as on one process,
    DF-GAN's gradient penalty through the encoder included."""
    from accelerate import Accelerator

    for family in GAN_FAMILIES:
        recipe, objective, big = _batch_of_8(family, cache_dir, real_text, None,
                                             *TRAINED_ENCODER)
        expected = sgd_step(recipe, objective, [big], Accelerator(cpu=True))
        path = two_processes / f"{family}+text_encoder-ddp.pt"
        parallel = torch.load(path, weights_only=True)
        atol = 1e-5 if family == "dfgan" else 1e-6  # see test_gan.py: the penalty's rounding
        assert torch.allclose(expected, parallel, atol=atol, rtol=0), family


def test_evaluation_counts_each_example_once_whatever_the_process_count(
        cache_dir, real_text, two_processes):
    """Seven held-out batches of 4 on two processes: the second process's last batch is
    Accelerate's padding (copies of the first examples). The metrics must equal one
    process's over the same 28 examples."""
    from accelerate import Accelerator

    for family in FAMILIES:
        recipe = tiny(family, "unused", cache_dir, real_text, *EVAL_SETTINGS)
        one = eval_metrics(recipe, Accelerator(cpu=True))
        two = json.loads((two_processes / f"{family}-eval.json").read_text())
        assert two["examples"] == one["examples"] == 28, family
        assert one.keys() == two.keys(), family
        for key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (family, key)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_resumed_run_reproduces_the_uninterrupted_one(family, tmp_path, small_corpus):
    run = tmp_path / "run"
    base = ("train.log_every=1", "train.eval_every=0", "train.batch_size=4",
            "train.keep_last=5", "data.max_seq_len=32")

    def recipe(*extra):
        return tiny(family, run, tmp_path / "cache", small_corpus, *base, *extra)

    # the checkpoint it resumes from lies inside the second epoch
    per_epoch = len(prepare(recipe()).train) // 4
    assert per_epoch >= 2, "corpus too small for this test"
    resume_at, total = per_epoch + 1, per_epoch + 4
    overrides = (f"train.max_steps={total}", f"train.save_every={resume_at}")
    train(recipe(*overrides), progress=False)
    straight = records(run)
    assert sorted(straight) == list(range(1, total + 1))
    # a few steps learn (a classifier's batches of 4 are too noisy for this, and so are
    # augmented images: fine-tuning and the image families are checked on held-out data
    # in test_finetune.py and test_images.py instead)
    if family != "classify" and family not in IMAGE_TINY:
        assert straight[total]["loss"] < straight[1]["loss"]

    # Simulate a crash after step `resume_at`: the later checkpoint, final/ and the log
    # are lost, and a half-written checkpoint without its marker is left behind.
    checkpoints = run / "checkpoints"
    shutil.rmtree(checkpoints / f"step-{total:06d}")
    shutil.rmtree(run / "final")
    half = checkpoints / f"step-{total - 1:06d}"
    shutil.copytree(checkpoints / f"step-{resume_at:06d}", half)
    (half / COMPLETE).unlink()
    assert latest_checkpoint(run).name == f"step-{resume_at:06d}"
    state = json.loads((checkpoints / f"step-{resume_at:06d}" / "train_state.json").read_text())
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 1
    (run / "metrics.jsonl").write_text("")

    train(recipe(*overrides, "train.resume=auto"), progress=False)
    resumed = records(run)
    assert sorted(resumed) == list(range(resume_at + 1, total + 1))  # continued, not restarted
    losses = [k for k in straight[total] if k == "loss" or k.endswith("_loss")]
    seen = f"{build_objective(recipe()).unit}_seen"
    for step in resumed:
        for key in [*losses, seen]:
            assert resumed[step][key] == pytest.approx(straight[step][key], abs=1e-5), (step, key)
    assert (run / "final" / "config.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_final_reloads_without_overture_and_gives_the_same_logits(family, trained, tmp_path):
    from safetensors.torch import load_file

    run = trained(family)
    final = run / "final"
    recipe = load_recipe(final / "recipe.yaml")
    objective = build_objective(recipe)
    if objective.unit == "images":
        return _image_final_reloads(objective, recipe, run, tmp_path)
    auto_class = objective.auto_class  # AutoModelForPreTraining, ...ForSequenceClassification
    text, pair = "The cat sat on the mat. It was warm.", "Then it left."
    # A Python that never imports overture loads final/ with plain Auto classes.
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoConfig, AutoTokenizer, {auto_class}
        tok = AutoTokenizer.from_pretrained({str(final)!r})
        model = {auto_class}.from_pretrained({str(final)!r}).eval()
        enc = tok({text!r}, return_tensors="pt")
        # the Hub user's long input: cut at model_max_length, which the model accepts
        long = tok("word " * 5000, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = model(**enc)
            model(**long)
        assert not any(m.startswith("overture") for m in sys.modules)
        json.dump({{"ids": enc["input_ids"].tolist(), "type": type(model).__name__,
                   "architecture": AutoConfig.from_pretrained({str(final)!r}).architectures[0],
                   "max_length": tok.model_max_length, "long": long["input_ids"].shape[1],
                   "pair": tok({text!r}, {pair!r})["input_ids"],
                   "logits": out[0].tolist()}}, sys.stdout)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout)
    assert loaded["type"] == loaded["architecture"]

    # The trained weights as the training state saved them (not through final/), in the
    # family's own training module.
    objective.prepare(recipe.resolved_phases()[0], progress=False)
    model = objective.build_models()["model"]
    state = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    model.model.tie_weights()
    model.eval()
    tok = objective.tokenizer
    enc = tok(text, return_tensors="pt")
    assert enc["input_ids"].tolist() == loaded["ids"]  # the tokenizer round-trips
    if hasattr(objective, "tokenizer_spec"):  # a family that trains its vocabulary
        # the pair layout the family trains on, spelled out from its template
        a, b = (tok(t, add_special_tokens=False)["input_ids"] for t in (text, pair))
        template = (objective.tokenizer_spec.pair or "$A $B").split()
        pieces = {"$A": a, "$B": b}
        expected = [i for item in template for i in pieces.get(
            item.split(":")[0], [tok.convert_tokens_to_ids(item.split(":")[0])])]
        assert loaded["pair"] == expected
        assert objective.max_length() == recipe.model.position_limit()[1]
    else:
        assert loaded["pair"] == tok(text, pair)["input_ids"]
    # the exported limit is the model's position limit: long inputs are cut to it
    assert loaded["long"] == loaded["max_length"] == objective.max_length()
    with torch.no_grad():
        out = model.model(**enc)
    assert torch.allclose(out[0], torch.tensor(loaded["logits"]), atol=1e-5)


def _image_final_reloads(objective, recipe, run, tmp_path):
    """An image final/ loads in plain timm (``local-dir:``) or torchvision, in a Python
    without overture, and gives the logits (or pooled features) of the trained model."""
    from safetensors.torch import load_file

    final = run / "final"
    if recipe.objective.name in GAN_FAMILIES:
        return _gan_final_reloads(objective, recipe, run, tmp_path)
    torch.manual_seed(0)
    size = recipe.data.image_size
    images = torch.randn(3, 3, size, size)
    torch.save(images, tmp_path / "images.pt")
    config = json.loads((final / "config.json").read_text())
    if config.get("library") == "torchvision":
        build = textwrap.dedent(f"""
            import torchvision
            from safetensors.torch import load_file
            model = torchvision.models.get_model(config["architecture"],
                num_classes=max(config["num_classes"], 1), **config["model_args"])
            if config["head"] == "identity":  # a backbone: its classifier is an Identity
                parent, _, attr = config["head_module"].rpartition(".")
                setattr(model.get_submodule(parent), attr, torch.nn.Identity())
            model.load_state_dict(load_file({str(final / "model.safetensors")!r}))
        """)
    else:
        build = f"import timm\nmodel = timm.create_model('local-dir:{final}', pretrained=True)\n"
    script = (f"import json, sys, torch\nconfig = json.load(open({str(final / 'config.json')!r}))\n"
              + build + textwrap.dedent(f"""
        model.eval()
        with torch.no_grad():
            out = model(torch.load({str(tmp_path / "images.pt")!r}, weights_only=True))
        assert not any(m.startswith("overture") for m in sys.modules)
        json.dump({{"out": out.tolist(), "labels": config.get("label_names")}}, sys.stdout)
    """))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout)
    # the trained weights as the training state saved them, in the family's own module
    objective.prepare(recipe.resolved_phases()[0], progress=False)
    model = objective.build_models()["model"]
    model.load_state_dict(load_file(str(latest_checkpoint(run) / "model.safetensors")))
    model.eval()
    with torch.no_grad():
        expected = model(images) if objective.heads == ("cls",) else model.backbone(images)
    assert torch.allclose(expected, torch.tensor(loaded["out"]), atol=1e-5)
    if objective.heads == ("cls",):
        assert loaded["labels"] == [str(i) for i in range(10)]  # the digits' class names
        assert expected.shape == (3, 10)


def _gan_final_reloads(objective, recipe, run, tmp_path):
    """A text-to-image final/ holds the generator's EMA of the last checkpoint, and
    ``overture generate`` on it (its own copy of the text encoder) draws exactly the
    images that EMA draws from the recipe's text encoder."""
    from safetensors.torch import load_file

    from overture.cli import main
    from overture.pretrain.gan.family import (GENERATOR_FILE, _sample, _write_grid,
                                              build_generator)
    from overture.pretrain.gan.text import load_encoder

    final = run / "final"
    ema = torch.load(latest_checkpoint(run) / "custom_checkpoint_0.pkl", weights_only=True)
    exported = load_file(str(final / GENERATOR_FILE))
    assert exported.keys() == {k.removeprefix("module.") for k in ema}
    for key, value in exported.items():
        assert torch.equal(value, ema[f"module.{key}"]), key
    objective.prepare(recipe.resolved_phases()[0], progress=False)
    generator = build_generator(objective.name, objective.generator_args())
    generator.load_state_dict({k.removeprefix("module."): v for k, v in ema.items()})
    obj = recipe.objective
    prompt = "a small handwritten seven with a thick stroke, upright"
    h = objective.standardize(load_encoder(obj.text_encoder).encode([prompt],
                                                                    pooling=obj.text_pooling))
    _write_grid(_sample(generator, torch.from_numpy(h), 5, recipe.model.noise_dim, 3),
                tmp_path / "expected.png", 3, padding=0)
    assert main(["generate", "--checkpoint", str(run), "--prompt", prompt, "--n", "5",
                 "--seed", "3", "--output", str(tmp_path / "made.png")]) == 0
    from PIL import Image

    made = np.asarray(Image.open(tmp_path / "made.png"))
    assert np.array_equal(made, np.asarray(Image.open(tmp_path / "expected.png")))


@pytest.mark.parametrize("family", FAMILIES)
def test_dry_run_reports_parameters_and_data_statistics(family, cache_dir, real_text,
                                                        tmp_path, capsys):
    from overture.cli import main
    from overture.pretrain.text.mlm import MaskedLMFamily
    from overture.registry import get_family

    data = [f"data.corpus=[{real_text}]", "tokenizer.vocab_size=1024",
            "tokenizer.min_frequency=1"]
    if family == "classify":
        checkpoint, glue = classify_inputs(cache_dir, real_text)
        data += [f"objective.checkpoint={checkpoint}", f"objective.data_dir={glue}"]
    if family in IMAGE_TINY:
        data = ["data.image_size=16"]
    if family in GAN_FAMILIES:
        data += [f"objective.text_encoder={classify_inputs(cache_dir, real_text)[0]}",
                 "objective.judge=null", "train.best_metric=null"]
    assert main(["pretrain", tiny_name(family), "--dry-run", f"data.cache_dir={cache_dir}",
                 "data.num_proc=1", f"output_dir={tmp_path / 'run'}", *data]) == 0
    out = capsys.readouterr().out
    assert f"name: {family}" in out and "parameters: " in out
    stats = {}
    for line in out.split("# data statistics", 1)[1].splitlines():
        if line.startswith("  ") and ": " in line:
            key, value = line.strip().split(": ", 1)
            stats[key] = float(value.replace(",", ""))
    assert stats["train_examples"] > 0 and stats["eval_examples"] > 0
    assert all(math.isfinite(v) for v in stats.values())
    if issubclass(get_family(family), MaskedLMFamily):  # the realised 15%, 80/10/10
        assert stats["mask_rate"] == pytest.approx(0.15, abs=0.01)
        assert stats["mask_split_mask"] == pytest.approx(0.8, abs=0.03)
        assert stats["mask_split_random"] == pytest.approx(0.1, abs=0.03)
    for task in ("nsp", "sop"):
        if f"{task}_label_1" in stats:
            assert stats[f"{task}_label_1"] == pytest.approx(0.5, abs=0.03)
    if family == "gpt":
        assert 0 <= stats["dropped_fraction"] < 0.1
    if family in GAN_FAMILIES:  # four training phrasings; the tiny BERT's width
        assert stats["captions_per_image"] == 4 and stats["text_dim"] == 128
        assert stats["captions"] > 10 * 4  # label x measured attributes x phrasings
        for name in ("thickness", "slant", "size"):  # tertiles / median of 1,437 images
            assert stats[f"{name}_largest_class_fraction"] == pytest.approx(
                1 / 2 if name == "size" else 1 / 3, abs=0.01)
    if family in IMAGE_TINY:  # the bundled digits: 10 classes, 20% held out
        assert stats["classes"] == 10 and stats["unreadable_skipped"] == 0
        assert stats["train_examples"] + stats["eval_examples"] == 1797
        assert stats["eval_examples"] == pytest.approx(0.2 * 1797, abs=1)
    if family == "classify":  # the fixture's labels: "the" in the sentence or not
        assert stats["label_0"] + stats["label_1"] == pytest.approx(1.0)
        assert 0.3 < stats["label_1"] < 0.9 and 0 <= stats["truncated_fraction"] < 0.5
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
