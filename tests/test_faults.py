"""Faults a long run must survive, for every registered family: signals, a kill in the
middle of a save, a non-finite loss, a full disk, a second run on the same folder, a
finished run launched again, and resumes with changed settings."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import overture.engine as engine
import overture.stopping as stopping
from helpers import records, tiny
from overture.checkpoint import complete_checkpoints, latest_checkpoint
from overture.config import ConfigError
from overture.registry import build_objective
from overture.engine import train
from overture.loaders import EpochSampler
from overture.state import TrainState
from overture.errors import Interrupted, NonFiniteLoss, SaveFailed
from overture.registry import get_family, list_families

FAMILIES = list_families()
STEPS = 12
# every step saved, logged every 5: a stop at step 7 falls between two log records
BASE = (f"train.max_steps={STEPS}", "train.save_every=1", "train.log_every=5",
        "train.eval_every=0", "train.keep_last=20", "train.eval_batches=2")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir, real_text):
    """Each family's uninterrupted run: run folder, once per module."""
    runs = {}

    def get(family: str) -> Path:
        if family not in runs:
            run = tmp_path_factory.mktemp(f"straight-{family}") / "run"
            train(tiny(family, run, cache_dir, real_text, *BASE), progress=False)
            runs[family] = run
        return runs[family]

    return get


def _losses(run: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in records(run).items()}


