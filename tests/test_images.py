"""The image families ("image", "simclr") and their tools: the tiny recipes through the
CLI, learning on held-out digits, image sources and unreadable files, seeded transforms,
NT-Xent, the linear probe, `overture probe / features / finetune` on image checkpoints,
the transfer hooks (frozen backbone, EMA) and torchvision models.

What every family shares (resume, final/ in plain timm, two processes, faults) is in
test_contract.py and test_faults.py. Everything here is offline, on the bundled digits or
a few generated images at 16x16 (32x32 for torchvision); torch runs on one thread in
this module (tiny convolutions are slower on two, and much slower on a busy machine).
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import prepare, records, tiny
from overture.cli import main
from overture.config import ConfigError, load_recipe
from overture.pretrain.image.data import ImageDataConfig, decode_row, prepare_images

LEARN_STEPS = 120


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def offline():
    """The conftest's per-test environment, for module fixtures (set up before it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("OVERTURE_CACHE", raising=False)
        yield


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, cache_dir, offline) -> Path:
    """resnet-tiny-digits through `overture pretrain` at 16x16 on every training digit,
    LEARN_STEPS steps (a few seconds), evaluated on the 20% held out at the end. A higher
    lr than the recipe's, which is set for 600 steps of 64."""
    run = tmp_path_factory.mktemp("digits") / "run"
    assert main(["pretrain", "resnet-tiny-digits", f"output_dir={run}",
                 f"data.cache_dir={cache_dir}", "data.num_proc=1", "data.image_size=16",
                 f"train.max_steps={LEARN_STEPS}", "train.batch_size=32", "train.lr=1e-2",
                 "train.warmup_steps=10", "train.eval_every=0", "train.save_every=0",
                 "train.log_every=20"]) == 0
    return run


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _pattern(label: int, index: int, size: int = 16) -> np.ndarray:
    """An RGB image whose dominant channel is its class (learnable), with noise."""
    rng = np.random.default_rng(1000 * label + index)
    pixels = rng.integers(0, 90, (size, size, 3))
    pixels[..., label % 3] += 160
    return pixels.astype(np.uint8)


def _image_folder(root: Path, classes: list[str], per_class: int) -> Path:
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(_png(_pattern(label, i)))
    return root


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- recipes


def test_resnet_tiny_digits_trains_through_the_cli_and_beats_chance_on_held_out_digits(
        digits_run):
    final = digits_run / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["num_classes"] == 10 and config["label_names"] == [str(i) for i in range(10)]
    assert load_file(str(final / "model.safetensors"))["fc.weight"].shape == (10, 128)
    train, held_out = records(digits_run), records(digits_run, "eval")
    assert sorted(held_out) == [LEARN_STEPS]  # the evaluation after the last step
    assert train[LEARN_STEPS]["loss"] < train[20]["loss"]
    assert held_out[LEARN_STEPS]["top1"] > 0.6  # chance: 0.1 (about 0.9 when measured)


def test_simclr_tiny_digits_trains_through_the_cli_and_exports_the_backbone_alone(
        tmp_path, cache_dir):
    run = tmp_path / "run"
    assert main(["pretrain", "simclr-tiny-digits", f"output_dir={run}",
                 f"data.cache_dir={cache_dir}", "data.num_proc=1", "data.image_size=16",
                 "data.max_train_examples=64", "train.max_steps=4", "train.batch_size=16",
                 "train.warmup_steps=2", "train.eval_batches=2", "train.log_every=2",
                 "train.save_every=0", "train.eval_every=0"]) == 0
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["num_classes"] == 0 and config["architecture"] == "resnet18"
    weights = load_file(str(run / "final" / "model.safetensors"))
    assert "conv1.weight" in weights
    assert not [k for k in weights if k.startswith(("fc.", "projection", "backbone."))]
    train, held_out = records(run), records(run, "eval")
    assert sorted(train) == [2, 4] and math.isfinite(train[4]["contrastive_loss"])
    assert 0 <= held_out[4]["contrastive_accuracy"] <= 1


# --------------------------------------------------------------------------- sources


