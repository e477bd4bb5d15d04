"""Longformer beyond the contract: the tiny recipe trains on 1,024-token inputs offline,
final/ round-trips with global attention at a length beyond the window, convert-long turns
a BERT or RoBERTa masked LM into a Longformer with the same loss, long documents fill
full-length blocks, the config names a bad key, model.init_from continues from a
converted checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import continued, prepare, records, tiny
from overture.checkpoint import latest_checkpoint
from overture.cli import main
from overture.config import ConfigError, load_recipe
from overture.data.prepare import IndexedDataset
from overture.engine import train
from overture.registry import build_objective

SMALL = ("data.num_proc=1", "tokenizer.vocab_size=1024", "tokenizer.min_frequency=1")


def _recipe(run, cache_dir, corpus, *overrides):
    """longformer-tiny as bundled (1,024 tokens, window 64) on ``corpus``."""
    return load_recipe("longformer-tiny", [f"data.corpus=[{corpus}]",
                                           f"data.cache_dir={cache_dir}", f"output_dir={run}",
                                           *SMALL, *overrides])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir, real_text) -> Path:
    """The bundled tiny recipe, 4 steps of 2 inputs of 1,024 tokens, with evaluations."""
    run = tmp_path_factory.mktemp("longformer") / "run"
    train(_recipe(run, cache_dir, real_text, "train.max_steps=4", "train.batch_size=2",
                  "train.log_every=1", "train.eval_every=2", "train.eval_batches=2",
                  "train.save_every=0"), progress=False)
    return run


def test_the_tiny_recipe_trains_on_1024_token_inputs_offline(tiny_run, cache_dir, real_text):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: nothing is fetched
    recipe = load_recipe(tiny_run / "final" / "recipe.yaml")
    assert recipe.data.max_seq_len >= 1024 and recipe.model.attention_window < 1024
    steps = records(tiny_run)
    assert sorted(steps) == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in steps.values())
    assert steps[4]["tokens_seen"] > 4 * 2 * 900  # inputs nearly full of real tokens
    assert sorted(records(tiny_run, "eval")) == [0, 2, 4]
    assert (tiny_run / "final" / "model.safetensors").is_file()

    data = prepare(recipe)
    rows = data.train["input_ids"]
    assert max(map(len, rows)) <= 1024
    assert sum(map(len, rows)) / len(rows) > 0.9 * 1024
    batch = data.objective.collator(recipe.resolved_phases()[0])(
        IndexedDataset(data.train).__getitems__([0, 1, 2]))
    assert batch["input_ids"].shape[1] % 64 == 0  # padded to the window, not by the model
    glob = batch["global_attention_mask"]
    assert glob[:, 0].tolist() == [1, 1, 1] and glob[:, 1:].sum() == 0  # <s> only
    assert (batch["input_ids"][:, 0] == data.tokenizer.bos_token_id).all()
    model = data.objective.build_models()["model"].model
    assert {type(layer.attention.self).__name__
            for layer in model.longformer.encoder.layer} == {"FastLongformerSelfAttention"}


def test_final_reloads_in_plain_transformers_with_global_attention_past_the_window(
        tiny_run, tmp_path):
    from safetensors.torch import load_file

    final = tiny_run / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LongformerForMaskedLM"]
    assert config["attention_window"] == [64, 64] and config["max_position_embeddings"] == 1026
    text = " ".join((Path(load_recipe(final / "recipe.yaml").data.corpus[0])
                     .read_text(encoding="utf-8")).split()[:2000])
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoTokenizer, LongformerForMaskedLM
        tok = AutoTokenizer.from_pretrained({str(final)!r})
        model = LongformerForMaskedLM.from_pretrained({str(final)!r}).eval()
        enc = tok({text!r}, truncation=True, return_tensors="pt")
        glob = torch.zeros_like(enc["input_ids"]); glob[:, 0] = 1
        with torch.no_grad():
            logits = model(**enc, global_attention_mask=glob).logits
        assert not any(m.startswith("overture") for m in sys.modules)
        torch.save({{"ids": enc["input_ids"], "logits": logits, "max": tok.model_max_length}},
                   {str(tmp_path / "out.pt")!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    assert theirs["max"] == 1024 and theirs["ids"].shape[1] == 1024  # 16 windows long

    recipe = load_recipe(final / "recipe.yaml")
    objective = build_objective(recipe)
    objective.prepare(recipe.resolved_phases()[0], progress=False)
    module = objective.build_models()["model"]  # overture's attention installed
    module.load_state_dict(load_file(str(latest_checkpoint(tiny_run) / "model.safetensors")),
                           strict=False)
    module.model.tie_weights()
    module.eval()
    glob = torch.zeros_like(theirs["ids"])
    glob[:, 0] = 1
    with torch.no_grad():
        ours = module.model(input_ids=theirs["ids"], global_attention_mask=glob).logits
    assert torch.allclose(ours, theirs["logits"], atol=1e-4)


# ---------------------------------------------------------------------------- convert-long


def _source(kind: str, folder: Path, cache_dir, corpus) -> Path:
    """A seeded tiny BERT / RoBERTa masked LM (64 positions) with its family's trained
    tokenizer, saved with save_pretrained. Weights drawn wide (std 0.2) so that a wrong
    position or projection shows in the loss."""
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    objective = build_objective(tiny(kind, "unused", cache_dir, corpus))
    tok = objective.load_tokenizer()
    sizes = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=128, initializer_range=0.2,
                 pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if kind == "bert":
        model = BertForMaskedLM(BertConfig(max_position_embeddings=64, **sizes))
    else:
        model = RobertaForMaskedLM(RobertaConfig(
            max_position_embeddings=64 + tok.pad_token_id + 1, type_vocab_size=1,
            layer_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            **sizes))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _masked(tok, texts: list[str]) -> dict:
    """Short inputs (padded to the longest) with every 4th real token masked."""
    enc = tok(texts, padding=True, truncation=True, max_length=40, return_tensors="pt")
    ids = enc["input_ids"]
    chosen = ~torch.isin(ids, torch.tensor(tok.all_special_ids))
    chosen &= torch.arange(ids.shape[1]) % 4 == 1
    enc["labels"] = torch.where(chosen, ids, -100)
    enc["input_ids"] = torch.where(chosen, tok.mask_token_id, ids)
    return dict(enc)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_convert_long_keeps_the_masked_lm_loss_and_tiles_positions(kind, tmp_path, cache_dir,
                                                                    real_text, capsys):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, LongformerForMaskedLM

    source_dir = _source(kind, tmp_path / kind, cache_dir, real_text)
    out = tmp_path / f"{kind}-long"
    # 64 positions either way (RoBERTa's table has pad_token_id + 1 rows more): no longer
    assert main(["convert-long", "--checkpoint", str(source_dir), "--max-length", "64",
                 "--window", "32", "--output", str(out)]) == 2
    assert "--max-length=64 must exceed the 64 positions" in capsys.readouterr().err
    assert not out.exists()
    assert main(["convert-long", "--checkpoint", str(source_dir), "--max-length", "256",
                 "--window", "128", "--output", str(out)]) == 0
    source = AutoModelForMaskedLM.from_pretrained(source_dir).eval()
    long = LongformerForMaskedLM.from_pretrained(out).eval()  # plain transformers
    tok, long_tok = AutoTokenizer.from_pretrained(source_dir), AutoTokenizer.from_pretrained(out)
    assert long_tok.model_max_length == 256 and long.config.attention_window == [128, 128]

    # short inputs: the window (64 each side) covers them, so local attention is full
    # attention; global attention on the first token uses copies of the same projections
    words = real_text.read_text(encoding="utf-8").split()
    text = " ".join(words[:60])
    batch = _masked(tok, [text, " ".join(words[100:112])])
    assert batch["input_ids"].shape[1] <= 40 and (batch["attention_mask"] == 0).any()
    assert long_tok(text)["input_ids"] == tok(text)["input_ids"]
    glob = torch.zeros_like(batch["input_ids"])
    glob[:, 0] = 1
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = source(**batch)
        for extra in ({}, {"global_attention_mask": glob}):
            got = long(**batch, **extra)
            assert abs(got.loss.item() - expected.loss.item()) < 1e-3, extra
            assert torch.allclose(got.logits[real], expected.logits[real], atol=1e-4), extra
        # and the whole new length runs
        assert long(input_ids=torch.randint(5, 100, (1, 256))).logits.shape[1] == 256

    # positions: the source's learned rows, tiled from the first token's row
    pad = tok.pad_token_id
    first = 0 if kind == "bert" else pad + 1
    old = source.base_model.embeddings.position_embeddings.weight
    new = long.longformer.embeddings.position_embeddings.weight
    assert new.shape[0] == 256 + pad + 1
    for k in range(256):
        assert torch.equal(new[pad + 1 + k], old[first + k % 64]), k
    assert torch.equal(new[:pad + 1], old[:pad + 1] if kind == "roberta"
                       else torch.zeros_like(new[:pad + 1]))
    for i, layer in enumerate(long.longformer.encoder.layer):
        attn = layer.attention.self
        for name in ("query", "key", "value"):
            src = getattr(source.base_model.encoder.layer[i].attention.self, name).weight
            assert torch.equal(getattr(attn, name).weight, src)
            assert torch.equal(getattr(attn, f"{name}_global").weight, src)


def test_convert_long_refuses_an_existing_output_and_bad_checkpoints(tmp_path, cache_dir,
                                                                      real_text, capsys):
    from transformers import BertConfig, BertModel, GPT2Config

    source = _source("bert", tmp_path / "bert", cache_dir, real_text)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    gpt = tmp_path / "gpt"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt)
    headless = tmp_path / "headless"
    BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(headless)
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(source, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    capsys.readouterr()

    cases = [(source, taken, 64, 128, "exists"),
             (source, tmp_path / "a", 63, 128, "--window=63"),
             (tmp_path / "empty", tmp_path / "b", 64, 128, "no config.json"),
             (gpt, tmp_path / "c", 64, 128, "'gpt2'"),
             (headless, tmp_path / "d", 64, 128, "masked-LM head"),
             (corrupt, tmp_path / "e", 64, 128, "cannot load its model"),
             (source, a_file / "f", 64, 128, "cannot be written"),
             (source, tmp_path / "g", 64, 32, "shorter than --window"),
             # not longer than the source's 64 positions: refused, naming both numbers
             (source, tmp_path / "h", 32, 64, "--max-length=64 must exceed the 64 positions"),
             (source, tmp_path / "i", 32, 48, "--max-length=48 must exceed the 64 positions")]
    for checkpoint, output, window, length, message in cases:
        code = main(["convert-long", "--checkpoint", str(checkpoint), "--window", str(window),
                     "--max-length", str(length), "--output", str(output)])
        err = capsys.readouterr().err.strip()
        assert code == 2, (message, err)
        assert message in err and len(err.splitlines()) == 1, err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]  # nothing written over
    assert not any((tmp_path / n).exists() for n in "abcdeghi")


# ---------------------------------------------------------------------------- data, config


def test_long_documents_are_packed_into_full_length_blocks(tmp_path, cache_dir):
    # eight documents of 60 numbered sentences (~1,000 tokens each): each spans blocks of
    # 256 tokens, which are filled with whole sentences and continue where the last ended
    words = "the river ran past a mill and under a bridge of old stone".split()
    docs = ["\n".join(f"Doc {d} line {i} : {' '.join(words[:3 + (i * 7 + d) % 10])} ."
                      for i in range(60)) for d in range(8)]
    corpus = tmp_path / "long.txt"
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    data = prepare(tiny("longformer", "unused", cache_dir, corpus, "data.eval_fraction=0.2"))
    tok = data.tokenizer
    rows = data.train["input_ids"]
    assert len(rows) >= 12
    longest = max(len(tok(line, add_special_tokens=False)["input_ids"])
                  for doc in docs for line in doc.splitlines())
    seen = []
    for row in rows:
        assert row[0] == tok.bos_token_id and row[-1] == tok.eos_token_id
        assert 256 - longest - 1 <= len(row) <= 256  # full to within one sentence
        seen.append([tuple(map(int, m)) for m in
                     re.findall(r"Doc (\d+) line (\d+)", tok.decode(row))])
    stream = [s for block in seen for s in block]
    for (d0, i0), (d1, i1) in zip(stream, stream[1:]):
        # the next sentence of the same document, or the first of a later one after the
        # last of this one (held-out documents are skipped whole)
        assert (d1, i1) == (d0, i0 + 1) or (d1 > d0 and i1 == 0 and i0 == 59), (d0, i0, d1, i1)
    held_in = {d for d, _ in stream}
    spans = {d: sum(any(s[0] == d for s in block) for block in seen) for d in held_in}
    assert len(held_in) >= 5 and all(n >= 4 for d, n in spans.items()
                                     if (d, 59) in stream)  # one document, 4+ blocks
    # the extra </s> marks a document boundary inside a block
    crossing = next(row for row in rows
                    if len(set(re.findall(r"Doc (\d+) line", tok.decode(row)))) > 1)
    assert crossing[1:-1].count(tok.eos_token_id) == 1


@pytest.mark.parametrize("override, message", [
    ("model.attention_window=63", "model.attention_window=63 must be an even"),
    ("model.attention_window=0", "model.attention_window=0 must be an even"),
    ("model.attention_window=[64]", "model.attention_window lists 1 values"),
    ("model.attention_window=[64,30.5]", "model.attention_window[1]=30.5"),
    ("model.attention_dilation=0", "model.attention_dilation=0 must be an integer >= 1"),
    ("model.attention_dilation=[1,1,2]", "model.attention_dilation lists 3"),
    ("model.num_attention_heads=3", "model.hidden_size=128 is not divisible"),
    ("data.max_seq_len=2048", "exceeds model.max_position_embeddings=1024"),
    ("objective.global_attention=all", "objective.global_attention='all'"),
    ("model.attention_windw=64", "did you mean model.attention_window"),
])
def test_bad_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe("longformer-tiny", [override])


def test_dilation_reaches_the_attention_and_config_json(cache_dir, real_text, tmp_path):
    data = prepare(tiny("longformer", "unused", cache_dir, real_text,
                        "model.attention_dilation=[1,2]"))
    model = data.objective.build_models()["model"].model
    assert model.config.attention_dilation == [1, 2]
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["attention_dilation"] == [1, 2]
    plain = prepare(tiny("longformer", "unused", cache_dir, real_text))
    config = plain.objective.build_models()["model"].model.config
    assert getattr(config, "attention_dilation", None) in (None, 1, [1, 1])


def test_init_from_continues_from_a_converted_roberta(tmp_path, cache_dir, real_text):
    from transformers import AutoTokenizer, LongformerForMaskedLM

    source = _source("roberta", tmp_path / "roberta", cache_dir, real_text)
    converted = tmp_path / "roberta-long"
    assert main(["convert-long", "--checkpoint", str(source), "--max-length", "256",
                 "--window", "32", "--output", str(converted)]) == 0
    run = tmp_path / "run"
    recipe = continued("longformer", converted, run, cache_dir, real_text, "train.max_steps=2",
                       "train.batch_size=2", "train.log_every=1", "train.save_every=0")
    # the checkpoint's sizes (not the recipe's) and the recipe's window
    assert (recipe.model.hidden_size, recipe.model.max_position_embeddings,
            recipe.model.attention_window) == (64, 256, 32)
    data = prepare(recipe)
    assert data.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(converted).get_vocab()
    model = data.objective.build_models()["model"].model
    expected = LongformerForMaskedLM.from_pretrained(converted).state_dict()
    got = model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    train(recipe, progress=False)
    assert sorted(records(run)) == [1, 2]
    # a size of the recipe that disagrees with the checkpoint is refused as it is read
    with pytest.raises(ConfigError, match=r"model.hidden_size=128 but model.init_from=.* has 64"):
        continued("longformer", converted, tmp_path / "wrong", cache_dir, real_text,
                  "model.hidden_size=128")
    with pytest.raises(ConfigError, match=r"model.init_from='.*nowhere': no such folder"):
        continued("longformer", tmp_path / "nowhere", tmp_path / "gone", cache_dir, real_text)


def test_without_global_attention_ddp_trains_and_the_global_projections_stay(cache_dir,
                                                                             real_text):
    """objective.global_attention=none: no token attends globally, so the global
    projections never run. DDP fails at its second step on a parameter no forward used;
    they are frozen instead, and stay as initialised, in the state dict."""
    import torch.distributed as dist

    def module_and_batch(setting):
        recipe = tiny("longformer", "unused", cache_dir, real_text, *SMALL,
                      f"objective.global_attention={setting}")
        data = prepare(recipe)
        batch = data.objective.collator(recipe.resolved_phases()[0])(
            IndexedDataset(data.train).__getitems__([0, 1]))
        return data.objective.build_models()["model"].train(), batch

    def is_global(name):
        return re.search(r"\.(query|key|value)_global\.", name) is not None

    trained, _ = module_and_batch("first")
    assert all(p.requires_grad for p in trained.parameters())
    module, batch = module_and_batch("none")
    assert batch["global_attention_mask"].sum() == 0
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {n for n, _ in module.named_parameters() if is_global(n)}
    assert len(frozen) == 6 * module.model.config.num_hidden_layers  # q, k, v: weight, bias
    before = {n: p.detach().clone() for n, p in module.named_parameters()}

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(module)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad],
                                      lr=1e-3, weight_decay=0.1)
        for _ in range(2):  # the second step is where an unused parameter fails
            ddp(**batch)["mlm_loss_sum"].backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        dist.destroy_process_group()
    for name, param in module.named_parameters():
        assert torch.equal(param, before[name]) == (name in frozen), name
    assert {n.removeprefix("model.") for n in frozen} <= set(module.model.state_dict())
