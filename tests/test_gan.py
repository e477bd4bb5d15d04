"""The text-to-image families (pretrain/gan/): captions, the matching-aware discriminator,
the frozen encoder, FID, caption consistency, the sample grid, generate, start points and
bad input. The contract tests (test_contract.py) run over both families as well."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import GAN_FAMILIES, TRAINED_ENCODER, prepare, records, tiny
from overture.cli import main
from overture.config import load_recipe
from overture.engine import train
from overture.registry import build_objective
from overture.errors import ConfigError
from overture.pretrain.gan import captions as gan_captions
from overture.pretrain.gan.metrics import fid


@pytest.fixture(scope="module")
def digits(cache_dir, real_text):
    """The prepared gan-int-cls objective on 64 digits (16 px), with its captions."""
    return prepare(tiny("gan-int-cls", "unused", cache_dir, real_text)).objective


def test_digit_captions_name_the_label_and_measured_attributes_in_held_out_phrasings(digits):
    caps = digits.captions
    train_texts = {caps.texts[i] for image in caps.train for i in image}
    eval_texts = {caps.texts[i] for image in caps.eval for i in image}
    assert not train_texts & eval_texts  # evaluation prompts are never trained on
    assert all(len(image) == len(gan_captions.TRAIN_PHRASINGS) for image in caps.train)
    label = digits.labels["eval"][0]
    thickness, slant, size = caps.eval_attributes[0]
    for i in caps.eval[0]:
        text = caps.texts[i]
        assert (gan_captions.WORDS[label] in text.split() or str(label) in text.split())
        assert gan_captions.THICKNESS[thickness] in text and gan_captions.SLANT[slant] in text
        assert gan_captions.SIZE[size] in text
    # tertiles / median of the training images: each class holds its share
    for column, classes in enumerate((3, 3, 2)):
        shares = np.bincount(caps.train_attributes[:, column], minlength=classes) / len(caps.train)
        assert np.all(np.abs(shares - 1 / classes) < 0.1), shares


def test_measured_attributes_follow_the_ink():
    """A thicker stroke measures thicker, a top shifted right measures more right-leaning,
    a bigger digit measures larger."""
    image = -torch.ones(1, 3, 32, 32)
    image[..., 8:24, 15:17] = 1  # an upright bar
    thick = image.clone()
    thick[..., 8:24, 13:19] = 1
    leaning = -torch.ones(1, 3, 32, 32)
    for row in range(8, 24):  # the top to the right: x falls as y grows
        col = 20 - (row - 8) // 2
        leaning[..., row, col:col + 2] = 1
    small = -torch.ones(1, 3, 32, 32)
    small[..., 12:20, 15:17] = 1
    base, fat, lean, short = (gan_captions.measure(x) for x in (image, thick, leaning, small))
    assert fat["thickness"] > base["thickness"]
    assert lean["slant"] > 0.3 and abs(base["slant"]) < 1e-6
    assert short["size"] < base["size"]


def test_a_captions_file_with_a_bom_quotes_and_empty_lines_is_read_whole(tmp_path):
    from PIL import Image

    root = tmp_path / "birds"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "1.png")
    lines = ['{"image": "a/1.png", "captions": ["a \\"red\\" bird\\twith a tab", "small"]}',
             "", '{"image": "b/1.png", "caption": "a blue bird"}',
             '{"image": "a/1.png", "text": "third, on its own line"}', ""]
    path = root / "captions.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    table = gan_captions.read_captions_file(path)
    assert table == {"a/1.png": ['a "red" bird\twith a tab', "small", "third, on its own line"],
                     "b/1.png": ["a blue bird"]}
    # a torn last line names the file and line
    path.write_text(lines[0] + "\n" + '{"image": "b/1.png", "capt', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"captions.jsonl:2: not a JSON object"):
        gan_captions.read_captions_file(path)


def _recipe(family, cache_dir, real_text, tmp_path, *extra):
    return tiny(family, tmp_path / "run", cache_dir, real_text, *extra)


def test_the_matching_aware_discriminator_sees_three_pairings_per_batch(digits):
    """Real image with its caption, the same real image with another class's caption,
    and the generated image with the right caption: each batch, each example."""
    phase = digits.recipe.resolved_phases()[0]
    from overture.data.prepare import IndexedDataset

    batch = digits.collator(phase)(IndexedDataset(digits._prepared.train).__getitems__(
        list(range(8))))
    models = digits.build_models()
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images, texts):
            seen.append((images, texts))
            return self.inner(images, texts)

    models["discriminator"] = Recording(models["discriminator"])
    update = digits.updates()[0]
    assert update.name == "discriminator"
    out = digits.forward(models, batch, update)
    assert out["d_loss_sum"].requires_grad
    (real, (right, wrong)), (fake, (fake_text,)) = seen
    assert torch.equal(real, batch["images"])  # no DiffAugment in this recipe
    assert torch.equal(right, batch["text"])
    assert torch.equal(wrong, batch["wrong"]) and torch.equal(fake_text, batch["text"])
    assert not fake.requires_grad and fake.shape == real.shape  # G is not stepped by D's loss
    # the wrong caption is another class's: its digit differs from the image's label
    table = {tuple(np.round(row, 5)): i for i, row in enumerate(digits.table)}
    labels = batch["labels"].tolist()
    for k in range(8):
        text = digits.captions.texts[table[tuple(np.round(batch["wrong"][k].numpy(), 5))]]
        assert gan_captions.WORDS[labels[k]] not in text.split() and str(labels[k]) not in text.split()


def test_the_frozen_text_encoder_is_never_trained_and_final_holds_it_unchanged(trained):
    from safetensors.torch import load_file

    run = trained("gan-int-cls")
    recipe = load_recipe(run / "final" / "recipe.yaml")
    source = Path(recipe.objective.text_encoder)
    original = load_file(str(source / "model.safetensors"))
    exported = load_file(str(run / "final" / "text_encoder" / "model.safetensors"))
    shared = [k for k in exported if k in original or f"bert.{k}" in original]
    assert len(shared) == len(exported) > 10
    for key in exported:
        assert torch.equal(exported[key], original.get(key, original.get(f"bert.{key}"))), key
    # no checkpoint holds encoder weights: only the two players are trained
    from overture.checkpoint import latest_checkpoint

    saved = sorted(p.name for p in latest_checkpoint(run).glob("model*.safetensors"))
    assert saved == ["model.safetensors", "model_1.safetensors"]


@pytest.mark.parametrize("family", GAN_FAMILIES)
def test_a_trained_text_encoder_starts_at_the_frozen_table_and_learns_on_ds_backward(
        family, cache_dir, real_text, tmp_path):
    """objective.train_text_encoder: a third update on D's backward; before any step the
    encoder gives the frozen table's rows (same pooling, same standardisation); the
    batch's caption indices name the rows it holds; D's backward sends a gradient into
    every trained encoder weight and G's into none; and accumulation is exact."""
    from overture.data.prepare import IndexedDataset

    objective = prepare(_recipe(family, cache_dir, real_text, tmp_path,
                                *TRAINED_ENCODER)).objective
    updates = objective.updates()
    assert [(u.name, u.models, u.heads, u.with_previous) for u in updates] == [
        ("discriminator", ("discriminator",), ("d",), False),
        ("text_encoder", ("text_encoder",), ("d",), True),
        ("generator", ("generator",), ("g",), False)]
    torch.manual_seed(0)
    models = objective.build_models()
    encoder = models["text_encoder"]
    with torch.no_grad():
        rows = encoder(torch.arange(len(objective.captions.texts)))
    torch.testing.assert_close(rows, torch.from_numpy(objective.table), atol=2e-5, rtol=0)
    batch = objective.collator(objective.recipe.resolved_phases()[0])(
        IndexedDataset(objective._prepared.train).__getitems__(list(range(8))))
    for key in ("text", "wrong", "other"):
        assert torch.equal(batch[key], torch.from_numpy(objective.table)[batch[f"{key}_index"]])
    trained_params = [p for p in encoder.parameters() if p.requires_grad]
    assert 0 < len(trained_params) < len(list(encoder.parameters()))  # BERT's pooler is unused
    for update in (updates[0], updates[2]):  # what the engine runs forward for
        for module in models.values():
            module.zero_grad(set_to_none=True)
        out = objective.forward(models, batch, update)
        sum(out[f"{h}_loss_sum"] for h in update.heads).backward()
        reached = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trained_params]
        assert all(reached) if update.name == "discriminator" else not any(reached)
    # no dropout in the encoder: one batch of 8 is two accumulated batches of 4
    from accelerate import Accelerator

    from helpers import sgd_step

    accelerator = Accelerator(cpu=True)
    straight = sgd_step(objective.recipe, objective, [batch], accelerator)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    # DF-GAN: its sixth-power penalty's double backward through the encoder sums every
    # token into the one token-type row; float32 rounding there reaches 3e-6
    atol = 1e-5 if family == "dfgan" else 1e-6
    assert torch.allclose(straight, sgd_step(objective.recipe, objective, halves, accelerator),
                          atol=atol, rtol=0)
    # FLOPs per image: the encoder's forward and backward inside D's are counted once
    from overture.pretrain.gan.family import flop_counter

    with flop_counter() as counter:
        sgd_step(objective.recipe, objective, [batch], accelerator)
    with flop_counter() as building:  # sgd_step builds the models: the encoder's probe
        objective.build_models()
    frozen = prepare(_recipe(family, cache_dir, real_text, tmp_path)).objective
    phase = objective.recipe.resolved_phases()[0]
    step = counter.get_total_flops() - building.get_total_flops()
    # within 10%: the meta-device count runs BERT's attention without the padding mask
    # (transformers reads the mask's values), whose kernel the real step may not take
    assert objective.flops_per_unit(phase) == pytest.approx(step / 8, rel=0.1)
    assert objective.flops_per_unit(phase) > frozen.flops_per_unit(phase) > 0
    with pytest.raises(ConfigError, match=r"objective.train_text_encoder=true with "
                                          r"train.mixed_precision=fp16: .* use bf16 or no"):
        build_objective(_recipe(family, cache_dir, real_text, tmp_path,
                                "objective.train_text_encoder=true",
                                "train.mixed_precision=fp16"))