def test_unreadable_images_are_skipped_counted_and_named(tmp_path, cache_dir, caplog):
    root = _image_folder(tmp_path / "pets", ["cat", "dog"], 4)
    good = _png(_pattern(0, 99, size=32))
    (root / "cat" / "truncated.png").write_bytes(good[:len(good) // 2])
    (root / "dog" / "notes.jpg").write_text("not an image\n")
    cfg = ImageDataConfig(source=[str(root)], cache_dir=str(cache_dir), num_proc=1,
                          eval_fraction=0.25)
    with caplog.at_level(logging.WARNING, logger="overture.pretrain.image.data"):
        data = prepare_images(cfg, labelled=True, progress=False)
    # counted in the split each fell in (the held-out split is drawn before the check)
    assert (data.stats.get("train_unreadable_skipped", 0)
            + data.stats.get("eval_unreadable_skipped", 0)) == 2
    assert data.stats["train_examples"] + data.stats["eval_examples"] == 8
    assert data.stats["classes"] == 2
    skipped = sorted(r.getMessage() for r in caplog.records if "skipping" in r.getMessage())
    assert len(skipped) == 2
    assert str(root / "cat" / "truncated.png") in skipped[0]
    assert str(root / "dog" / "notes.jpg") in skipped[1]
    kept = [*data.train["path"], *data.eval["path"]]
    assert not [p for p in kept if p.endswith(("truncated.png", "notes.jpg"))]

    cfg.strict = True
    with pytest.raises(ConfigError) as err:
        prepare_images(cfg, labelled=True, progress=False)
    assert ("truncated.png" in str(err.value) or "notes.jpg" in str(err.value))
    assert "\n" not in str(err.value)


def test_strict_unreadable_image_exits_2_with_one_line_naming_the_file(tmp_path, cache_dir,
                                                                     capsys):
    root = _image_folder(tmp_path / "pets", ["cat", "dog"], 2)
    (root / "dog" / "notes.jpg").write_text("not an image\n")
    capsys.readouterr()
    assert main(["pretrain", "resnet-tiny-digits", f"data.source=[{root}]", "data.strict=true",
                 f"data.cache_dir={cache_dir}", "data.num_proc=1", "data.image_size=16",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    line = _one_line_error(capsys)
    assert str(root / "dog" / "notes.jpg") in line and "data.strict" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_image_folder_labels_are_its_sorted_class_subfolders(tmp_path, cache_dir):
    root = _image_folder(tmp_path / "zoo", ["zebra", "ant", "moth"], 3)
    (root / "moth" / "night").mkdir()
    (root / "moth" / "night" / "deep.png").write_bytes(_png(_pattern(2, 50)))  # nested: kept
    cfg = ImageDataConfig(source=[str(root)], cache_dir=str(cache_dir), num_proc=1,
                          eval_fraction=0.2)
    data = prepare_images(cfg, labelled=True, progress=False)
    assert data.stats["class_names"] == ["ant", "moth", "zebra"]
    rows = list(zip([*data.train["path"], *data.eval["path"]],
                    [*data.train["label"], *data.eval["label"]]))
    assert len(rows) == 10
    for path, label in rows:
        assert Path(path).relative_to(root).parts[0] == ["ant", "moth", "zebra"][label]


def test_parquet_source_keeps_labels_and_pixels_stored_decoded_or_encoded(tmp_path, cache_dir,
                                                                         monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    rng = np.random.default_rng(0)
    originals = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(7)]
    originals.append(rng.integers(0, 256, (6, 4), dtype=np.uint8))  # greyscale: made RGB
    labels = [i % 3 for i in range(len(originals))]
    table = pa.table({"image": [{"bytes": _png(p), "path": f"img{i}.png"}
                                for i, p in enumerate(originals)], "label": labels})
    pq.write_table(table, tmp_path / "train.parquet")
    expected = [np.asarray(Image.fromarray(p).convert("RGB")) for p in originals]

    for cache_mb, decoded in ((2048.0, 1), (1e-6, 0)):  # the set fits in cache_mb, or not
        cfg = ImageDataConfig(source=[str(tmp_path / "train.parquet")], cache_dir=str(cache_dir),
                              num_proc=1, eval_fraction=0.25, cache_mb=cache_mb)
        data = prepare_images(cfg, labelled=True, progress=False)
        assert data.stats["decoded"] == decoded and data.stats["classes"] == 3
        assert (len(data.train), len(data.eval)) == (6, 2)
        for split in (data.train, data.eval):
            for row in split:
                assert (row["height"] > 0) == bool(decoded)
                assert row["label"] == labels[row["row"]]
                image = decode_row(row["image"], row["path"], row["height"], row["width"])
                assert np.array_equal(np.asarray(image), expected[row["row"]])


def test_unlabelled_folder_is_refused_by_the_supervised_family_only(tmp_path, cache_dir,
                                                                  capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        (flat / f"{i}.png").write_bytes(_png(_pattern(i, i)))
    cfg = ImageDataConfig(source=[str(flat)], cache_dir=str(cache_dir), num_proc=1)
    assert prepare_images(cfg, labelled=False, progress=False).stats["unlabelled"] > 0
    assert main(["pretrain", "resnet-tiny-digits", f"data.source=[{flat}]",
                 f"data.cache_dir={cache_dir}", "data.num_proc=1", "data.image_size=16",
                 "train.batch_size=2", f"output_dir={tmp_path / 'run'}"]) == 2
    line = _one_line_error(capsys)
    assert "have no label" in line and "class subfolders" in line


def test_missing_cifar_folder_is_a_one_line_error(tmp_path, cache_dir, capsys):
    cfg = ImageDataConfig(source=["cifar10:/nonexistent"], cache_dir=str(cache_dir))
    with pytest.raises(ConfigError, match="cifar10:/nonexistent") as err:
        prepare_images(cfg, labelled=True, progress=False)
    assert "\n" not in str(err.value) and "download=True" in str(err.value)


# --------------------------------------------------------------------------- transforms


def _rows(data, indices):
    return {"columns": data.train[list(indices)], "indices": list(indices)}


@pytest.fixture(scope="module")
def tiny_digits(cache_dir, offline):
    """The tiny image recipe's prepared digits (64 training images at 16x16)."""
    return prepare(tiny("image", "unused", cache_dir, "unused"))


def _global_rng():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def _same_rng(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_an_augmented_image_depends_on_seed_epoch_and_index_only(tiny_digits):
    recipe = tiny_digits.objective.recipe
    collator = tiny_digits.objective.collator(recipe.resolved_phases()[0])
    collator.set_epoch(3)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = _global_rng()
    first = collator(_rows(tiny_digits, range(8)))["images"]
    assert _same_rng(before, _global_rng())  # the transforms leave the global RNGs alone
    random.seed(2), np.random.seed(2), torch.manual_seed(2)  # another global state
    other = collator(_rows(tiny_digits, [5, 40, 2, 0]))["images"]  # other batch, other order
    for position, index in enumerate([5, 40, 2, 0]):
        if index < 8:
            assert torch.equal(other[position], first[index]), index
    collator.set_epoch(4)
    later = collator(_rows(tiny_digits, range(8)))["images"]
    for index in range(8):  # every image augmented anew
        assert not torch.equal(later[index], first[index]), index


def test_mixup_is_the_same_for_the_same_batch_and_leaves_the_global_rng(cache_dir, offline):
    data = prepare(tiny("image", "unused", cache_dir, "unused", "objective.mixup_alpha=0.8",
                        "objective.cutmix_alpha=1.0"))
    collator = data.objective.collator(data.objective.recipe.resolved_phases()[0])
    collator.set_epoch(1)
    rows = _rows(data, range(8))
    before = _global_rng()
    a = collator(rows)
    assert _same_rng(before, _global_rng())
    np.random.seed(7), random.seed(7)
    b = collator(rows)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["targets"], b["targets"])
    assert a["targets"].shape == (8, 10)
    assert torch.allclose(a["targets"].sum(-1), torch.ones(8))
    assert (a["targets"] > 0.2).sum() > 8  # mixed: some images hold two classes


def test_simclr_views_differ_and_held_out_views_are_fixed(cache_dir, offline):
    data = prepare(tiny("simclr", "unused", cache_dir, "unused"))
    collator = data.objective.collator(data.objective.recipe.resolved_phases()[0])
    rows = _rows(data, range(4))
    collator.set_epoch(0)
    batch = collator(rows)
    for i in range(4):
        assert not torch.equal(batch["view_a"][i], batch["view_b"][i])
    collator.set_epoch(-1)
    a, b = collator(rows), collator(rows)
    assert torch.equal(a["view_a"], b["view_a"]) and torch.equal(a["view_b"], b["view_b"])


# --------------------------------------------------------------------------- NT-Xent


def test_nt_xent_matches_the_formula_by_hand():
    from overture.pretrain.image.simclr import _columns, nt_xent_sums

    # rows: image 0 view a, image 1 view a, image 0 view b, image 1 view b (unit vectors)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    tau = 0.5
    # cosines: z0.z1 = 0, z0.z2 = .8, z0.z3 = .6, z1.z2 = .6, z1.z3 = .8, z2.z3 = .96
    # anchor i, partner p: -cos(i, p) / tau + log sum_{j != i} exp(cos(i, j) / tau)
    e = math.exp
    first_views = -0.8 / tau + math.log(e(0 / tau) + e(0.8 / tau) + e(0.6 / tau))
    second_views = -0.8 / tau + math.log(e(0.8 / tau) + e(0.6 / tau) + e(0.96 / tau))
    loss, correct = nt_xent_sums(z, z, 0, tau)
    assert loss.item() == pytest.approx(2 * first_views + 2 * second_views, rel=1e-6)
    # the first views find their partner; the second views find each other (0.96)
    assert correct.item() == 2

    self_cols, partner = _columns(torch.arange(4), 4, 0, 4)
    assert self_cols.tolist() == [0, 1, 2, 3] and partner.tolist() == [2, 3, 0, 1]
    # the second of two processes (offset 4) in the gathered [all a; all b] layout
    self_cols, partner = _columns(torch.arange(4), 4, 4, 8)
    assert self_cols.tolist() == [2, 3, 6, 7] and partner.tolist() == [6, 7, 2, 3]


def test_nt_xent_over_gathered_processes_equals_one_process_over_the_whole_batch():
    from overture.pretrain.image.simclr import _arrange, nt_xent_sums

    torch.manual_seed(0)
    world, n, tau = 3, 2, 0.3
    views_a = [torch.nn.functional.normalize(torch.randn(n, 5), dim=-1) for _ in range(world)]
    views_b = [torch.nn.functional.normalize(torch.randn(n, 5), dim=-1) for _ in range(world)]
    local = [torch.cat([a, b]) for a, b in zip(views_a, views_b)]  # each process: [a; b]
    gathered = torch.cat(local)  # all_gather: process order
    loss = correct = 0.0
    for rank in range(world):
        z_all = _arrange(local[rank], gathered, world)
        part_loss, part_correct = nt_xent_sums(local[rank], z_all, rank * 2 * n, tau)
        loss, correct = loss + part_loss, correct + part_correct
    whole = torch.cat([*views_a, *views_b])  # one process, all 3n images
    expected_loss, expected_correct = nt_xent_sums(whole, whole, 0, tau)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert correct.item() == expected_correct.item()


# --------------------------------------------------------------------------- probe


@pytest.mark.parametrize("method", ["logreg", "linear"])
def test_probe_separates_separable_features(method):
    from overture.pretrain.image.probe import fit_probe

    rng = np.random.default_rng(0)
    centres = 4.0 * np.eye(4, 8)

    def blobs(per_class):
        y = np.repeat(np.arange(4), per_class)
        x = centres[y] + rng.normal(0, 0.5, (len(y), 8))
        x[:, -1] = 0.0  # a dead feature (a ReLU unit never on): constant
        return x.astype(np.float32), y

    (train_x, train_y), (eval_x, eval_y) = blobs(20), blobs(10)
    result = fit_probe(train_x, train_y, eval_x, eval_y, method=method)
    assert result["top1"] == 1.0 and result["train_top1"] == 1.0
    assert (result["train_images"], result["eval_images"], result["features"]) == (80, 40, 8)
    with pytest.raises(ConfigError, match="two classes"):
        fit_probe(train_x, np.zeros_like(train_y), eval_x, eval_y, method=method)


def test_probe_command_trained_features_beat_random_ones(digits_run, cache_dir, capsys):
    results = {}
    for init in ([], ["--random-init"]):
        assert main(["probe", "--checkpoint", str(digits_run), "--data", "digits",
                     "--cache-dir", str(cache_dir), "--method", "linear", *init]) == 0
        result = json.loads(capsys.readouterr().out)
        results[result["init"]] = result
    # the recipe's split: the held-out 20% of the digits, which training never saw
    assert results["trained"]["eval_images"] == 359
    assert results["trained"]["top1"] > 0.8  # about 0.95 when measured
    assert results["random"]["top1"] < results["trained"]["top1"] - 0.2  # about 0.5


# --------------------------------------------------------------------------- features


def test_features_command_embeds_a_folder_of_images(digits_run, tmp_path, capsys):
    import pyarrow.parquet as pq

    from overture.pretrain.image.features import ImageEncoder, list_images

    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    for i in range(5):
        (folder / ("more" if i > 2 else "") / f"{i}.png").write_bytes(_png(_pattern(i, i)))
    (folder / "readme.txt").write_text("not listed")
    files = list_images(folder)
    assert len(files) == 5
    expected = ImageEncoder(digits_run, device="cpu").encode(files)
    args = ["features", "--checkpoint", str(digits_run), "--input", str(folder)]
    assert main([*args, "--output", str(tmp_path / "f.npy")]) == 0
    got = np.load(tmp_path / "f.npy")
    assert got.shape == (5, 128) and np.allclose(got, expected, atol=1e-5)
    assert main([*args, "--output", str(tmp_path / "f.parquet")]) == 0
    assert pq.read_table(tmp_path / "f.parquet")["id"].to_pylist() == files
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "g.npy"), "--pooling", "cls"]) == 2
    assert "--pooling" in _one_line_error(capsys)
    assert not (tmp_path / "g.npy").exists()
    # a .txt list of images (relative to the list's folder), in its order
    listing = folder / "list.txt"
    listing.write_text("more/4.png\n0.png\n")
    assert main(["features", "--checkpoint", str(digits_run), "--input", str(listing),
                 "--output", str(tmp_path / "l.npy")]) == 0
    assert np.allclose(np.load(tmp_path / "l.npy"), expected[[4, 0]], atol=1e-5)
    # the same list saved as UTF-16 (a Windows editor) is refused as a text command's input
    listing.write_text("more/4.png\n0.png\n", encoding="utf-16")
    capsys.readouterr()
    assert main(["features", "--checkpoint", str(digits_run), "--input", str(listing),
                 "--output", str(tmp_path / "u.npy")]) == 2
    assert "--input" in _one_line_error(capsys) and not (tmp_path / "u.npy").exists()


# --------------------------------------------------------------------------- transfer


def _finetune_pets(checkpoint: Path, tmp_path: Path, cache_dir: Path, *extra: str) -> Path:
    """`overture finetune --images` on 3 classes of 10 generated images, batches of 4;
    the run folder."""
    folder = _image_folder(tmp_path / "pets", ["cat", "dog", "eel"], 10)
    run = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(checkpoint), "--images", str(folder),
                 f"output_dir={run}", f"data.cache_dir={cache_dir}", "data.num_proc=1",
                 "train.batch_size=4", "train.interval_unit=steps", *extra]) == 0
    return run


