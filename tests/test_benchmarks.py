"""Each benchmark script starts and records a result, with a few steps (the benchmarks
themselves are run by hand: ``python -m benchmarks``; no timing is asserted here)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import classify_inputs


@pytest.fixture
def results(tmp_path, monkeypatch):
    """Where the benchmark records go; the libraries' log levels, progress bars and
    warning filters that a benchmark quietens are given back after it."""
    import logging
    import warnings

    import transformers

    folder = tmp_path / "results"
    monkeypatch.setattr("benchmarks.common.RESULTS", folder)
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # given back after
    names = ("transformers", "datasets", "accelerate", "overture", "timm")
    levels = {n: logging.getLogger(n).level for n in names}
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        yield folder
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    transformers.logging.set_verbosity(verbosity)
    if bars:
        transformers.logging.enable_progress_bar()


def _recorded(folder, name: str) -> dict:
    lines = (folder / f"{name}.jsonl").read_text().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["benchmark"] == name and line["machine"]["peak_tflops"] > 0
    # the code measured: this checkout's commit (a checkout without git records None)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if head.returncode == 0:
        assert line["source"]["commit"] == head.stdout.strip()
        assert isinstance(line["source"]["modified"], bool)
    return line


def test_trainer_pretrain_compares_both_sides(results, real_text):
    from benchmarks import trainer_pretrain

    out = trainer_pretrain.main(["--family", "gpt", "bert", "albert", "longformer", "--size",
                                 "128x2",
                                 "--batch", "4", "--seq", "32", "--vocab", "512", "--warmup",
                                 "1", "--steps", "2", "--repeats", "1", "--corpus",
                                 str(real_text)])
    assert [(r["family"], r["size"]) for r in out] == [("gpt", "128x2"), ("bert", "128x2"),
                                                       ("albert", "128x2"),
                                                       ("longformer", "128x2")]
    for r in out:
        assert r["overture"]["median"] > 0 and r["trainer"]["median"] > 0
        assert r["ratio"] == pytest.approx(r["overture"]["median"] / r["trainer"]["median"])
        assert 0 < r["overture_mfu"]["median"] < 1
    assert len(_recorded(results, "trainer_pretrain")["results"]) == 4


def test_a_bf16_comparison_prints_the_peak_its_mfu_column_is_against(tmp_path, real_text):
    """In bf16 the MFU column is against the bf16 matmul peak, not the fp32 one the
    header gives: the line that says so prints the value the runs used. A process of its
    own (Accelerate fixes the precision once per process), with the peaks a measurement
    would have returned."""
    import sys

    root = Path(__file__).resolve().parents[1]
    script = f"""
import pathlib, torch
import benchmarks.common, overture.peak
from benchmarks import trainer_pretrain
benchmarks.common.RESULTS = pathlib.Path({str(tmp_path / "results")!r})
overture.peak.measured_peak = lambda device, dtype=None, remeasure=False: (
    2.0 if dtype == torch.bfloat16 else 0.5, "measured here")