@pytest.mark.parametrize("family", GAN_FAMILIES)
def test_the_discriminator_loss_has_the_gradient_of_its_value_wrt_the_caption(
        family, cache_dir, real_text, tmp_path):
    """What a trained text encoder receives: the autograd gradient of D's loss with
    respect to the caption embeddings equals a central finite difference of its value
    (float64), the real pair and DF-GAN's gradient penalty included."""
    from overture.data.prepare import IndexedDataset

    objective = prepare(_recipe(family, cache_dir, real_text, tmp_path)).objective
    torch.manual_seed(0)
    models = objective.build_models()
    discriminator = models["discriminator"].double().eval()
    batch = objective.collator(objective.recipe.resolved_phases()[0])(
        IndexedDataset(objective._prepared.train).__getitems__(list(range(8))))
    with torch.no_grad():
        fake = models["generator"].eval()(batch["noise"], batch["text"], None)[0].double()
    batch = {**batch, "images": batch["images"].double(), "wrong": batch["wrong"].double()}

    def loss(text):
        return objective.discriminator_loss(discriminator, {**batch, "text": text}, fake).sum()

    text = batch["text"].double().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(text), text)
    direction = torch.randn(text.shape, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0))
    # A central difference errs by rounding, about |loss| * 1e-15 / eps (float64 over a few
    # hundred operations: 1e-8 at eps 1e-7, which once failed CI against a fixed 1e-8),
    # and, where a step crosses a hinge's kink at 0, by the kink (15% once at eps 1e-5).
    # Rounding spoils the smallest step most and a kink only the steps long enough to
    # reach it: of three steps a decade apart, one must match to 1e-6 plus its rounding.
    base = text.detach()  # DF-GAN's penalty differentiates inside the loss: no no_grad
    value = abs(loss(base).item())
    analytic = (grad * direction).sum().item()
    errors = {eps: abs(analytic - (loss(base + eps * direction)
                                   - loss(base - eps * direction)).item() / (2 * eps))
              for eps in (1e-4, 1e-5, 1e-6)}
    assert any(error <= 1e-6 * abs(analytic) + 1e-15 * value / eps
               for eps, error in errors.items()), (analytic, value, errors)