def test_finetune_images_trains_a_new_classifier_with_the_backbone_frozen_first(
        digits_run, tmp_path, cache_dir, capsys):
    from overture.pretrain.image.models import load

    # 30 images: 6 held out, 24 for training: 6 steps of 4 per epoch, the first frozen
    run = _finetune_pets(digits_run, tmp_path, cache_dir, "train.epochs=2",
                         "objective.freeze_backbone_epochs=1", "train.eval_every=0",
                         "train.save_every=1", "train.keep_last=20", "train.log_every=6")
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((run / "metrics.json").read_text())
    assert printed == metrics and metrics["step"] == 12 and 0 <= metrics["top1"] <= 1
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["num_classes"] == 3 and config["label_names"] == ["cat", "dog", "eel"]
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16]  # the checkpoint's size

    source = load_file(str(digits_run / "final" / "model.safetensors"))
    model, _ = load(run / "final")
    backbone = [n for n, _ in model.named_parameters() if not n.startswith("fc.")]
    assert len(backbone) > 10 and load_file(str(run / "final" / "model.safetensors"))[
        "fc.weight"].shape == (3, 128)
    steps = {s: load_file(str(run / "checkpoints" / f"step-{s:06d}" / "model.safetensors"))
             for s in (1, 6, 7, 12)}
    for s in (1, 6):  # the first epoch: the digits backbone, untouched
        assert all(torch.equal(steps[s][n], source[n]) for n in backbone), s
    # ... its weights; its BatchNorm statistics adapt (the layers are in training mode)
    assert not torch.equal(steps[6]["bn1.running_mean"], source["bn1.running_mean"])
    assert not torch.equal(steps[1]["fc.weight"], steps[6]["fc.weight"])  # the head learns
    for s in (7, 12):  # then everything trains
        assert not all(torch.equal(steps[s][n], source[n]) for n in backbone), s