def _signal_at(monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Deliver ``signum`` to this process while optimizer step ``step`` runs."""
    original = engine.train_step

    def wrapped(trainer, micro_batches, accelerator, cfg, at):
        out = original(trainer, micro_batches, accelerator, cfg, at)
        if at + 1 == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(engine, "train_step", wrapped)


@pytest.mark.parametrize("family", FAMILIES)
def test_sigterm_saves_the_step_and_the_relaunch_matches_an_uninterrupted_run(
        family, tmp_path, monkeypatch, cache_dir, real_text, straight):
    run = tmp_path / "run"
    # no periodic saves: the checkpoint at step 7 is the one the signal asked for
    recipe = tiny(family, run, cache_dir, real_text, *BASE, "train.save_every=0")
    handler = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        _signal_at(patch, 7)
        with pytest.raises(Interrupted) as stopped:
            train(recipe, progress=False)
    assert stopped.value.exit_code == 143 and "step 7" in str(stopped.value)
    assert latest_checkpoint(run).name == "step-000007"
    assert not (run / "final").exists()  # an interrupted run is not finished
    assert signal.getsignal(signal.SIGTERM) is handler  # handlers restored
    train(recipe, progress=False)
    expected, got = _losses(straight(family)), _losses(run)
    assert sorted(got) == sorted(expected) == [5, 10, 12]
    for step in expected:  # step 10 averages steps 6-10, across the interruption
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step


def test_ctrl_c_on_the_command_line_exits_130_without_a_traceback(tmp_path, cache_dir,
                                                                   real_text):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "overture", "pretrain", "bert-tiny",
               f"data.corpus=[{real_text}]", f"data.cache_dir={cache_dir}",
               f"output_dir={run}", "data.num_proc=1", "tokenizer.vocab_size=1024",
               "tokenizer.min_frequency=1", "train.max_steps=100000", "train.log_every=1",
               "train.save_every=0", "train.eval_every=0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    metrics = run / "metrics.jsonl"
    while process.poll() is None and not (
            metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("interrupted: stopped by SIGINT at step "), err[-2000:]
    saved = latest_checkpoint(run)
    state = json.loads((saved / "train_state.json").read_text())
    assert state["step"] >= 3 and not state["finished"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_preparing_data_ends_in_one_line_and_leaves_no_half_cache(
        tmp_path, real_text, signum):
    """`overture prepare` (no training loop to save from): SIGTERM or Ctrl-C ends it with
    exit 143 / 130, one line, no half-built cache folder and no workers left (SIGTERM had
    ended it silently, leaving cache/examples/KEY.tmp-PID)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(real_text.read_text(encoding="utf-8") * 8, encoding="utf-8")
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "overture", "prepare", "bert-tiny",
               f"data.corpus=[{corpus}]", f"data.cache_dir={cache}", "data.num_proc=2",
               "data.chunk_mb=0.25", "tokenizer.vocab_size=1024", "tokenizer.train_max_mb=1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    # the examples' progress bar past 0% ("prepare:   3%|"): windows are coming back from
    # busy workers (the log line "overture.data.prepare: prepared ..." comes after)
    while not re.search(rb"prepare:\s+[1-9]\d*%", seen):
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, seen.decode(errors="replace")[-2000:]
        seen += chunk
    workers = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    err = (seen + err).decode(errors="replace")
    assert process.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last == (f"stopped by {signal.Signals(signum).name} (nothing half-written was "
                    "kept; run the same command again)")
    examples = cache / "examples"
    assert examples.is_dir() and not list(examples.iterdir())  # nothing whole, nothing half
    assert not list(cache.rglob("*.tmp-*"))
    assert workers  # the two workers (and multiprocessing's resource tracker)
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_ctrl_c_during_features_ends_with_its_line_after_the_progress_bar(tmp_path,
                                                                           trained):
    """The bar of `overture features` is drawn outside any `with`: the interruption's
    line is printed after it is ended, not glued to it or redrawn over it."""
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"Sentence number {i} of a long input.\n"
                             for i in range(200_000)))
    output = tmp_path / "features.npy"
    process = subprocess.Popen(
        [sys.executable, "-m", "overture", "features", "--checkpoint", str(trained("bert")),
         "--input", str(texts), "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    while not re.search(rb"[1-9]\d*/200000 \[", seen):  # the bar has moved
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, seen.decode(errors="replace")[-2000:]
        seen += chunk
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    err = (seen + err).decode(errors="replace")
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.replace("\r", "\n").strip().splitlines()[-1] == (
        "stopped by SIGINT (nothing half-written was kept; run the same command again)")
    assert not output.exists() and not list(tmp_path.glob("*.tmp*"))


def test_a_signal_inside_a_deferred_block_takes_effect_when_it_ends():
    """Spawning a worker is not cut in two: SIGTERM inside ``interruptions_deferred`` is
    raised once the block is done, and the handlers are given back after."""
    from overture.interrupts import Terminated, interruptions_deferred, interrupts_raise

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM already has a handler in this process")
    finished = []
    with pytest.raises(Terminated), interrupts_raise(signal.SIGTERM):
        with interruptions_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler has run by now, and was told to wait
            finished.append(True)
        finished.append(False)  # never reached: raised as the block ended
    assert finished == [True]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _kill_during_save(step: int) -> str:
    """Python that runs the overture CLI, SIGKILLing itself while writing checkpoint
    ``step`` (after the model and optimizer files, before it is marked complete)."""
    return f"""
import os, signal, sys
import accelerate
original = accelerate.Accelerator.save_state
def save_state(self, output_dir, **kw):
    result = original(self, output_dir, **kw)
    if output_dir.endswith("step-{step:06d}.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    return result
accelerate.Accelerator.save_state = save_state
from overture.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_in_the_middle_of_a_save_resumes_from_the_previous_checkpoint(
        tmp_path, cache_dir, real_text, straight):
    run = tmp_path / "run"
    args = ["pretrain", "bert-tiny", f"data.corpus=[{real_text}]",
            f"data.cache_dir={cache_dir}", f"output_dir={run}", "data.num_proc=1",
            "tokenizer.vocab_size=1024", "tokenizer.min_frequency=1", *BASE]
    done = subprocess.run([sys.executable, "-c", _kill_during_save(8), *args],
                          capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (run / "checkpoints" / "step-000008.tmp").is_dir()  # the half-written save
    assert latest_checkpoint(run).name == "step-000007"
    # what other interrupted writes leave: a save of a step never reached again, an export
    (run / "checkpoints" / "step-000099.tmp").mkdir()
    (run / "final.tmp-4242").mkdir()
    train(tiny("bert", run, cache_dir, real_text, *BASE), progress=False)
    assert not list((run / "checkpoints").glob("*.tmp"))  # cleared at the restart
    assert not list(run.glob("*.tmp-*"))
    expected, got = _losses(straight("bert")), _losses(run)
    assert got[12] == pytest.approx(expected[12], abs=1e-5)


def test_a_build_left_by_a_killed_process_is_removed_by_the_next_build_on_its_host(tmp_path):
    """kill -9 during a cache build leaves its working folder (nothing runs then to remove
    it); the next build of that cache on the same host removes it, and only it: a running
    build's folder (told apart by its lock, not its pid, which repeats across containers),
    another host's (a shared cache) and another cache's stay."""
    import socket

    from overture.atomic import building_dir

    dest = tmp_path / "examples" / "KEY"
    script = ("import sys, time\nfrom overture.atomic import building_dir\n"
              "with building_dir(sys.argv[1]) as tmp:\n"
              "    (tmp / 'part').write_text('x')\n    print(tmp, flush=True)\n"
              "    time.sleep(120)\n")
    builds = [subprocess.Popen([sys.executable, "-c", script, str(dest)],
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        killed, running = (Path(b.stdout.readline().strip()) for b in builds)
        builds[0].kill()
        builds[0].wait()
        host = socket.gethostname()
        elsewhere = dest.with_name(f"KEY.tmp-{host}x-abcdefgh")
        other_key = dest.with_name(f"KEY2.tmp-{host}-abcdefgh")
        for folder in (elsewhere, other_key):
            (folder / "part").mkdir(parents=True)
        assert killed.is_dir() and killed.name.startswith(f"KEY.tmp-{host}-")
        with building_dir(dest) as tmp:
            assert tmp.name.startswith(f"KEY.tmp-{host}-") and tmp not in (killed, running)
            # the umask's permissions, as mkdir gives: a shared cache stays readable
            (tmp_path / "plain").mkdir()
            assert tmp.stat().st_mode == (tmp_path / "plain").stat().st_mode
            assert not killed.exists()
            assert (running / "part").is_file()
            assert elsewhere.is_dir() and other_key.is_dir()
    finally:
        for b in builds:
            b.kill()
            b.wait()


def test_a_torn_metrics_line_is_reported_then_cut_back_at_the_resume(
        tmp_path, cache_dir, real_text, straight, capsys, caplog):
    """A kill -9 mid-write leaves half a record as the last line of metrics.jsonl:
    `report` plots the rest and names the line; the resumed run cuts the log back to the
    complete records up to its checkpoint, so no record is glued to the torn one."""
    import shutil

    from overture.cli import main

    run = tmp_path / "run"
    shutil.copytree(straight("bert"), run)
    for folder in complete_checkpoints(run):  # killed after step 10 was logged, before 11
        if int(folder.name.split("-")[1]) > 7:
            shutil.rmtree(folder)
    log = run / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    step_10 = next(i for i, line in enumerate(lines) if json.loads(line)["step"] == 10)
    log.write_text("".join(lines[:step_10 + 1]) + lines[step_10 + 1][:30])  # torn
    torn_line = step_10 + 2

    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"skipped torn line(s) {torn_line}" in err
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"

    with caplog.at_level("WARNING", logger="overture.metrics_log"):
        train(tiny("bert", run, cache_dir, real_text, *BASE), progress=False)
    said = " ".join(r.getMessage() for r in caplog.records if r.name == "overture.metrics_log")
    assert f"dropped 1 torn line(s) (line {torn_line})" in said
    assert "dropped 1 record(s) past step 7" in said  # step 10's, logged again below
    text = log.read_text()
    assert text.endswith("\n")
    every = [json.loads(line) for line in text.splitlines()]  # each line whole
    assert [r["step"] for r in every if r["split"] == "train"] == [5, 10, 12]
    assert _losses(run) == pytest.approx(_losses(straight("bert")), abs=1e-5)
    assert main(["report", str(run)]) == 0
    assert "torn" not in capsys.readouterr().err


def _nan_at(monkeypatch, family: str, steps: set[int]) -> None:
    """Make the training loss NaN at the given optimizer steps (1-based)."""
    cls = get_family(family)
    original_forward, original_step = cls.forward, engine.train_step
    current = {"step": 0}

    def forward(self, models, batch, update):
        out = original_forward(self, models, batch, update)
        if update is not None and current["step"] in steps:
            out = {k: v * float("nan") if k.endswith("_loss_sum") else v
                   for k, v in out.items()}
        return out

    def train_step(trainer, micro_batches, accelerator, cfg, step):
        current["step"] = step + 1
        return original_step(trainer, micro_batches, accelerator, cfg, step)

    monkeypatch.setattr(cls, "forward", forward)
    monkeypatch.setattr(engine, "train_step", train_step)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_nan_loss_stops_the_run_at_once_and_keeps_the_last_checkpoint(
        family, tmp_path, monkeypatch, cache_dir, real_text):
    run = tmp_path / "run"
    _nan_at(monkeypatch, family, {5})
    with pytest.raises(NonFiniteLoss) as stopped:
        train(tiny(family, run, cache_dir, real_text, *BASE), progress=False)
    assert stopped.value.exit_code == 3
    assert "non-finite loss at step 5" in str(stopped.value)
    last = latest_checkpoint(run)
    assert last.name == "step-000004" and "step-000004" in str(stopped.value)
    weights = last / "model.safetensors"
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(weights).values())


@pytest.mark.parametrize("family", FAMILIES)
def test_nan_steps_within_the_allowance_are_skipped_and_counted(
        family, tmp_path, monkeypatch, cache_dir, real_text, straight):
    import accelerate

    run = tmp_path / "run"
    _nan_at(monkeypatch, family, {3})
    # a skipped step must not reach clipping: under fp16 it would unscale the gradients
    # of a step never taken, and the scaler refuses the next unscale
    clipped = []
    clip = accelerate.Accelerator.clip_grad_norm_
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_",
                        lambda self, *a, **k: clipped.append(1) or clip(self, *a, **k))
    recipe = tiny(family, run, cache_dir, real_text, *BASE, "train.max_nonfinite_steps=1",
                  "train.max_grad_norm=1.0")  # the GAN recipes do not clip by default
    train(recipe, progress=False)
    logged = records(run)
    assert logged[5]["nonfinite_steps"] == 1 and logged[12]["nonfinite_steps"] == 1
    assert all(v == v for v in logged[5].values() if isinstance(v, float))  # no NaN
    # the skipped step changed nothing: up to it, the run is the uninterrupted one
    state = json.loads((latest_checkpoint(run) / "train_state.json").read_text())
    assert state["nonfinite_steps"] == 1 and state["step"] == STEPS
    # every step but the skipped one, once per update (a GAN's two run at every step here)
    updates = build_objective(recipe).updates()
    assert all(u.every == 1 for u in updates)
    assert len(clipped) == (STEPS - 1) * len(updates)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_full_disk_at_save_is_one_error_and_the_previous_checkpoint_stays(
        family, tmp_path, monkeypatch, cache_dir, real_text):
    import accelerate

    run = tmp_path / "run"
    original = accelerate.Accelerator.save_state

    def save_state(self, output_dir, **kw):
        if output_dir.endswith("step-000003.tmp"):
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, output_dir, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    with pytest.raises(SaveFailed) as failed:
        train(tiny(family, run, cache_dir, real_text, *BASE), progress=False)
    message = str(failed.value)
    assert "No space left on device" in message and "step-000002" in message
    assert [p.name for p in complete_checkpoints(run)] == ["step-000001", "step-000002"]
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, cache_dir, real_text):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a") as held:  # what the first run holds while it trains
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345 on elsewhere\n")
        held.flush()
        with pytest.raises(ConfigError, match="in use by another run .pid 12345"):
            train(tiny("bert", run, cache_dir, real_text, *BASE), progress=False)
    assert not (run / "metrics.jsonl").exists()  # the second run wrote nothing


@pytest.mark.parametrize("family", FAMILIES)
def test_a_finished_run_launched_again_leaves_final_untouched(family, tmp_path, cache_dir,
                                                              real_text):
    run = tmp_path / "run"
    recipe = tiny(family, run, cache_dir, real_text, *BASE)
    train(recipe, progress=False)
    weights = run / "final" / "model.safetensors"
    if not weights.exists():  # a text-to-image final/: the generator is what it exports
        weights = run / "final" / "generator.safetensors"
    before = (weights.stat().st_mtime_ns, weights.read_bytes())
    lines = (run / "metrics.jsonl").read_text()
    assert train(recipe, progress=False) == run / "final"
    assert (weights.stat().st_mtime_ns, weights.read_bytes()) == before
    assert (run / "metrics.jsonl").read_text() == lines
    # asking for more steps is asking to continue: it trains on and exports again
    train(tiny(family, run, cache_dir, real_text, *BASE, "train.max_steps=14"),
          progress=False)
    assert max(records(run)) == 14
    assert json.loads((latest_checkpoint(run) / "train_state.json").read_text())["step"] == 14
    if not recipe.train.best_metric:  # with one, final/ stays the best evaluation's model
        assert weights.read_bytes() != before[1]


def test_unwritable_output_dirs_fail_in_one_line_with_exit_2(tmp_path, capsys, real_text,
                                                             cache_dir):
    from overture.cli import main

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for output in ("/proc/overture-test", a_file / "run"):
        code = main(["pretrain", "bert-tiny", f"output_dir={output}",
                     f"data.corpus=[{real_text}]", f"data.cache_dir={cache_dir}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("error: output_dir=") and \
            "cannot be written" in err[-1], err


def test_a_run_that_fails_on_bad_input_leaves_no_folder(tmp_path, cache_dir):
    run = tmp_path / "runs" / "finetune" / "run"  # parents made for it go too
    with pytest.raises(ConfigError):
        train(tiny("bert", run, cache_dir, tmp_path / "missing.txt", *BASE), progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change", ["train.seed=7", "data.max_seq_len=32",
                                    "objective.masking=dynamic", "tokenizer.vocab_size=512",
                                    "data.corpus=[{other}]"])
def test_resuming_with_changed_data_or_model_settings_is_refused_naming_them(
        change, tmp_path_factory, cache_dir, real_text, straight):
    other = tmp_path_factory.mktemp("other") / "other.txt"
    other.write_text(real_text.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    run = straight("bert")
    key = change.split("=")[0]
    recipe = tiny("bert", run, cache_dir, real_text, *BASE, "train.max_steps=20",
                  change.format(other=other))
    with pytest.raises(ConfigError, match=rf"{key}: .* -> "):
        train(recipe, progress=False)


def test_resuming_with_max_steps_below_the_checkpoint_is_refused(straight, cache_dir,
                                                                  real_text):
    recipe = tiny("bert", straight("bert"), cache_dir, real_text, *BASE, "train.max_steps=5")
    with pytest.raises(ConfigError, match=r"at step 12, past this recipe's 5 steps"):
        train(recipe, progress=False)


def test_nan_and_infinite_settings_are_refused_naming_the_key(cache_dir, real_text):
    for value in (".nan", ".inf"):
        with pytest.raises(ConfigError, match="train.lr=.* must be a positive finite number"):
            tiny("bert", "unused", cache_dir, real_text, f"train.lr={value}")


def test_resuming_with_a_new_learning_rate_uses_it_from_the_next_step(
        tmp_path, cache_dir, real_text):
    run = tmp_path / "run"
    constant = ("train.lr_schedule=constant", "train.warmup_steps=0")
    train(tiny("bert", run, cache_dir, real_text, *BASE, *constant, "train.max_steps=5"),
          progress=False)
    train(tiny("bert", run, cache_dir, real_text, *BASE, *constant, "train.lr=0.0123"),
          progress=False)
    assert records(run)[10]["lr"] == pytest.approx(0.0123)


def test_the_data_position_is_resharded_for_a_new_batch_size(tmp_path, monkeypatch,
                                                              cache_dir, real_text):
    """Batches of 8 for 3 steps, then batches of 4: the resumed run starts at example 24
    of the epoch's order, so the two runs together see a prefix of it, no example twice."""
    from helpers import prepare
    from overture.data.prepare import IndexedDataset

    run = tmp_path / "run"
    first = tiny("bert", run, cache_dir, real_text, *BASE, "train.batch_size=8",
                 "train.max_steps=3")
    size = len(prepare(first).train)
    fetched: list[list[int]] = []  # the loader fetches a batch ahead of the one trained
    trained_on: list[int] = []
    get_items, micro_batches = IndexedDataset.__getitems__, engine.micro_batches

    def fetch(self, indices):
        if len(self.dataset) == size:
            fetched.append(list(indices))
        return get_items(self, indices)

    def consume(*args):
        for batch in micro_batches(*args):
            trained_on.extend(fetched.pop(0))
            yield batch

    monkeypatch.setattr(IndexedDataset, "__getitems__", fetch)
    monkeypatch.setattr(engine, "micro_batches", consume)
    train(first, progress=False)
    fetched.clear()
    train(tiny("bert", run, cache_dir, real_text, *BASE, "train.batch_size=4",
               "train.max_steps=9"), progress=False)
    order = list(EpochSampler(size, first.train.seed))
    assert trained_on == order[:3 * 8 + 6 * 4]


def test_a_data_position_that_does_not_divide_into_the_new_batches_is_refused():
    state = TrainState(batch_in_epoch=5, world_size=2, batch_size=4)  # 40 examples
    with pytest.raises(ConfigError, match="not a multiple of 24"):
        state.reshard(3, 8)
    state.reshard(1, 8)
    assert (state.batch_in_epoch, state.world_size, state.batch_size) == (5, 1, 8)
    state.reshard(4, 2)
    assert state.batch_in_epoch == 5


def test_loss_scaler_skips_are_counted_apart_from_nonfinite_steps(tmp_path, monkeypatch,
                                                                   cache_dir, real_text):
    """fp16's loss scaler skips steps whose gradients overflow (normal early in a run;
    there is no scaler on CPU, so Accelerate's report of it is stubbed here)."""
    import accelerate

    calls = {"n": 0}

    def skipped(self):
        calls["n"] += 1
        return calls["n"] in (2, 3)

    monkeypatch.setattr(accelerate.optimizer.AcceleratedOptimizer, "step_was_skipped",
                        property(skipped))
    run = tmp_path / "run"
    train(tiny("bert", run, cache_dir, real_text, *BASE, "train.save_every=0"),
          progress=False)
    logged = records(run)
    assert logged[5]["scaler_skipped_steps"] == 2 and logged[12]["scaler_skipped_steps"] == 2
    assert logged[12]["nonfinite_steps"] == 0


def test_a_resume_from_an_earlier_checkpoint_drops_the_abandoned_later_ones(
        tmp_path, cache_dir, real_text, straight):
    """Checkpoints 3 and 9 in the folder, resumed from 3 to step 5 with keep_last=1: the
    one just saved stays (not the step-9 one of the abandoned history, which a crash
    would otherwise resume from)."""
    import shutil

    run = tmp_path / "run"
    for step in ("step-000003", "step-000009"):
        shutil.copytree(straight("bert") / "checkpoints" / step, run / "checkpoints" / step)
    start = run / "checkpoints" / "step-000003"
    train(tiny("bert", run, cache_dir, real_text, *BASE, "train.max_steps=5",
               "train.keep_last=1", f"train.resume={start}"), progress=False)
    assert [p.name for p in complete_checkpoints(run)] == ["step-000005"]


def test_a_third_signal_quits_at_once(monkeypatch):
    """The first signal asks for a save at the end of the step; a second (the launcher
    forwarding Ctrl-C as SIGTERM) changes nothing; the third exits without waiting."""
    exits = []
    monkeypatch.setattr(stopping.os, "_exit", exits.append)
    stop = stopping.StopSignals()
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            os.kill(os.getpid(), signum)
            assert stop.signum == signal.SIGINT and exits == []
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [128 + signal.SIGINT]
    finally:
        stop.restore()


def test_a_signal_at_the_last_step_is_finished_by_one_relaunch(tmp_path, cache_dir, real_text,
                                                                monkeypatch, caplog):
    """SIGTERM during the very last step saves it unfinished; the relaunch trains nothing,
    exports final/ and marks the run finished, so a third launch changes nothing."""
    run = tmp_path / "run"
    recipe = tiny("bert", run, cache_dir, real_text, *BASE, "train.save_every=0")
    with monkeypatch.context() as patch:
        _signal_at(patch, STEPS)
        with pytest.raises(Interrupted):
            train(recipe, progress=False)
    assert not (run / "final").exists()
    train(recipe, progress=False)
    assert json.loads((latest_checkpoint(run) / "train_state.json").read_text())["finished"]
    exported = (run / "final" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="overture.engine"):
        train(recipe, progress=False)
    assert "already holds this finished run" in caplog.text
    assert (run / "final" / "model.safetensors").stat().st_mtime_ns == exported