def test_a_trained_text_encoder_resumes_exactly_and_final_holds_it(cache_dir, real_text,
                                                                    tmp_path):
    """4 steps with the encoder trained at an explicit lr (logged, by value), saved at 2;
    the run resumed from step 2 logs the same losses; final/text_encoder holds the
    trained weights (the last checkpoint's third model), not the source's."""
    import shutil

    from safetensors.torch import load_file

    run = tmp_path / "run"

    def recipe(*extra):
        return _recipe("gan-int-cls", cache_dir, real_text, tmp_path,
                       "objective.train_text_encoder=true", "train.updates.text_encoder.lr=3e-4",
                       "train.max_steps=4", "train.save_every=2", "train.keep_last=5",
                       "train.log_every=1", "train.eval_every=0", *extra)

    train(recipe(), progress=False)
    straight = records(run)
    assert [straight[s]["lr_text_encoder"] for s in (1, 4)] == [3e-4, 3e-4]
    assert straight[1]["lr_discriminator"] == 2e-4  # train.lr, unchanged for the others
    trained = load_file(str(run / "checkpoints" / "step-000004" / "model_2.safetensors"))
    exported = load_file(str(run / "final" / "text_encoder" / "model.safetensors"))
    source = load_file(str(Path(recipe().objective.text_encoder) / "model.safetensors"))
    assert {f"model.{k}" for k in exported} == set(trained)
    assert all(torch.equal(v, trained[f"model.{k}"]) for k, v in exported.items())
    key = "embeddings.word_embeddings.weight"
    assert not torch.equal(exported[key], source.get(key, source.get(f"bert.{key}")))

    # a later run starting from this one must read its fine-tuned encoder
    with pytest.raises(ConfigError, match=r"model.init_from=.* fine-tuned its text encoder.*"
                                          r"set objective.text_encoder="):
        build_objective(recipe(f"model.init_from={run}"))
    build_objective(recipe(f"model.init_from={run}",
                           f"objective.text_encoder={run / 'final' / 'text_encoder'}"))

    shutil.rmtree(run / "checkpoints" / "step-000004")
    shutil.rmtree(run / "final")
    (run / "metrics.jsonl").write_text("")
    train(recipe("train.resume=auto"), progress=False)
    resumed = records(run)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for name in ("d_loss", "g_loss"):
            assert resumed[step][name] == pytest.approx(straight[step][name], abs=1e-5)
    again = load_file(str(run / "final" / "text_encoder" / "model.safetensors"))
    assert all(torch.allclose(v, exported[k], atol=1e-6, rtol=0) for k, v in again.items())


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    assert abs(fid(features, features)) < 1e-6
    scores = [fid(features, features + rng.standard_normal(features.shape) * sigma)
              for sigma in (0.1, 0.5, 1.0, 2.0)]
    assert scores[0] > 1e-3 and all(a < b for a, b in zip(scores, scores[1:])), scores


def test_caption_consistency_counts_the_judges_agreement_with_the_caption():
    from overture.pretrain.gan.metrics import consistency

    examples = {"caption_label": np.array([0, 1, 2, 3, -1]),
                "fake_class": np.array([0, 1, 0, 0, 5]),  # 2 of the 4 labelled agree
                "real_class": np.array([0, 1, 2, 0, 5]),
                "caption_attributes": np.array([[0, 1, 1]] * 5),
                "fake_attributes": np.array([[0, 1, 0], [0, 0, 0], [1, 1, 1], [0, 1, 1],
                                             [0, 1, 1]])}
    out = consistency(examples, ("thickness", "slant", "size"))
    assert out == {"caption_consistency": 0.5, "judge_real_top1": 0.75,
                   "thickness_agreement": 0.8, "slant_agreement": 0.8, "size_agreement": 0.6}


@pytest.fixture(scope="module")
def judged(trained, tmp_path_factory, cache_dir, real_text):
    """gan-int-cls with the tiny image run as judge: 4 steps, evaluated at steps 0, 2 and
    4, final/ from the one with the best caption consistency (as the digits recipes)."""
    run = tmp_path_factory.mktemp("judged") / "run"
    train(tiny("gan-int-cls", run, cache_dir, real_text, f"objective.judge={trained('image')}",
               "train.max_steps=4", "train.eval_every=2", "train.eval_examples=40",
               "objective.grid_columns=3", "train.best_metric=caption_consistency"),
          progress=False)
    return run