def test_transfer_gets_a_new_classifier_even_for_as_many_classes(digits_run, cache_dir,
                                                                 offline):
    data = prepare(tiny("image", "unused", cache_dir, "unused", "model.args={}",
                        f"model.init_from={digits_run}"))  # a run folder: its final/
    model = data.objective.build_models()["model"]
    source = load_file(str(digits_run / "final" / "model.safetensors"))
    assert torch.equal(model.conv1.weight, source["conv1.weight"])  # the backbone: loaded
    assert model.fc.weight.shape == source["fc.weight"].shape == (10, 128)
    assert not torch.equal(model.fc.weight, source["fc.weight"])  # the head: new


def test_ema_weights_are_averaged_after_each_step_exported_and_resumed(tmp_path, cache_dir,
                                                                       offline):
    import shutil

    from overture.engine import train

    run = tmp_path / "run"
    decay = 0.5

    def recipe(output_dir):
        return tiny("image", output_dir, cache_dir, "unused", "objective.ema_decay=0.5",
                    "train.max_steps=3", "train.save_every=1", "train.keep_last=5",
                    "train.eval_every=0", "train.log_every=1")

    train(recipe(run), progress=False)
    saved = {}
    for step in (2, 3):
        folder = run / "checkpoints" / f"step-{step:06d}"
        raw = load_file(str(folder / "model.safetensors"))
        ema = torch.load(folder / "custom_checkpoint_0.pkl", weights_only=True)
        saved[step] = raw, {k.removeprefix("module."): v for k, v in ema.items()}
    (_, ema2), (raw3, ema3) = saved[2], saved[3]
    floats = [k for k, v in raw3.items() if v.is_floating_point()]
    for key in floats:  # ema_3 = d ema_2 + (1 - d) w_3, after the optimizer step
        assert torch.allclose(ema3[key], decay * ema2[key] + (1 - decay) * raw3[key],
                              atol=1e-6), key
    final = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(final[k], ema3[k]) for k in raw3)
    assert not all(torch.equal(final[k], raw3[k]) for k in floats)

    # a run resumed at step 2 continues the saved average, not a new one from its weights
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints" / "step-000002",
                    resumed / "checkpoints" / "step-000002")
    train(recipe(resumed), progress=False)
    again = load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.allclose(again[k], final[k], atol=1e-6) for k in floats)


