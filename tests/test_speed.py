"""What the speed work changed must not change what is computed: the fused LM head and
cross-entropy, GPT's fused activation, train.compile, and the mfu of every record."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import prepare, records, tiny
from overture.data.prepare import IndexedDataset
from overture.pretrain.text.losses import linear_cross_entropy


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_equals_cross_entropy_of_the_linear_head(bias):
    torch.manual_seed(0)
    n, h, v = 45, 16, 37
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    b = torch.randn(v, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (n,))
    targets[::7] = -100  # ignored rows: no loss, no gradient
    # rows=8: chunks that do not divide the 45 rows
    loss, correct = linear_cross_entropy(hidden, weight, targets, b, count_correct=True, rows=8)
    (loss * 3.5).backward()  # the incoming gradient scales every gradient
    ours = [hidden.grad, weight.grad] + ([b.grad] if bias else [])
    hidden.grad = weight.grad = None
    if bias:
        b.grad = None
    logits = F.linear(hidden, weight, b)
    reference = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    (reference * 3.5).backward()
    theirs = [hidden.grad, weight.grad] + ([b.grad] if bias else [])
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for mine, ref in zip(ours, theirs):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-6)
    assert ours[0][::7].abs().sum() == 0 and ours[0][1::7].abs().sum() > 0
    valid = targets != -100
    assert correct.item() == ((logits.argmax(-1) == targets) & valid).sum().item()
    assert linear_cross_entropy(hidden, weight, targets, b, rows=8)[1].item() == 0


def test_linear_cross_entropy_without_gradients_computes_the_same_loss():
    torch.manual_seed(1)
    hidden, weight = torch.randn(30, 8), torch.randn(50, 8)
    targets = torch.randint(0, 50, (30,))
    with torch.no_grad():
        loss, _ = linear_cross_entropy(hidden, weight, targets, rows=7)
    reference = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert not loss.requires_grad


def _gpt_batch(cache_dir, real_text, *overrides):
    recipe = tiny("gpt", "unused", cache_dir, real_text, *overrides)
    data = prepare(recipe)
    batch = data.objective.collator(recipe.resolved_phases()[0])(
        IndexedDataset(data.train).__getitems__([0, 1, 2, 3]))
    return data.objective, batch


def test_gpt_training_gradients_equal_transformers_loss_gradients(cache_dir, real_text):
    from transformers import GPT2LMHeadModel

    objective, batch = _gpt_batch(cache_dir, real_text)
    module = objective.build_models()["model"].train()  # the tiny recipe has no dropout
    sums = module(**batch)
    assert set(sums) == {"lm_loss_sum"}  # no full-vocabulary argmax while training
    count = objective.target_counts(batch)["lm"]
    (sums["lm_loss_sum"] / count).backward()
    ours = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    GPT2LMHeadModel.forward(module.model, input_ids=batch["input_ids"],
                            labels=batch["labels"]).loss.backward()
    for name, param in module.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        evaluated = module.eval()(**batch)
    logits = module.model(input_ids=batch["input_ids"]).logits[:, :-1]
    expected = (logits.argmax(-1) == batch["labels"][:, 1:]).sum().item()
    assert evaluated["lm_correct"].item() == expected > 0


def test_gpt_default_activation_is_gpt2s_gelu_new_in_one_kernel(cache_dir, real_text):
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 10_001)
    torch.testing.assert_close(ACT2FN["gelu_pytorch_tanh"](x), ACT2FN["gelu_new"](x),
                               rtol=0, atol=1e-6)
    objective, _ = _gpt_batch(cache_dir, real_text)
    assert objective.build_models()["model"].model.config.activation_function == (
        "gelu_pytorch_tanh")
    objective, _ = _gpt_batch(cache_dir, real_text, "model.activation_function=gelu_new")
    assert objective.build_models()["model"].model.config.activation_function == "gelu_new"


def test_albert_default_activation_is_albert_gelu_new_in_one_kernel(tmp_path, cache_dir,
                                                                    real_text):
    from overture.config import ConfigError

    def activation(*overrides):
        recipe = tiny("albert", tmp_path / "run", cache_dir, real_text, *overrides)
        return prepare(recipe).objective.build_models()["model"].model.config.hidden_act

    assert activation() == "gelu_pytorch_tanh"  # the same function as gelu_new: above
    assert activation("model.hidden_act=gelu_new") == "gelu_new"  # an explicit one wins
    with pytest.raises(ConfigError, match="model.hidden_act='gelu_fast_please'"):
        tiny("albert", "unused", cache_dir, real_text, "model.hidden_act=gelu_fast_please")


def test_an_unknown_activation_is_refused_naming_the_key(cache_dir, real_text):
    from overture.config import ConfigError

    with pytest.raises(ConfigError, match="model.activation_function='gelu_fast_please'"):
        tiny("gpt", "unused", cache_dir, real_text, "model.activation_function=gelu_fast_please")


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_compiled_training_gives_eager_losses(family, tmp_path, cache_dir, real_text):
    from overture.engine import train

    small = (["model.n_embd=32", "model.n_layer=1", "model.n_head=2"] if family == "gpt" else
             # with the recipe's dropout: overture's CPU masks are drawn as in eager mode
             # (torch's own dropout, compiled, draws its masks from another generator)
             ["model.hidden_size=32", "model.num_hidden_layers=1",
              "model.num_attention_heads=2", "model.intermediate_size=64"])
    from torch._dynamo.utils import counters

    losses = {}
    graphs = counters["stats"]["unique_graphs"]
    for compiled in (False, True):
        run = tmp_path / f"compile-{compiled}"
        train(tiny(family, run, cache_dir, real_text, *small, "train.max_steps=4",
                   "train.log_every=1", "train.eval_every=0", "train.save_every=0",
                   "train.batch_size=8", "data.max_seq_len=64", "model.max_position_embeddings=64"
                   if family == "bert" else "model.n_positions=64",
                   f"train.compile={str(compiled).lower()}"), progress=False)
        losses[compiled] = [r["loss"] for r in records(run).values()]
    assert counters["stats"]["unique_graphs"] > graphs  # compiled, not run eagerly
    torch._dynamo.reset()  # no compiled code or cache kept for the tests after this one
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    if family == "bert":  # the dropout is on: the two runs' losses would differ without it
        from overture.config import load_recipe

        assert load_recipe("bert-tiny").model.hidden_dropout_prob > 0
    assert losses[True][0] != losses[True][-1]  # it trained


def test_every_record_logs_mfu_against_the_cached_peak(tmp_path, cache_dir, real_text,
                                                       monkeypatch):
    from overture.engine import train
    from overture.peak import machine_key

    peak_file = tmp_path / "peak.json"
    monkeypatch.setenv("OVERTURE_PEAK_FILE", str(peak_file))
    peak_file.write_text(json.dumps({machine_key(torch.device("cpu"), torch.float32): 0.25}))
    run = tmp_path / "run"
    train(tiny("gpt", run, cache_dir, real_text, "train.max_steps=4", "train.log_every=2",
               "train.eval_every=0", "model.n_embd=32", "model.n_layer=1", "model.n_head=2"),
          progress=False)
    logged = list(records(run).values())
    assert len(logged) == 2
    for record in logged:
        assert record["tflops"] > 0
        assert record["mfu"] == pytest.approx(record["tflops"] / 0.25, rel=1e-9)
    run = tmp_path / "configured"
    train(tiny("gpt", run, cache_dir, real_text, "train.max_steps=2", "train.log_every=2",
               "train.eval_every=0", "model.n_embd=32", "model.n_layer=1", "model.n_head=2",
               "train.peak_tflops=2.0"), progress=False)
    record = records(run)[2]
    assert record["mfu"] == pytest.approx(record["tflops"] / 2.0, rel=1e-9)


def test_a_measured_peak_is_cached_and_a_remeasure_keeps_the_higher(tmp_path, monkeypatch):
    from overture.peak import machine_key, measured_peak

    peak_file = tmp_path / "peak.json"
    monkeypatch.setenv("OVERTURE_PEAK_FILE", str(peak_file))
    key = machine_key(torch.device("cpu"), torch.float32)
    value, source = measured_peak(torch.device("cpu"))
    assert value > 0.001 and source.startswith("measured float32 GEMM")
    assert json.loads(peak_file.read_text()) == {key: value}
    peak_file.write_text(json.dumps({key: 1e6}))  # a higher value is never lowered
    assert measured_peak(torch.device("cpu"), remeasure=True)[0] == 1e6
    peak_file.write_text("{torn")  # a damaged file is measured again
    assert 0 < measured_peak(torch.device("cpu"))[0] < 1e6


def test_the_peak_is_timed_after_the_warm_up_products(monkeypatch):
    """Matrix units that start slow (a CPU's AMX: its first bf16 products ran at a third
    of its speed) are timed once warm: only products after warmup_s count."""
    from overture import peak

    clock = {"now": 0.0, "calls": 0}

    def mm(a, b):  # 1 s for each of the first 3 products, 0.1 s after
        clock["calls"] += 1
        clock["now"] += 1.0 if clock["calls"] <= 3 else 0.1

    monkeypatch.setattr(peak.torch, "mm", mm)
    monkeypatch.setattr(peak.time, "perf_counter", lambda: clock["now"])
    tflops = peak.measure_gemm_tflops(torch.device("cpu"), torch.float32, size=8,
                                      repeats=4, warmup_s=2.5)
    assert clock["calls"] == 3 + 4  # warm for 3 s (>= 2.5), then 4 timed
    assert tflops == pytest.approx(2 * 8 ** 3 / 0.1 / 1e12)


def test_gpt_attention_runs_in_fp32_on_a_cpu_under_bf16_autocast(monkeypatch):
    """Under bf16 autocast the GPT module's SDPA gets fp32 q, k, v on a CPU (torch's bf16
    CPU attention took twice as long), and its output goes on in bf16; the loss stays
    within bf16's rounding of the stock SDPA's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from overture.pretrain.text.gpt import CausalLMModule

    torch.manual_seed(0)
    def config():  # one each: the implementation is set on the config
        return GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")

    stock = GPT2LMHeadModel(config())
    module = CausalLMModule(GPT2LMHeadModel(config()))
    module.model.load_state_dict(stock.state_dict())
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        # the dtypes the kernel gets: autocast would recast inputs it is on for
        cast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        seen.append(tuple(cast or x.dtype for x in (q, k, v)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 64, (3, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = module(ids, ids)["lm_loss_sum"]
        ours.backward()
        assert seen == [(torch.float32,) * 3] * 2  # both layers, in fp32
        seen.clear()
        hidden = stock.transformer(input_ids=ids).last_hidden_state
        assert seen == [(torch.bfloat16,) * 3] * 2  # the stock SDPA: in bf16
        logits = stock.lm_head(hidden[:, :-1]).float()
    theirs = F.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1), reduction="sum")
    assert ours.item() == pytest.approx(theirs.item(), rel=2e-2)
    assert module.model.transformer.h[0].attn.c_attn.weight.grad is not None
    with torch.no_grad():  # in fp32 nothing changes: the stock SDPA on fp32 inputs
        seen.clear()
        module(ids, ids)
        assert seen == [(torch.float32,) * 3] * 2


def test_linear_cross_entropy_under_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(2)
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = (torch.randn(64, 16) * 0.5).requires_grad_()
    targets = torch.randint(0, 64, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(hidden, weight, targets, rows=16)
    loss.backward()
    assert loss.dtype == torch.float32 and weight.grad.dtype == torch.float32
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)
    for mine, ref in zip(ours, (hidden.grad, weight.grad)):
        assert (mine - ref).abs().max() <= 0.05 * ref.abs().max()


def test_measuring_the_peak_leaves_the_training_generator_alone(tmp_path, monkeypatch):
    from overture.peak import measured_peak

    monkeypatch.setenv("OVERTURE_PEAK_FILE", str(tmp_path / "peak.json"))
    torch.manual_seed(3)
    before = torch.get_rng_state()
    measured_peak(torch.device("cpu"))  # nothing cached: it measures
    assert torch.equal(torch.get_rng_state(), before)


def test_a_peak_that_cannot_be_measured_leaves_the_run_without_mfu(tmp_path, monkeypatch):
    from overture import peak

    monkeypatch.setenv("OVERTURE_PEAK_FILE", str(tmp_path / "peak.json"))

    def fails(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 256 MiB\nmore detail")

    monkeypatch.setattr(peak, "measure_gemm_tflops", fails)
    value, why = peak.run_peak(None, torch.device("cpu"), "no")
    assert value is None and why.endswith("(CUDA out of memory. Tried to allocate 256 MiB)")
    assert peak.run_peak(2.5, torch.device("cpu"), "no") == (2.5, "train.peak_tflops")


@pytest.mark.parametrize("value, shown", [("0", "0.0"), ("-1", "-1.0"), ("nan", "nan")])
def test_a_peak_that_is_not_positive_is_refused_naming_the_key(value, shown, cache_dir,
                                                                real_text):
    from overture.config import ConfigError

    with pytest.raises(ConfigError, match=f"train.peak_tflops={shown} must be a positive"):
        tiny("gpt", "unused", cache_dir, real_text, f"train.peak_tflops={value}")


def test_gpt_unfused_head_under_zero3_gives_the_fused_loss(cache_dir, real_text):
    objective, batch = _gpt_batch(cache_dir, real_text)
    module = objective.build_models()["model"].train()
    fused = module(**batch)["lm_loss_sum"]
    module.fused = False  # what DeepSpeed ZeRO-3 gets
    unfused = module(**batch)["lm_loss_sum"]
    assert unfused.item() == pytest.approx(fused.item(), rel=1e-6)
    module.eval()
    with torch.no_grad():
        unfused_correct = module(**batch)["lm_correct"].item()
        module.fused = True
        assert module(**batch)["lm_correct"].item() == unfused_correct > 0


def test_few_preparation_workers_never_import_torch_and_the_main_process_draws_the_masks(
        tmp_path, cache_dir, real_text):
    import pickle
    import subprocess
    import sys

    # bert-tiny draws static masks: its worker drafts the pairs, finish() masks them
    recipe = tiny("bert", "unused", cache_dir, real_text)
    data = prepare(recipe)
    builder = data.objective.builder(recipe.resolved_phases()[0])
    assert builder.static_masking is not None
    docs = [[line for line in chunk.splitlines() if line.strip()]
            for chunk in real_text.read_text(encoding="utf-8")[:100_000].split("\n \n")]
    docs = [d for d in docs if d]
    (tmp_path / "job.pkl").write_bytes(pickle.dumps((builder, docs)))
    # what a spawned worker does: unpickle the builder, _init_worker, _process_window
    code = ("import pickle, sys; from overture.data import prepare as p; "
            f"builder, docs = pickle.load(open({str(tmp_path / 'job.pkl')!r}, 'rb')); "
            "p._init_worker(builder, (0, 2, False), threads=1); "
            "train, _, _ = p._process_window(0, docs, 0.0); "
            f"pickle.dump(train, open({str(tmp_path / 'drafts.pkl')!r}, 'wb')); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
    drafts = pickle.loads((tmp_path / "drafts.pkl").read_bytes())
    assert [tag for tag, _ in drafts] == ["0-train-0-0", "0-train-0-1"]  # two copies
    assert all("mlm_ids" not in batch.schema.names for _, batch in drafts)
    # finished in this process, the drafts are what one process builds
    finished = [builder.finish(tag, batch) for tag, batch in drafts]
    builder.setup()
    whole, _ = builder.build(docs, "0-train-0", 2)
    assert [b.to_pydict() for b in finished] == [b.to_pydict() for b in whole]
    masked = finished[0].to_pydict()
    assert finished[0].num_rows > 20 and all(len(ids) for ids in masked["mlm_ids"])
    assert masked["input_ids"] != drafts[0][1].to_pydict()["input_ids"]  # corrupted
    # with many workers or copies the workers finish their drafts themselves: the same
    from overture.data import prepare as p

    p._init_worker(builder, (0, 2, True), threads=None)
    in_worker, _, _ = p._process_window(0, docs, 0.0)
    assert [b.to_pydict() for _, b in in_worker] == [b.to_pydict() for b in whole]
    data_cfg = recipe.data
    assert data_cfg.dupe_factor == 2 and p.main_finishes(4, data_cfg)  # 4 x 2 copies
    assert not p.main_finishes(5, data_cfg)  # more would outrun the one main process


def test_compile_without_a_cpu_compiler_is_refused_in_one_line(tmp_path, cache_dir, real_text,
                                                               monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    from overture.config import ConfigError
    from overture.engine import train

    def none(*args, **kwargs):
        raise RuntimeError("Failed to find a working compiler\nlong detail")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", none)
    with pytest.raises(ConfigError, match=r"train.compile=true: .* no compiler \(Failed to find "
                                          r"a working compiler\); install g\+\+"):
        train(tiny("gpt", tmp_path / "run", cache_dir, real_text, "train.compile=true",
                   "train.max_steps=2"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step


def test_gpt_blocks_from_whole_lines_equal_those_from_sentences(cache_dir, real_text):
    # GPT's builder skips the sentence split (its blocks join everything): the same
    # examples, so its cache key rightly stays the same
    from overture.pretrain.text.builders import CausalBlocks

    recipe = tiny("gpt", "unused", cache_dir, real_text)
    data = prepare(recipe)
    builder = data.objective.builder(recipe.resolved_phases()[0])
    builder.setup()
    docs = [[line for line in chunk.splitlines() if line.strip()]
            for chunk in real_text.read_text(encoding="utf-8")[:400_000].split("\n \n")]
    docs = [d for d in docs if d]
    whole, _ = builder.build(docs, "t", 1)
    builder.sentences = True  # the split every other text builder does
    split, _ = builder.build(docs, "t", 1)
    assert CausalBlocks.sentences is False
    assert whole[0].num_rows > 50
    assert whole[0].to_pydict() == split[0].to_pydict()


def test_continued_gpt_keeps_its_checkpoints_activation(tmp_path, cache_dir, real_text):
    from helpers import continued
    from overture.engine import train

    run = tmp_path / "gelu-new"
    train(tiny("gpt", run, cache_dir, real_text, "model.n_embd=32", "model.n_layer=1",
               "model.n_head=2", "model.activation_function=gelu_new", "train.max_steps=1",
               "train.eval_every=0"), progress=False)
    recipe = continued("gpt", run, tmp_path / "next", cache_dir, real_text)
    assert recipe.model.activation_function == "gelu_new"  # not the fresh default
    explicit = continued("gpt", run, tmp_path / "other", cache_dir, real_text,
                         "model.activation_function=gelu_pytorch_tanh")
    assert explicit.model.activation_function == "gelu_pytorch_tanh"  # the user's wins