def test_evaluation_reports_consistency_attributes_and_fid_with_its_network(judged):
    evaluation = records(judged, "eval")[4]
    for key in ("caption_consistency", "judge_real_top1", "fid", "thickness_agreement",
                "slant_agreement", "size_agreement"):
        assert 0 <= evaluation[key] < float("inf"), key
    assert evaluation["caption_consistency"] <= 1
    config = json.loads((judged / "final" / "config.json").read_text())
    assert config["fid_network"].startswith("judge ")  # named in every export
    # train.best_metric=caption_consistency: final/ is the best evaluation's export
    from overture.checkpoint import latest_checkpoint

    logged = {s: r["caption_consistency"] for s, r in records(judged, "eval").items()}
    assert sorted(logged) == [0, 2, 4]
    state = json.loads((latest_checkpoint(judged) / "train_state.json").read_text())
    # the untrained step-0 model is no candidate; the first of equals stays
    best = max((2, 4), key=lambda s: (logged[s], -s))
    assert (state["best_step"], state["best_value"]) == (best, logged[best])
    for name in ("generator.safetensors", "discriminator.safetensors"):
        assert (judged / "final" / name).read_bytes() == (judged / "best" / name).read_bytes()


def test_the_sample_grid_shows_prompts_by_noise_at_each_evaluation(judged):
    from PIL import Image

    grid = judged / "samples" / "step-000004.png"
    prompts = grid.with_suffix(".txt").read_text().splitlines()
    assert len(prompts) == 10  # one held-out caption per digit
    width, height = Image.open(grid).size
    assert (width, height) == (3 * 16 + 4 * 2, 10 * 16 + 11 * 2)  # 3 noises, padding 2


@pytest.mark.parametrize("n", [1, 5])
def test_generate_writes_a_png_of_the_requested_count_and_size(trained, tmp_path, n, capsys):
    from PIL import Image

    out = tmp_path / "birds.png"
    assert main(["generate", "--checkpoint", str(trained("dfgan")), "--prompt",
                 "a thick zero", "--n", str(n), "--output", str(out)]) == 0
    columns = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    assert Image.open(out).size == (columns * 16, rows * 16)
    assert f"{n} images of 16x16" in capsys.readouterr().out


def test_start_points_are_recipe_keys(trained, cache_dir, real_text, tmp_path):
    """model.init_from: both players start from a GAN final/; model.discriminator_backbone:
    D's image encoder starts from an image final/ (the supervised digits run)."""
    from safetensors.torch import load_file

    gan = trained("gan-int-cls")
    objective = prepare(_recipe("gan-int-cls", cache_dir, real_text, tmp_path,
                                f"model.init_from={gan}")).objective
    models = objective.build_models()
    for name, file in (("generator", "generator"), ("discriminator", "discriminator")):
        saved = load_file(str(gan / "final" / f"{file}.safetensors"))
        for key, value in models[name].state_dict().items():
            assert torch.equal(value, saved[key]), (name, key)
    image = trained("image")
    objective = prepare(_recipe("dfgan", cache_dir, real_text, tmp_path,
                                f"model.discriminator_backbone={image}")).objective
    backbone = objective.build_models()["discriminator"].backbone.state_dict()
    saved = load_file(str(image / "final" / "model.safetensors"))
    assert backbone and all(torch.equal(v, saved[k]) for k, v in backbone.items())



def _shifted_and_cut(x, dy, dx, cy, cx, cut):
    """The paper's translation then cutout, one image at a time, by plain indexing."""
    out = torch.zeros_like(x)
    _, h, w = x.shape
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[:, i, j] = x[:, i - dy, j - dx]
    top, left = cy - cut // 2, cx - cut // 2
    out[:, max(top, 0):max(top + cut, 0), max(left, 0):max(left + cut, 0)] = 0
    return out


def test_diff_augment_shifts_with_a_zero_border_cuts_a_half_square_and_keeps_gradients():
    from overture.pretrain.gan.augment import augment, width

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 16, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    u = torch.rand(6, width(["translation", "cutout"]), generator=gen, dtype=torch.float64)
    u[0, :2] = torch.tensor([0.0, 0.999])  # the extreme shifts: -2 and +2 at 16 px
    u[1, 2:] = torch.tensor([0.0, 0.999])  # a square cut by the corner
    out = augment(x, u, ["translation", "cutout"])
    for k in range(6):
        dy, dx = (int(v * 5) - 2 for v in u[k, :2])
        cy, cx = (int(v * 17) for v in u[k, 2:])
        assert torch.equal(out[k], _shifted_and_cut(x[k].detach(), dy, dx, cy, cx, 8)), k
    assert (int(u[0, 0] * 5) - 2, int(u[0, 1] * 5) - 2) == (-2, 2)
    # the gradient is 1 at each pixel that reaches the output, 0 at the others
    out.sum().backward()
    assert set(x.grad.unique().tolist()) == {0.0, 1.0}
    assert x.grad.sum() == (out != 0).sum()
    # color: u = 1/2 is the identity; brightness moves every pixel by u - 1/2
    y = torch.randn(2, 3, 8, 8, generator=gen)
    assert torch.allclose(augment(y, torch.full((2, 3), 0.5), ["color"]), y, atol=1e-6)
    brighter = augment(y, torch.tensor([[0.8, 0.5, 0.5]] * 2), ["color"])
    assert torch.allclose(brighter - y, torch.full_like(y, 0.3), atol=1e-6)
    grey = augment(y, torch.tensor([[0.5, 0.0, 0.5]] * 2), ["color"])  # saturation x 0
    assert torch.allclose(grey, y.mean(1, keepdim=True).expand_as(y), atol=1e-6)
    flat = augment(y, torch.tensor([[0.5, 0.5, 0.0]] * 2), ["color"])  # contrast x 1/2
    mean = y.mean((1, 2, 3), keepdim=True)
    assert torch.allclose(flat, (y - mean) * 0.5 + mean, atol=1e-6)
    # a uniform just below 1 in bf16 still cuts inside the paper's range
    top = augment(torch.ones(1, 1, 16, 16, dtype=torch.bfloat16),
                  torch.tensor([[0.9999, 0.9999]]), ["cutout"])
    assert int((top == 0).sum()) == 4 * 4  # centre 16: rows and columns 12..15 (not 13..15)
    # and a bf16 image (bf16 autocast's generator) gets the shifts a float32 one gets
    u = torch.rand(256, 4, generator=gen)
    ramp = torch.arange(256.0).view(1, 1, 16, 16).expand(256, 1, 16, 16)
    policy = ["translation", "cutout"]
    assert torch.equal(augment(ramp.bfloat16(), u, policy).float(),
                       augment(ramp, u, policy).bfloat16().float())