def test_torchvision_model_trains_and_its_final_loads_in_plain_torchvision(tmp_path,
                                                                          cache_dir, offline):
    import torchvision

    from PIL import Image

    from overture.checkpoint import latest_checkpoint
    from overture.engine import train
    from overture.pretrain.image.features import ImageEncoder

    run = tmp_path / "run"
    recipe = tiny("image", run, cache_dir, "unused", "model.name=torchvision:mobilenet_v3_small",
                  "model.args={}", "data.image_size=32", "train.max_steps=2",
                  "train.eval_batches=1", "train.eval_every=0", "train.log_every=1")
    train(recipe, progress=False)
    final = run / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["library"] == "torchvision" and config["num_classes"] == 10
    model = torchvision.models.get_model(config["architecture"], num_classes=10,
                                         **config["model_args"])
    model.load_state_dict(load_file(str(final / "model.safetensors")))  # strict
    model.eval()
    # the same logits as the trained weights in the family's own module
    data = prepare(load_recipe(final / "recipe.yaml"))
    own = data.objective.build_models()["model"]
    own.load_state_dict(load_file(str(latest_checkpoint(run) / "model.safetensors")))
    own.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), own(x), atol=1e-5)
    # pooled features (overture features, the probe): the input of the last Linear
    encoder = ImageEncoder(run, device="cpu")
    assert encoder.dim == config["num_features"] == 1024
    image = Image.fromarray(_pattern(0, 0, size=32))
    x = encoder.transform(image)[None]
    with torch.no_grad():
        pooled = model.classifier[:3](torch.flatten(model.avgpool(model.features(x)), 1))
    assert np.allclose(encoder.encode([image]), pooled.numpy(), atol=1e-5)


# --------------------------------------------------------------------------- review fixes


def test_finetune_metrics_are_those_of_the_evaluation_kept_as_final(digits_run, tmp_path,
                                                                    cache_dir, capsys):
    """With an evaluation every step and the lowest loss kept, metrics.json reports the
    step whose model final/ is (not the untrained step-0 evaluation, not the last)."""
    run = _finetune_pets(digits_run, tmp_path, cache_dir, "train.epochs=1",
                         "train.eval_every=1", "train.save_every=0", "train.best_metric=loss",
                         "train.best_mode=min", "train.lr=0.05")
    metrics = json.loads(capsys.readouterr().out)
    evals = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text()
                                               .splitlines()) if r["split"] == "eval"}
    kept = min((s for s in evals if s > 0), key=evals.get)  # the engine never keeps step 0
    assert metrics["step"] == kept and metrics["loss"] == evals[kept]


def test_folder_held_out_images_are_a_random_sample_of_every_class(tmp_path, cache_dir):
    """The held-out index is in random order (its first batches sample every class), for
    a split of the source and for a separate held-out folder alike."""
    root = _image_folder(tmp_path / "four", ["a", "b", "c", "d"], 10)
    held = _image_folder(tmp_path / "held", ["a", "b", "c", "d"], 10)
    for eval_source in ([], [str(held)]):
        data = prepare_images(ImageDataConfig(source=[str(root)], eval_source=eval_source,
                                              eval_fraction=0.4, cache_dir=str(cache_dir),
                                              num_proc=1), labelled=True, progress=False)
        labels = list(data.eval["label"])
        assert labels != sorted(labels)
        assert len(set(labels[:8])) >= 3  # the first batch of 8 is not one or two classes


def test_max_train_examples_checks_only_the_images_it_keeps(tmp_path, cache_dir,
                                                            monkeypatch):
    from overture.pretrain.image import data as image_data

    root = _image_folder(tmp_path / "many", ["a", "b"], 20)
    checked = []
    check = image_data._check
    monkeypatch.setattr(image_data, "_check", lambda item: checked.append(item) or check(item))
    prepared = prepare_images(ImageDataConfig(source=[str(root)], eval_fraction=0.25,
                                              max_train_examples=6, num_proc=1,
                                              cache_dir=str(cache_dir)),
                              labelled=True, progress=False)
    assert len(prepared.train) == 6 and len(prepared.eval) == 10
    assert len(checked) == 16  # not the 40 of the source


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "resnet18"])
def test_pooled_features_have_the_width_the_model_reports(name):
    """timm's MobileNetV3 pools to head_hidden_size (1,024), not num_features (288): the
    SimCLR head, features and probes take the width of what the model gives."""
    from overture.pretrain.image.models import create, num_features, pooled_features

    torch.manual_seed(0)
    model = create(name, 0).eval()
    with torch.no_grad():
        assert pooled_features(model, torch.zeros(2, 3, 32, 32)).shape == (2, num_features(model))


def test_models_for_one_input_size_are_built_at_data_image_size(cache_dir, offline):
    """A timm ViT takes data.image_size (img_size is passed to it), and final/ records it;
    a model that cannot take the size is refused in one line naming it, before training."""
    recipe = tiny("image", "unused", cache_dir, "unused", "model.name=vit_tiny_patch16_224",
                  "model.args={patch_size: 8, depth: 1}")
    objective = prepare(recipe).objective
    model = objective.build_models()["model"]
    assert objective.architecture()[1]["img_size"] == 16
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)
    small = tiny("image", "unused", cache_dir, "unused", "model.name=torchvision:alexnet",
                 "model.args={}")
    with pytest.raises(ConfigError, match="cannot take data.image_size=16"):
        prepare(small).objective.build_models()