trainer_pretrain.main(["--family", "gpt", "--size", "128x2", "--batch", "4", "--seq",
    "32", "--vocab", "512", "--warmup", "1", "--steps", "2", "--repeats", "1", "--corpus",
    {str(real_text)!r}, "--set", "train.mixed_precision=bf16"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "peak 0.500 TFLOP/s (measured here)" in done.stdout  # the header: fp32
    assert ("both sides in bf16; the MFU column: against 2.000 TFLOP/s (measured here)"
            in done.stdout)
    line = _recorded(tmp_path / "results", "trainer_pretrain")
    assert line["machine"]["bf16_peak_tflops"] == 2.0
    # the column itself: the engine's mfu is its tflops over the same 2.0
    [result] = line["results"]
    assert result["overture_mfu"]["median"] == pytest.approx(
        result["overture_tflops"]["median"] / 2.0, rel=1e-6)


def test_the_trainer_side_of_longformer_gets_the_first_token_global():
    """The stock collator's batch, plus global attention on each row's <s> only."""
    import torch

    from benchmarks.trainer_pretrain import _first_token_global

    def stock(rows):
        return {"input_ids": torch.tensor(rows), "labels": torch.tensor(rows)}

    batch = _first_token_global(stock)([[0, 5, 6, 2], [0, 7, 2, 1]])
    assert batch["global_attention_mask"].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]
    assert batch["input_ids"].tolist() == [[0, 5, 6, 2], [0, 7, 2, 1]]


def test_prepare_vs_map_times_both_sides(results):
    from benchmarks import prepare_vs_map

    out = prepare_vs_map.main(["--family", "gpt", "--size-mb", "0.2", "--num-proc", "1",
                               "--repeats", "1"])
    assert out[0]["overture"]["median"] > 0 and out[0]["map"]["median"] > 0
    assert out[0]["ratio"] == pytest.approx(out[0]["overture"]["median"] / out[0]["map"]["median"])
    _recorded(results, "prepare_vs_map")


def test_image_vs_loop_times_both_sides(results):
    from benchmarks import image_vs_loop

    out = image_vs_loop.main(["--warmup", "1", "--steps", "2", "--repeats", "1", "--set",
                              "data.image_size=16", "data.max_train_examples=64",
                              "train.batch_size=8"])
    assert out[0]["overture"]["median"] > 0 and out[0]["loop"]["median"] > 0
    assert out[0]["ratio"] == pytest.approx(out[0]["overture"]["median"] / out[0]["loop"]["median"])
    assert 0 <= out[0]["data_wait_fraction"]["median"] <= 1
    _recorded(results, "image_vs_loop")


def test_longformer_attention_reports_every_rounds_speedup(results):
    from benchmarks import longformer_attention

    out = longformer_attention.main(["--lengths", "256", "--windows", "32", "--scopes",
                                     "layer", "--no-memory", "--repeats", "2", "--warmup", "0",
                                     "--dropout", "0.1"])
    assert len(out) == 1 and len(out[0]["speedup"]["runs"]) == 2
    rounds = zip(out[0]["transformers_ms"]["runs"], out[0]["overture_ms"]["runs"])
    assert out[0]["speedup"]["runs"] == pytest.approx([t / o for t, o in rounds])
    _recorded(results, "longformer_attention")


def test_features_vs_st_agree_and_are_timed(results, cache_dir, real_text):
    pytest.importorskip("sentence_transformers")
    from benchmarks import features_vs_st

    checkpoint, _ = classify_inputs(cache_dir, real_text)
    out = features_vs_st.main(["--checkpoint", str(checkpoint), "--texts", "40",
                               "--repeats", "1"])
    result = out[0]
    assert result["max_abs_difference"] < 1e-5  # the same embeddings
    assert result["overture"]["median"] > 0 and result["sentence_transformers"]["median"] > 0
    assert result["ratio"] == pytest.approx(
        result["overture"]["median"] / result["sentence_transformers"]["median"])
    # the work: 2 FLOPs per non-embedding weight per real token, at the median rate
    from overture.features import load

    encoder = load(checkpoint, device="cpu")
    weights = sum(p.numel() for n, p in encoder.model.named_parameters()
                  if "embeddings" not in n)
    texts = features_vs_st.texts(40)
    tokens = sum(map(len, encoder.tokenizer(texts, truncation=True)["input_ids"]))
    assert result["overture_tflops"] == pytest.approx(
        2 * weights * tokens * result["overture"]["median"] / 40 / 1e12)
    _recorded(results, "features_vs_st")


def test_profile_step_reports_the_step_and_its_host_syncs(results, cache_dir, real_text):
    from benchmarks import profile_step

    out = profile_step.main(["gpt-tiny", f"data.corpus=[{real_text}]",
                             f"data.cache_dir={cache_dir}", "tokenizer.vocab_size=1024",
                             "train.batch_size=4", "--warmup", "1", "--steps", "2"])
    assert out["per_s"] > 0 and out["ms_per_step"] > 0
    # one parameter-count's worth from CPU fused AdamW plus the non-finite check
    assert out["syncs_per_step"]["aten::item"] >= 1


def test_the_suite_runner_starts_and_says_what_it_skips(results, capsys):
    from benchmarks.__main__ import main

    main(["--only", "features_vs_st", "--features-checkpoint", "/no/such/model"])
    assert "features_vs_st: skipped, no checkpoint at /no/such/model" in capsys.readouterr().out