def test_diff_augment_draws_per_example_after_every_other_draw_and_not_at_evaluation(digits):
    from overture.data.prepare import IndexedDataset
    from overture.pretrain.gan.family import CaptionCollator

    rows = IndexedDataset(digits._prepared.train).__getitems__(list(range(8)))
    def collate(width, epoch=0):
        c = CaptionCollator(digits.table, digits.captions, digits.labels, 16, 8, 8, 0.0, 0,
                            augment_width=width)
        c.set_epoch(epoch)
        return c(rows)

    plain, augmented, again = collate(0), collate(7), collate(7)
    assert set(augmented) - set(plain) == {"augment_real", "augment_fake"}
    assert all(torch.equal(plain[k], augmented[k]) for k in plain)  # the other draws stay
    for key in ("augment_real", "augment_fake"):
        u = augmented[key]
        assert u.shape == (8, 7) and 0 <= u.min() and u.max() < 1
        assert torch.equal(u, again[key])  # (seed, epoch, index): the same every time
    assert not torch.equal(augmented["augment_real"], augmented["augment_fake"])
    assert not torch.equal(augmented["augment_real"], collate(7, epoch=1)["augment_real"])
    assert "augment_real" not in collate(7, epoch=-1)  # held-out batches are as they are


@pytest.mark.parametrize("family", GAN_FAMILIES)
def test_with_diff_augment_d_sees_only_augmented_images_in_both_steps(family, cache_dir,
                                                                       real_text, tmp_path):
    """Every image D scores while training, real or generated, in D's step and in G's, is
    the augmentation of that image with the batch's uniforms; at evaluation, none is."""
    from overture.data.prepare import IndexedDataset
    from overture.pretrain.gan.augment import augment

    policy = ["color", "translation", "cutout"]
    objective = prepare(_recipe(family, cache_dir, real_text, tmp_path,
                                f"objective.diff_augment=[{','.join(policy)}]")).objective
    phase = objective.recipe.resolved_phases()[0]
    rows = IndexedDataset(objective._prepared.train).__getitems__(list(range(8)))
    batch = objective.collator(phase)(rows)
    models = objective.build_models()
    seen = []
    inner = models["discriminator"]
    models["discriminator"] = lambda images, texts: seen.append(images) or inner(images, texts)
    d_update, g_update = objective.updates()[:2]
    torch.manual_seed(0)
    objective.forward(models, batch, d_update)
    real, fake = seen[0], seen[1]
    assert torch.allclose(real, augment(batch["images"], batch["augment_real"], policy))
    with torch.no_grad():
        made, _ = models["generator"](batch["noise"], batch["text"], batch["eps"])
    assert torch.allclose(fake, augment(made, batch["augment_fake"], policy), atol=1e-6)
    seen.clear()
    objective.forward(models, batch, g_update)
    assert seen and torch.allclose(seen[0], augment(made, batch["augment_fake"], policy),
                                   atol=1e-6)
    assert seen[0].requires_grad  # G learns through the augmentation
    if family == "gan-int-cls":  # the INT term's image, too
        b = objective.recipe.objective.interpolation_beta
        h_int = b * batch["text"] + (1 - b) * batch["other"]
        with torch.no_grad():
            made_int, _ = models["generator"](batch["noise"], h_int, batch["eps_int"])
        assert len(seen) == 2 and torch.allclose(
            seen[1], augment(made_int, batch["augment_fake"], policy), atol=1e-6)
    held = objective.collator(phase)
    held.set_epoch(-1)
    evaluation = held(rows)
    seen.clear()
    with torch.no_grad():
        objective.discriminator_loss(models["discriminator"], evaluation, made)
    assert torch.equal(seen[0], evaluation["images"]) and torch.equal(seen[-1], made)



@pytest.mark.parametrize("family", GAN_FAMILIES)
def test_the_generator_steps_every_d_steps_and_logs_its_own_loss(family, cache_dir, real_text,
                                                                  tmp_path):
    run = tmp_path / "run"
    train(_recipe(family, cache_dir, real_text, tmp_path, "objective.d_steps=3",
                  "train.max_steps=6", "train.log_every=1", "train.eval_every=0"),
          progress=False)
    logged = records(run)
    assert all("d_loss" in logged[s] for s in range(1, 7))
    assert [s for s in range(1, 7) if "g_loss" in logged[s]] == [1, 4]  # steps 0 and 3