def test_top5_is_reported_only_with_more_than_five_classes():
    from overture.pretrain.image.supervised import ClassifyImages

    objective = object.__new__(ClassifyImages)
    objective.ema, objective.recipe = None, load_recipe("resnet-tiny-digits")
    model = torch.nn.Linear(4, 3)
    batch = {"images": torch.randn(6, 4), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    with torch.no_grad():
        out = objective.forward({"model": model}, batch, None)
    assert "cls_top5" not in out
    assert "top5" not in objective.summarize({k: float(v) for k, v in out.items()}, {"cls": 6})


def test_image_flops_are_counted_for_both_families(cache_dir, offline):
    for family in ("image", "simclr"):
        recipe = tiny(family, "unused", cache_dir, "unused")
        objective = prepare(recipe).objective
        assert objective.flops_per_unit(recipe.resolved_phases()[0]) > 0, family


def _write_parquet(path: Path, labels: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": _png(_pattern(i % 3, i)), "path": None} for i in range(len(labels))]
    pq.write_table(pa.table({"image": images, "label": labels}), path)
    return path


def test_parquet_labels_may_be_class_names(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    source = _write_parquet(tmp_path / "named.parquet", ["dog", "cat", "eel", "cat"] * 3)
    data = prepare_images(ImageDataConfig(source=[str(source)], eval_fraction=0.25,
                                          cache_dir=str(cache_dir), num_proc=1),
                          labelled=True, progress=False)
    assert data.stats["class_names"] == ["cat", "dog", "eel"]
    names = ["dog", "cat", "eel", "cat"] * 3
    for row, label in zip(data.train["row"], data.train["label"]):
        assert data.stats["class_names"][label] == names[row]


@pytest.mark.parametrize("case, message", [
    ("odd-mixup", "train.batch_size=7 must be even with mixup"),
    ("batch-of-1", "train.batch_size=1: use at least 2 images"),
    ("jitter", "objective.color_jitter=[0.4, 0.4]"),
    ("policy", "objective.auto_augment='foo' is not a timm policy"),
    ("one-class", "1 class found"),
    ("args-with-checkpoint", "the architecture is the checkpoint's"),
    ("null-label", "row 1 has no 'label'"),
    ("garbage-parquet", "cannot be read as Parquet"),
])
def test_bad_image_inputs_end_in_one_line_and_exit_2(case, message, tmp_path, cache_dir,
                                                     capsys, digits_run, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    base = ["pretrain", "resnet-tiny-digits", f"output_dir={tmp_path / 'run'}",
            f"data.cache_dir={cache_dir}", "data.num_proc=1", "data.image_size=16",
            "train.max_steps=2", "train.eval_every=0"]
    if case == "jitter":  # SimCLR's jitter is a list (the supervised family's a strength)
        base[1] = "simclr-tiny-digits"
    if case == "one-class":
        base.append(f"data.source=[{_image_folder(tmp_path / 'one', ['only'], 6)}]")
        base.append("objective.num_classes=null")
    if case == "null-label":
        base.append(f"data.source=[{_write_parquet(tmp_path / 'n.parquet', [0, None, 1, 0])}]")
    if case == "garbage-parquet":
        (tmp_path / "g.parquet").write_bytes(b"PAR1 not really")
        base.append(f"data.source=[{tmp_path / 'g.parquet'}]")
    extra = {"odd-mixup": ["objective.mixup_alpha=0.2", "train.batch_size=7"],
             "batch-of-1": ["train.batch_size=1"],
             "jitter": ["objective.color_jitter=[0.4,0.4]"],
             "policy": ["objective.auto_augment=foo"],
             "args-with-checkpoint": [f"model.init_from={digits_run}"],
             "one-class": ["train.batch_size=4"]}.get(case, [])  # 6 images: one batch
    assert main([*base, *extra]) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_finetune_images_takes_a_folder_whose_name_has_commas_and_spaces(tmp_path,
                                                                          digits_run):
    from overture.finetune.images import image_finetune_recipe

    folder = _image_folder(tmp_path / "my imgs, v2", ["a", "b"], 2)
    recipe = image_finetune_recipe(str(digits_run), str(folder))
    assert recipe.data.source == [str(folder)]
    assert recipe.model.init_from == str(digits_run / "final")


def test_random_interpolation_trains_and_evaluates_with_bilinear(tiny_digits):
    """"random" interpolation is timm's training augmentation; the evaluation transform
    (which timm builds only for a fixed method) resizes bilinearly."""
    from PIL import Image

    from overture.pretrain.image.transforms import Augment

    augment = Augment(image_size=16, interpolation="random")
    image = Image.fromarray(_pattern(0, 1, size=24))
    assert augment.train()(image).shape == augment.eval()(image).shape == (3, 16, 16)


def test_report_draws_top1_and_the_data_wait_of_an_image_run(digits_run, tmp_path):
    from overture.report import _panels, read_metrics, write_report

    by_split = read_metrics(digits_run)
    keys = [key for key, _ in _panels(by_split)]
    assert {"loss", "images_per_s", "top1", "data_wait_fraction"} <= set(keys)
    # the evaluation's train_loss repeats the train records' loss: no panel of its own
    assert all("train_loss" in r for r in by_split["eval"].values()) and "train_loss" not in keys
    assert write_report(digits_run, tmp_path / "r.png").stat().st_size > 10_000


# --------------------------------------------------------------------------- README claims


def test_simclr_torchvision_backbone_loads_with_its_head_module_made_identity(tmp_path,
                                                                             cache_dir,
                                                                             offline):
    """A torchvision SimCLR final/ names where its classifier was (classifier.3 for
    MobileNetV3); replacing that with an Identity, as the README shows, loads it
    strictly and gives the features of the trained backbone."""
    import torchvision

    from overture.checkpoint import latest_checkpoint
    from overture.engine import train

    run = tmp_path / "run"
    train(tiny("simclr", run, cache_dir, "unused", "model.name=torchvision:mobilenet_v3_small",
               "model.args={}", "data.image_size=32", "train.max_steps=1",
               "train.eval_batches=1", "train.eval_every=0"), progress=False)
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["head"] == "identity" and config["head_module"] == "classifier.3"
    model = torchvision.models.get_model(config["architecture"], num_classes=1,
                                         **config["model_args"])
    parent, _, attr = config["head_module"].rpartition(".")
    setattr(model.get_submodule(parent), attr, torch.nn.Identity())
    model.load_state_dict(load_file(str(run / "final" / "model.safetensors")))
    own = prepare(load_recipe(run / "final" / "recipe.yaml")).objective.build_models()["model"]
    own.load_state_dict(load_file(str(latest_checkpoint(run) / "model.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), own.eval().backbone(x), atol=1e-5)


def test_timm_loads_final_through_a_pretrained_cfg_overlay_too(digits_run):
    import timm

    final = digits_run / "final"
    config = json.loads((final / "config.json").read_text())
    args = {k: v for k, v in config["model_args"].items() if k != "num_classes"}
    overlay = timm.create_model("resnet18", pretrained=True, num_classes=10, **args,
                                pretrained_cfg_overlay=dict(file=str(final / "model.safetensors"),
                                                            num_classes=10)).eval()
    local = timm.create_model(f"local-dir:{final}", pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(overlay(x), local(x))


def test_channels_last_batches_and_model(cache_dir, offline):
    recipe = tiny("image", "unused", cache_dir, "unused", "model.channels_last=true")
    data = prepare(recipe)
    batch = data.objective.collator(recipe.resolved_phases()[0])(
        _rows(data, list(range(4))))
    assert batch["images"].is_contiguous(memory_format=torch.channels_last)
    model = data.objective.build_models()["model"]
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_checking_images_in_worker_processes_gives_the_same_index(tmp_path, cache_dir,
                                                                  monkeypatch):
    from overture.pretrain.image import data as image_data

    root = _image_folder(tmp_path / "pool", ["a", "b"], 6)
    (root / "a" / "bad.png").write_bytes(b"\x89PNG broken")
    results = []
    for workers in (1, 2):
        monkeypatch.setattr(image_data, "POOL_MIN_IMAGES", 0 if workers > 1 else 10**9)
        prepared = prepare_images(ImageDataConfig(source=[str(root)], num_proc=workers,
                                                  eval_fraction=0.25,
                                                  cache_dir=str(tmp_path / f"c{workers}")),
                                  labelled=True, progress=False)
        results.append((list(prepared.train["row"]), list(prepared.eval["row"]),
                        prepared.stats))
    assert results[0] == results[1]
    skipped = results[0][2]
    assert skipped.get("train_unreadable_skipped", 0) + skipped.get(
        "eval_unreadable_skipped", 0) == 1


def _check_and_die(item):
    """An image check whose worker is killed (forked workers find it in this module)."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_image_check_worker_stops_preparation_with_one_message(tmp_path, cache_dir,
                                                                        monkeypatch):
    """A worker checking images that dies (killed, out of memory) ends preparation with one
    line naming the cause and data.num_proc=1, where it had been a BrokenProcessPool
    traceback; no cache folder, whole or half, is left."""
    import multiprocessing

    from overture.errors import RunError
    from overture.pretrain.image import data as image_data

    root = _image_folder(tmp_path / "pool", ["a", "b"], 4)
    monkeypatch.setattr(image_data, "POOL_MIN_IMAGES", 0)
    monkeypatch.setattr(image_data, "_check", _check_and_die)
    cache = tmp_path / "cache"
    with pytest.raises(RunError, match=r"^data preparation: a worker process ended before "
                                       r"its images were checked.*data\.num_proc=1"):
        prepare_images(ImageDataConfig(source=[str(root)], num_proc=2, cache_dir=str(cache)),
                       labelled=True, progress=False)
    assert not multiprocessing.active_children()
    assert not list((cache / "images").glob("*"))


def test_gradient_accumulation_with_simclr_is_warned_about(tmp_path, cache_dir, caplog,
                                                           offline):
    from overture.engine import train

    with caplog.at_level(logging.WARNING, logger="overture.engine"):
        train(tiny("simclr", tmp_path / "run", cache_dir, "unused", "train.max_steps=1",
                   "train.gradient_accumulation_steps=2", "train.eval_batches=1",
                   "train.eval_every=0"), progress=False)
    assert any("compares the examples of a micro-batch" in r.getMessage()
               for r in caplog.records)


def test_transfer_from_a_weights_file_of_a_named_model_replaces_its_classifier(
        digits_run, tmp_path, cache_dir, offline):
    """--checkpoint FILE model.name=NAME: a timm / torchvision release's weights for the
    backbone, a new classifier for this data's classes."""
    from safetensors.torch import save_file

    from overture.finetune.images import image_finetune_recipe

    source = load_file(str(digits_run / "final" / "model.safetensors"))
    weights = tmp_path / "resnet-tiny.safetensors"
    save_file({**source, "fc.weight": torch.zeros(1000, 128), "fc.bias": torch.zeros(1000)},
              str(weights))  # an "ImageNet" classifier of another size
    folder = _image_folder(tmp_path / "pets", ["cat", "dog", "eel"], 4)
    args = json.dumps({"channels": [16, 32, 64, 128], "stem_width": 16,
                       "layers": [1, 1, 1, 1]})
    recipe = image_finetune_recipe(str(weights), str(folder), overrides=[
        "model.name=resnet18", f"model.args={args}", f"data.cache_dir={cache_dir}",
        "data.image_size=16", "data.num_proc=1"])
    data = prepare(recipe)
    model = data.objective.build_models()["model"]
    assert torch.equal(model.conv1.weight, source["conv1.weight"])
    assert model.fc.weight.shape == (3, 128)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not weights")
    recipe = image_finetune_recipe(str(broken), str(folder), overrides=[
        "model.name=resnet18", f"model.args={args}", f"data.cache_dir={cache_dir}",
        "data.image_size=16", "data.num_proc=1"])
    with pytest.raises(ConfigError, match="is not a readable .safetensors"):
        prepare(recipe).objective.build_models()


def test_random_init_transfer_is_the_checkpoints_architecture_without_its_weights(
        digits_run, tmp_path):
    from overture.finetune.images import image_finetune_recipe

    folder = _image_folder(tmp_path / "pets", ["cat", "dog"], 2)
    recipe = image_finetune_recipe(str(digits_run), str(folder), random_init=True)
    assert recipe.model.init_from is None and recipe.model.name == "resnet18"
    assert recipe.model.args["channels"] == [16, 32, 64, 128]
    assert recipe.data.image_size == 16  # the checkpoint's input size


def test_training_loss_smooths_labels_or_takes_mixups_soft_targets():
    """Training: cross-entropy with objective.label_smoothing, or, for a mixed batch,
    against its soft targets; evaluation: plain cross-entropy."""
    import torch.nn.functional as F

    from overture.objective import Update
    from overture.pretrain.image.supervised import ClassifyImages

    objective = object.__new__(ClassifyImages)
    objective.ema, objective.recipe = None, load_recipe("resnet-tiny-digits")
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 10), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    logits = model(x)
    update = Update("model", ("model",), ("cls",))
    train = objective.forward({"model": model}, {"images": x, "labels": labels}, update)
    assert torch.allclose(train["cls_loss_sum"],
                          F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="sum"))
    held_out = objective.forward({"model": model}, {"images": x, "labels": labels}, None)
    assert torch.allclose(held_out["cls_loss_sum"], F.cross_entropy(logits, labels,
                                                                    reduction="sum"))
    targets = torch.softmax(torch.randn(6, 10), -1)
    mixed = objective.forward({"model": model}, {"images": x, "labels": labels,
                                                 "targets": targets}, update)
    assert torch.allclose(mixed["cls_loss_sum"],
                          -(targets * F.log_softmax(logits, -1)).sum())


def test_image_recipes_have_no_tokenizer_section(tmp_path, capsys):
    recipe = load_recipe("resnet-tiny-digits")
    assert "tokenizer" not in recipe.to_dict() and "tokenizer:" not in recipe.to_yaml()
    assert main(["pretrain", "resnet-tiny-digits", "tokenizer.vocab_size=5",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    assert "has no tokenizer" in _one_line_error(capsys)


@pytest.mark.parametrize("option,value", [("--seed", "-3"), ("--data-seed", "-1"),
                                          ("--seed", str(2**32)), ("--data-seed", str(2**32))])
def test_probe_refuses_a_seed_outside_0_to_2_32_in_one_line_before_any_work(
        trained, tmp_path, capsys, monkeypatch, option, value):
    from overture.pretrain.image import features, probe

    monkeypatch.setattr(features, "ImageEncoder", lambda *a, **k: pytest.fail("loaded"))
    assert main(["probe", "--checkpoint", str(trained("image")), "--data", "digits",
                 "--cache-dir", str(tmp_path / "cache"), option, value]) == 2
    assert _one_line_error(capsys) == (f"error: {option}={value} must be an integer from 0 "
                                       "to 4294967295 (2**32 - 1)")
    assert not (tmp_path / "cache").exists()
    for edge in (0, 2**32 - 1):  # the ends of the range are seeds numpy and sklearn take
        probe.check_seed("--seed", edge)


def test_the_split_training_transform_is_timms_whole_one(tiny_digits):
    from timm.data import create_transform

    from overture.pretrain.image.data import decode_row
    from overture.pretrain.image.transforms import Augment, seeded

    augment = Augment(image_size=16, auto_augment="rand-m9-n2", re_prob=0.3, hflip=0.5)
    whole = create_transform(16, is_training=True, scale=augment.scale, hflip=0.5,
                             auto_augment="rand-m9-n2", re_prob=0.3)
    rows = tiny_digits.train[:6]
    for i in range(6):
        image = decode_row(rows["image"][i], rows["path"][i], rows["height"][i],
                           rows["width"][i])
        with seeded(0, i):
            ours = augment.train()(image)
        with seeded(0, i):
            assert torch.equal(ours, whole(image)), i


@pytest.mark.parametrize("re_prob, views", [(0.0, 1), (0.5, 1), (0.0, 2)])
def test_the_batched_last_step_gives_each_images_own_transform(tiny_digits, re_prob, views):
    # to-tensor and normalize run once per batch (random erasing, which draws, per image):
    # the pixels must be those of timm's whole transform, image by image
    from overture.pretrain.image.data import decode_row
    from overture.pretrain.image.transforms import Augment, ImageCollator, seeded

    augment = Augment(image_size=16, auto_augment="rand-m9-n2", re_prob=re_prob,
                      mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    collator = ImageCollator(augment, seed=5, views=views)
    assert collator._batched_final == (re_prob == 0)
    collator.set_epoch(1)
    indices = [4, 9, 2, 30]
    batch = collator(_rows(tiny_digits, indices))
    rows = tiny_digits.train[indices]
    for position, index in enumerate(indices):
        image = decode_row(rows["image"][position], rows["path"][position],
                           rows["height"][position], rows["width"][position])
        with seeded(5, 1, index):
            alone = [collator.augment.train()(image) for _ in range(views)]
        got = [batch["images"]] if views == 1 else [batch["view_a"], batch["view_b"]]
        for view, expected in zip(got, alone):
            assert torch.equal(view[position], expected), index


def test_a_batch_reseeds_each_image_as_seeding_it_alone_would(tiny_digits):
    # the collator saves the global generators once per batch, not around every image:
    # each image must still get the pixels of its own (seed, epoch, index) seeding
    from overture.pretrain.image.data import decode_row
    from overture.pretrain.image.transforms import seeded

    recipe = tiny_digits.objective.recipe
    collator = tiny_digits.objective.collator(recipe.resolved_phases()[0])
    collator.set_epoch(2)
    indices = [7, 3, 11]
    batch = collator(_rows(tiny_digits, indices))["images"]
    rows = tiny_digits.train[indices]
    for position, index in enumerate(indices):
        image = decode_row(rows["image"][position], rows["path"][position],
                           rows["height"][position], rows["width"][position])
        with seeded(collator.seed, 2, index):
            alone = collator.augment.train()(image)
        assert torch.equal(batch[position], alone), index