BAD = [
    ("images without captions", ["data.source=[{folder}]"], "images without captions"),
    ("an image the captions forget", ["data.source=[{folder}]", "data.captions={partial}"],
     "1 images have no caption in"),
    ("a captions file naming missing images", ["data.source=[{folder}]",
                                                "data.captions={bad_captions}"],
     "not an image file"),
    ("a text encoder that is not one", ["objective.text_encoder={image}"],
     "objective.text_encoder="),
    ("an image size the generator cannot make", ["data.image_size=48"],
     "data.image_size=48: the gan-int-cls generator makes 16, 32, 64, 128"),
    ("every <= 0", ["objective.d_steps=0"], "objective.d_steps=0 must be a positive integer"),
    ("an unknown augmentation", ["objective.diff_augment=[translate]"],
     "objective.diff_augment='translate' is not one of"),
    ("an augmentation named twice", ["objective.diff_augment=[cutout,cutout]"],
     "objective.diff_augment=['cutout', 'cutout']: name each operation once"),
    ("a best metric without its judge", ["train.best_metric=caption_consistency"],
     "train.best_metric=caption_consistency needs objective.judge"),
    ("the other family's setting", ["objective.gp_weight=2"],
     "objective.gp_weight=2.0: a dfgan setting, unused by gan-int-cls; remove it"),
    ("a KL weight without the augmentation", ["objective.conditioning_augmentation=false",
                                              "objective.kl_weight=0.2"],
     "objective.kl_weight=0.2: the weight of the conditioning augmentation's KL term, "
     "which is off"),
]


@pytest.mark.parametrize("what,overrides,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_exit_2_before_any_work(what, overrides, message, trained,
                                                          cache_dir, real_text, tmp_path, capfd):
    from PIL import Image

    from helpers import classify_inputs

    folder = tmp_path / "images" / "one"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "1.png")
    bad_captions = tmp_path / "captions.jsonl"
    bad_captions.write_text('{"image": "images/one/1.png", "caption": "x"}\n'
                            '{"image": "images/one/3.png", "caption": "gone"}\n')
    Image.new("RGB", (8, 8)).save(folder / "2.png")
    partial = tmp_path / "partial.jsonl"
    partial.write_text('{"image": "images/one/1.png", "caption": "x"}\n')
    values = {"folder": tmp_path / "images", "bad_captions": bad_captions, "partial": partial,
              "image": trained("image")}
    encoder, _ = classify_inputs(cache_dir, real_text)
    args = ["pretrain", "gan-int-cls-digits", f"data.cache_dir={cache_dir}",
            f"output_dir={tmp_path / 'run'}", f"objective.text_encoder={encoder}",
            "objective.judge=null", *[o.format(**values) for o in overrides]]
    if not any(o.startswith("train.best_metric=") for o in overrides):
        args.append("train.best_metric=null")  # the recipe's needs the judge
    prepared = set((cache_dir / "images").glob("*"))
    capfd.readouterr()
    assert main(args) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()
    assert set((cache_dir / "images").glob("*")) == prepared  # no image was prepared


def test_a_missing_fine_tuned_encoder_names_the_recipe_that_makes_it(tmp_path, monkeypatch,
                                                                     capfd):
    """gan-int-cls-digits and dfgan-digits read runs/gan-int-cls-digits-encoder's
    encoder: without that run, one line says which command makes it."""
    monkeypatch.chdir(tmp_path)
    for recipe in ("gan-int-cls-digits", "dfgan-digits"):
        capfd.readouterr()
        assert main(["pretrain", recipe, "objective.judge=null", "train.best_metric=null",
                     f"output_dir={tmp_path / recipe}"]) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith(
            "make it with `overture pretrain gan-int-cls-digits-encoder`"), err
        assert not (tmp_path / recipe).exists()


def test_the_generators_ema_follows_timms_warmup_from_the_first_update(cache_dir, real_text,
                                                                         tmp_path):
    """After the first generator update the EMA is the generator; after the second it is
    d * G1 + (1 - d) * G2 with timm's warmup decay d = 1 - 2^(-2/3)."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    train(_recipe("gan-int-cls", cache_dir, real_text, tmp_path, "train.max_steps=2",
                  "train.save_every=1", "train.keep_last=5", "train.eval_every=0"),
          progress=False)
    ema, weights = {}, {}
    for step in (1, 2):
        folder = run / "checkpoints" / f"step-{step:06d}"
        ema[step] = torch.load(folder / "custom_checkpoint_0.pkl", weights_only=True)
        weights[step] = load_file(str(folder / "model.safetensors"))  # the generator
    d = 1 - 2 ** (-2 / 3)
    for key, g2 in weights[2].items():
        if not g2.is_floating_point():
            continue
        assert torch.allclose(ema[1][f"module.{key}"], weights[1][key], atol=1e-7), key
        assert torch.allclose(ema[2][f"module.{key}"], d * weights[1][key] + (1 - d) * g2,
                              atol=1e-6), key


@pytest.mark.parametrize("family", GAN_FAMILIES)
def test_flops_per_image_are_those_of_a_real_training_step(family, cache_dir, real_text,
                                                          tmp_path):
    """flops_per_unit (meta device) equals FlopCounterMode over the engine's train_step on
    two real images; the generator's share scales as 1 / d_steps."""
    from accelerate import Accelerator

    from helpers import sgd_step
    from overture.data.prepare import IndexedDataset
    from overture.pretrain.gan.family import flop_counter

    def objective(k):
        return prepare(_recipe(family, cache_dir, real_text, tmp_path,
                               f"objective.d_steps={k}")).objective

    one = objective(1)
    phase = one.recipe.resolved_phases()[0]
    batch = one.collator(phase)(IndexedDataset(one._prepared.train).__getitems__([0, 1]))
    with flop_counter() as counter:  # every operation the engine's step runs
        sgd_step(one.recipe, one, [batch], Accelerator(cpu=True))
    assert one.flops_per_unit(phase) == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
    f = {k: objective(k).flops_per_unit(phase) for k in (1, 2, 4)}
    assert f[1] > f[2] > f[4] > 0
    assert f[1] - f[2] == pytest.approx(2 * (f[2] - f[4]), rel=1e-9)  # D + G / k


@pytest.mark.parametrize("args, message", [
    (["--prompt", " "], "--prompt is empty"),
    (["--prompt", "a one", "--n", "0"], "--n=0 must be between 1 and 1024"),
    (["--prompt", "a one", "--output", "{tmp}/x.jpg"], "give a .png file"),
    (["--prompt", "a one", "--output", "{tmp}/exists.png"], "exists; give a new file name"),
    (["--prompt", "a one", "--temperature", "0.5"], "--temperature: text sampling options"),
    (["--prompt", "a one", "--seed", "-1"], "--seed=-1 must be between"),
], ids=["empty prompt", "n 0", "not png", "existing output", "text option", "bad seed"])
def test_generate_bad_input_is_one_line(trained, tmp_path, args, message, capfd):
    (tmp_path / "exists.png").write_bytes(b"keep me")
    argv = ["generate", "--checkpoint", str(trained("gan-int-cls"))]
    argv += [a.format(tmp=tmp_path) for a in args]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "new.png")]
    capfd.readouterr()
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert (tmp_path / "exists.png").read_bytes() == b"keep me"
    assert not (tmp_path / "new.png").exists()


@pytest.mark.parametrize("command", ["features", "probe"])
def test_encoder_commands_refuse_a_gan_checkpoint(trained, tmp_path, command, capfd):
    argv = {"features": ["features", "--checkpoint", str(trained("dfgan")), "--input",
                         str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.npy")],
            "probe": ["probe", "--checkpoint", str(trained("dfgan")), "--data", "digits"]}
    (tmp_path / "in.txt").write_text("a one\n")
    capfd.readouterr()
    assert main(argv[command]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dfgan checkpoint" in err[0], err


def test_recipes_counts_the_two_players_at_the_encoders_width(trained, tmp_path):
    """`overture recipes` sizes a GAN recipe from its text encoder's width: generator +
    discriminator, not the judge it measures with."""
    import shutil
    import subprocess
    import sys

    runs = tmp_path / "runs"
    (runs / "bert-tiny" / "final").mkdir(parents=True)
    (runs / "bert-tiny" / "final" / "config.json").write_text('{"hidden_size": 128}')
    encoder = runs / "gan-int-cls-digits-encoder" / "final" / "text_encoder"
    encoder.mkdir(parents=True)  # the digits GANs' fine-tuned bert-tiny
    (encoder / "config.json").write_text('{"hidden_size": 128}')
    shutil.copytree(trained("image") / "final", runs / "resnet-tiny-digits" / "final")
    done = subprocess.run([sys.executable, "-m", "overture", "recipes"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    sizes = {line.split()[0]: line.split()[2] for line in done.stdout.splitlines()[1:]}
    for name in ("gan-int-cls-digits", "dfgan-digits"):
        objective = build_objective(
            load_recipe(name, ["objective.judge=null", "train.best_metric=null"]))
        objective.table = np.zeros((1, 128), np.float32)  # the encoder's width
        players = sum(p.numel() for m in objective.build_models().values()
                      for p in m.parameters())
        assert sizes[name] == f"{players / 1e6:.1f}M", name
    assert sizes["dfgan-digits"] == "1.1M" and sizes["gan-int-cls-digits"] == "0.6M"


def test_a_parquet_source_gives_each_image_its_captions_from_the_caption_column(
        cache_dir, real_text, tmp_path):
    """Images in a Parquet file with a caption column (a list of strings a row, quotes and
    tabs kept); each prepared image keeps its own row's captions, in whatever order the
    held-out split put it."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    images, captions, labels = [], [], []
    for i in range(12):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(buffer, "PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
        captions.append([f'"red" level {i}', f"tab\there {i}"] if i % 2 else f"only {i}")
        labels.append(i % 3)
    column = pa.array([c if isinstance(c, list) else [c] for c in captions])
    table = pa.table({"image": images, "label": labels, "text": column})
    pq.write_table(table, tmp_path / "birds.parquet")
    objective = prepare(_recipe("gan-int-cls", cache_dir, real_text, tmp_path,
                                f"data.source=[{tmp_path / 'birds.parquet'}]",
                                "data.eval_fraction=0.25", "data.max_train_examples=0")).objective
    data = objective._prepared
    for split, rows in (("train", data.train["row"]), ("eval", data.eval["row"])):
        for image, row in zip(getattr(objective.captions, split), rows):
            texts = [objective.captions.texts[i] for i in image]
            expected = captions[row] if isinstance(captions[row], list) else [captions[row]]
            assert texts == expected, (split, row)
    assert len(data.train) + len(data.eval) == 12 and len(data.eval) == 3
    assert objective.captions.thresholds is None  # attributes are measured on digits only


@pytest.mark.parametrize("family, keys", [
    ("gan-int-cls", {"interpolation_weight": 1.0, "interpolation_beta": 0.5}),
    ("dfgan", {"gp_weight": 2.0, "gp_power": 6.0})])
def test_each_family_fills_its_own_defaults_and_refuses_the_others_settings(
        family, keys, cache_dir, real_text, tmp_path):
    """The other family's keys, and a KL weight without the conditioning augmentation,
    are refused by name, not ignored; left out, a family's own keys get its defaults,
    and an explicit value wins."""
    plain = ("objective.conditioning_augmentation=false", "objective.kl_weight=null",
             *(f"objective.{k}=null" for k in keys))  # the digits recipes set some

    def recipe(*extra):  # the family's digits recipe without the augmentation, + extra
        return _recipe(family, cache_dir, real_text, tmp_path, *plain, *extra)

    assert {k: getattr(recipe().objective, k) for k in keys} == keys
    assert recipe().objective.kl_weight is None  # no augmentation, no KL weight
    own = next(iter(keys))
    assert getattr(recipe(f"objective.{own}=0.25").objective, own) == 0.25
    other = {"gan-int-cls": "gp_power", "dfgan": "interpolation_beta"}[family]
    with pytest.raises(ConfigError, match=rf"objective.{other}=0.5: a .* setting, unused "
                                          f"by {family}; remove it"):
        recipe(f"objective.{other}=0.5")
    with pytest.raises(ConfigError, match=r"objective.kl_weight=1.0: .* which is off"):
        recipe("objective.kl_weight=1")
    augmented = recipe("objective.conditioning_augmentation=true")
    assert augmented.objective.kl_weight == 2.0  # StackGAN's
    assert recipe("objective.conditioning_augmentation=true",
                  "objective.kl_weight=0.2").objective.kl_weight == 0.2


def test_dfgan_with_conditioning_augmentation_samples_its_condition_and_adds_the_kl(
        cache_dir, real_text, tmp_path):
    """dfgan's generator fuses c = mu + sigma * eps (the collator's eps) instead of the
    whole embedding, its loss is -D + kl_weight * KL, samples use mu, and without the
    option the generator is the one it was (no Conditioning weights)."""
    from overture.data.prepare import IndexedDataset

    plain = prepare(_recipe("dfgan", cache_dir, real_text, tmp_path)).objective
    assert not any(k.startswith("cond.") for k in plain.build_models()["generator"].state_dict())
    objective = prepare(_recipe("dfgan", cache_dir, real_text, tmp_path,
                                "objective.conditioning_augmentation=true",
                                "objective.kl_weight=0.3")).objective
    phase = objective.recipe.resolved_phases()[0]
    batch = objective.collator(phase)(IndexedDataset(objective._prepared.train).__getitems__(
        list(range(8))))
    torch.manual_seed(0)
    models = objective.build_models()
    generator, discriminator = models["generator"], models["discriminator"]
    with torch.no_grad():  # the fusion blocks start as the identity: give the text a say
        for param in generator.blocks.parameters():
            param.normal_(0, 0.2)
    mu, logvar = generator.cond.proj(batch["text"]).chunk(2, dim=1)
    mu = torch.nn.functional.leaky_relu(mu, 0.2)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
    assert kl.min() > 0
    fake, got_kl = generator(batch["noise"], batch["text"], batch["eps"])
    assert torch.allclose(got_kl, kl)
    sampled, _ = generator(batch["noise"], batch["text"], batch["eps"] + 1)
    at_mu, _ = generator(batch["noise"], batch["text"], None)
    assert not torch.allclose(fake, sampled) and not torch.allclose(fake, at_mu)
    loss = objective.generator_loss(generator, discriminator, batch)
    (score,) = discriminator(objective.augmented(fake, batch, "fake"), [batch["text"]])
    assert torch.allclose(loss, -score + 0.3 * kl, atol=1e-6)
    run = tmp_path / "ca"  # trains, exports, and generates from its own final/
    train(_recipe("dfgan", cache_dir, real_text, tmp_path, f"output_dir={run}",
                  "objective.conditioning_augmentation=true", "train.max_steps=2",
                  "train.eval_every=0"), progress=False)
    out = tmp_path / "ca.png"
    assert main(["generate", "--checkpoint", str(run), "--prompt", "a thick zero",
                 "--n", "2", "--output", str(out)]) == 0
    assert json.loads((run / "final" / "config.json").read_text())["generator"]["augment"]


@pytest.mark.parametrize("augmented", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("family", GAN_FAMILIES)
def test_accumulation_is_exact_with_and_without_conditioning_augmentation(
        family, augmented, cache_dir, real_text, tmp_path):
    """One batch of 8 takes the step of two accumulated batches of 4, for both families
    with and without the conditioning augmentation (its eps is drawn per example, its KL
    is a per-example loss term). The digits recipes differ (gan-int-cls-digits has it
    on, dfgan-digits off), so the contract tests see only one setting of each."""
    from accelerate import Accelerator

    from helpers import sgd_step
    from overture.data.prepare import IndexedDataset

    extra = (("objective.conditioning_augmentation=true", "objective.kl_weight=0.2")
             if augmented else
             ("objective.conditioning_augmentation=false", "objective.kl_weight=null"))
    objective = prepare(_recipe(family, cache_dir, real_text, tmp_path, *extra)).objective
    assert ("cond.proj.weight" in objective.build_models()["generator"].state_dict()) == (
        augmented or family == "gan-int-cls")
    batch = objective.collator(objective.recipe.resolved_phases()[0])(
        IndexedDataset(objective._prepared.train).__getitems__(list(range(8))))
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    accelerator = Accelerator(cpu=True)
    straight = sgd_step(objective.recipe, objective, [batch], accelerator)
    assert torch.allclose(straight, sgd_step(objective.recipe, objective, halves, accelerator),
                          atol=1e-6, rtol=0), (family, augmented)
