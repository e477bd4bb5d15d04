"""Data-parallel runs on two CPU processes, launched as a user launches them:
`accelerate launch --config_file recipes/accelerate/cpu-2proc-ddp.yaml ...`.

- each process gets its own shard of every epoch, and the two shards of a step are the
  batch one process takes at twice the batch size (in-process, engine's loader);
- two processes at batch B give the per-step losses of one process at batch 2B, for every
  registered pretraining family;
- `kill -9` of the launcher and its workers after a checkpoint, then the same command
  again: the run resumes and ends with the uninterrupted run's losses;
- the Accelerate config files in recipes/accelerate load with Accelerate's own loader and
  pass overture.launch.check_accelerate_config; its refusals name the problem.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import records, text_families
from overture.checkpoint import latest_checkpoint
from overture.config import ConfigError, load_recipe
from overture.launch import check_accelerate_config, configure_accelerator

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"
CPU_DDP = CONFIGS / "cpu-2proc-ddp.yaml"
FAMILIES = text_families()
B = 4  # per process; the one-process runs take 2 * B
STEPS = {"bert": 24}  # bert also serves the kill test: long enough to be killed mid-run
SAVE_EVERY = 4

# One launch trains every family in turn (the import of the stack costs ~5 s a process
# on these 2 cores): the same argv a user gives `overture`, through overture.cli.main.
# train() ends with accelerator.end_training(), which destroys the process group; here
# it must live on for the next family, so only trackers are finished in between.
DRIVER = """
import json, sys
from accelerate import Accelerator
from overture.cli import _main as main  # without the clean exit after the first
from overture.launch import exit_process
Accelerator.end_training = lambda self: [t.finish() for t in self.trackers]
code = 0
for argv in json.loads(open(sys.argv[1]).read()):
    code = code or main(argv)
exit_process(code)
"""


def _overrides(family: str, run_dir, cache_dir, corpus, batch_size: int) -> list[str]:
    """tests/helpers.py tiny()'s settings (shared cache), every dropout of the model
    section at 0 (the processes' dropout masks differ by design), one record per step."""
    base = [f"data.corpus=[{corpus}]", f"data.cache_dir={cache_dir}", "data.num_proc=1",
            "tokenizer.vocab_size=1024", "tokenizer.min_frequency=1"]
    model = load_recipe(f"{family}-tiny", base).model
    zero = [f"model.{f.name}=0.0" for f in dataclasses.fields(model)
                  if "dropout" in f.name or "pdrop" in f.name]
    steps = STEPS.get(family, 6)
    return [*base, *zero, f"output_dir={run_dir}", f"train.batch_size={batch_size}",
            f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=0",
            f"train.save_every={SAVE_EVERY if family in STEPS else 0}", "train.keep_last=2",
            "train.warmup_steps=2", "train.eval_batches=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_command(*args: str) -> list[str]:
    """`accelerate launch --config_file recipes/accelerate/cpu-2proc-ddp.yaml ARGS` on a
    free port (other test runs may share the machine)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
            "--main_process_port", str(_free_port()), *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _losses(run: Path) -> dict[int, dict]:
    """Per step: the losses and the units seen, from metrics.jsonl."""
    out = {}
    for step, record in records(run).items():
        out[step] = {k: v for k, v in record.items()
                     if k == "loss" or k.endswith("_loss") or k.endswith("_seen")}
    return out


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    for step in want:
        for key, value in want[step].items():
            assert got[step][key] == pytest.approx(value, abs=1e-5), (what, step, key,
                                                                       got[step][key], value)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir, real_text):
    """For every family: a one-process run at batch 2B (in this process; it also builds
    the shared cache) and a two-process run at batch B (one `accelerate launch` for all)."""
    from overture.engine import train

    work = tmp_path_factory.mktemp("multiprocess")
    one, two, plans = {}, {}, []
    started = time.perf_counter()
    for family in FAMILIES:
        one[family], two[family] = work / f"{family}-1x{2 * B}", work / f"{family}-2x{B}"
        train(load_recipe(f"{family}-tiny", _overrides(family, one[family], cache_dir,
                                                        real_text, 2 * B)), progress=False)
        plans.append(["pretrain", f"{family}-tiny",
                      *_overrides(family, two[family], cache_dir, real_text, B)])
    (work / "plans.json").write_text(json.dumps(plans))
    (work / "driver.py").write_text(DRIVER)
    print(f"one-process runs: {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                    os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(_launch_command(str(work / "driver.py"), str(work / "plans.json")),
                          capture_output=True, text=True, env=env, timeout=600)
    print(f"two-process launch: {time.perf_counter() - started:.1f} s")
    assert done.returncode == 0, done.stderr[-4000:]
    return SimpleNamespace(one=one, two=two, work=work)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_at_batch_b_give_the_losses_of_one_at_2b(family, runs):
    """Per step, every loss and the units seen of the two-process run equal those of one
    process with the whole global batch: the shards are the halves of the same batch,
    dynamic masks are drawn per example, and the loss is normalised over both
    processes."""
    checkpoint = latest_checkpoint(runs.two[family])
    # both ranks took part: each saved its own RNG state in the checkpoint
    assert (checkpoint / "random_states_0.pkl").is_file()
    assert (checkpoint / "random_states_1.pkl").is_file()
    assert not (latest_checkpoint(runs.one[family]) / "random_states_1.pkl").exists()
    straight = _losses(runs.one[family])
    _assert_same(_losses(runs.two[family]), straight, family)


class _Recorder:
    """A collator that returns the example indices of its batch."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, rows: dict) -> torch.Tensor:
        return torch.tensor(rows["indices"])


class _Examples:
    """Stands in for a datasets.Dataset: len, a length column, rows by index list."""

    column_names = ["length"]

    def __init__(self, size: int):
        self.lengths = [(i * 7919) % 61 + 3 for i in range(size)]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, key):
        if key == "length":
            return self.lengths
        return {"length": [self.lengths[i] for i in key]}


def _stream(monkeypatch, recipe, rank: int, world: int, steps: int, skip: int = 0):
    """The micro-batches (index lists) that rank ``rank`` of ``world`` draws through the
    engine's own train loader and stream, sharded by Accelerate's real data-loader
    preparation (the process count and rank faked on the one in-process Accelerator).
    With ``skip``: a fresh loader resumed at the data position after ``skip`` steps."""
    from accelerate import Accelerator

    from overture import loaders
    from overture.state import TrainState

    accelerator = Accelerator(cpu=True)
    phase = recipe.resolved_phases()[0]
    collator = _Recorder()
    with monkeypatch.context() as patch:
        patch.setattr(Accelerator, "num_processes", property(lambda self: world))
        patch.setattr(Accelerator, "process_index", property(lambda self: rank))

        def stream(state):
            loader, sampler = loaders.train_loader(_Examples(203), collator, phase, recipe,
                                                   accelerator)
            return loaders.micro_batches(loader, sampler, state)

        state = TrainState()
        batches = stream(state)
        out = [next(batches).tolist() for _ in range(skip or steps)]
        if skip:
            batches = stream(TrainState(epoch=state.epoch,
                                               batch_in_epoch=state.batch_in_epoch))
            out += [next(batches).tolist() for _ in range(steps - skip)]
    return out


@pytest.mark.parametrize("group_by_length", [False, True])
def test_each_process_sees_a_disjoint_shard_and_together_the_whole_epoch(
        monkeypatch, group_by_length):
    """Rank 0 and rank 1 at batch B: per step, their batches are the two halves of the
    single-process batch of 2B; per epoch, disjoint and together every batch of the
    epoch; over two epochs (and across a resume mid-epoch) the same."""
    recipe = load_recipe("bert-tiny", [f"train.batch_size={B}",
                                       f"train.group_by_length={group_by_length}"])
    big = load_recipe("bert-tiny", [f"train.batch_size={2 * B}",
                                    f"train.group_by_length={group_by_length}"])
    per_epoch = 203 // (2 * B)
    steps = 2 * per_epoch + 3  # into the third epoch
    whole = _stream(monkeypatch, big, 0, 1, steps)
    ranks = [_stream(monkeypatch, recipe, r, 2, steps) for r in (0, 1)]
    resumed = [_stream(monkeypatch, recipe, r, 2, steps, skip=per_epoch + 2) for r in (0, 1)]
    assert resumed == ranks
    for step in range(steps):
        assert ranks[0][step] + ranks[1][step] == whole[step], step
    for epoch in range(2):
        part = slice(epoch * per_epoch, (epoch + 1) * per_epoch)
        seen = [{i for batch in ranks[r][part] for i in batch} for r in (0, 1)]
        assert not seen[0] & seen[1]
        assert len(seen[0]) == len(seen[1]) == per_epoch * B  # no index twice in an epoch
        assert seen[0] | seen[1] == {i for batch in whole[part] for i in batch}
    first, second = (whole[e * per_epoch:(e + 1) * per_epoch] for e in (0, 1))
    assert first != second  # a new order each epoch


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_kill_9_of_launcher_and_workers_then_relaunch_resumes_to_the_same_losses(
        runs, cache_dir, real_text):
    """`overture pretrain` on two processes, killed with SIGKILL (launcher and both
    workers, each in its own process group) once a checkpoint exists; the same command
    again resumes from that checkpoint and every step's losses equal the uninterrupted
    two-process run's."""
    run = runs.work / "bert-killed"
    args = ["-m", "overture", "pretrain", "bert-tiny",
            *_overrides("bert", run, cache_dir, real_text, B)]
    first = run.parent / "bert-killed.log"
    with open(first, "w") as log:
        launcher = subprocess.Popen(_launch_command(*args), stdout=log, stderr=subprocess.STDOUT,
                                    env=_env(), start_new_session=True)
    marker = run / "checkpoints" / f"step-{SAVE_EVERY:06d}" / "COMPLETE"
    deadline = time.monotonic() + 300
    try:
        while not marker.exists():
            assert launcher.poll() is None, first.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        workers = _descendants(launcher.pid)
        for pid in [launcher.pid, *workers]:  # torchrun starts each worker in a new session
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    assert launcher.returncode == -signal.SIGKILL
    assert len(workers) >= 2, workers
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers)
    assert not (run / "final").exists(), "the run ended before the kill; kill it sooner"
    killed_at = max(records(run))
    resumed_from = int(latest_checkpoint(run).name.split("-")[1])
    assert SAVE_EVERY <= resumed_from <= killed_at < STEPS["bert"]

    relaunched = time.time()
    done = subprocess.run(_launch_command(*args), capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    # the log: every step once. Those up to the checkpoint are the first launch's records
    # (not started over); the steps logged after it before the kill were dropped and
    # logged again by the relaunch
    assert [r["step"] for r in logged] == list(range(1, STEPS["bert"] + 1))
    assert all((r["time"] < relaunched) == (r["step"] <= resumed_from) for r in logged)
    _assert_same(_losses(run), _losses(runs.two["bert"]), "resumed")
    assert (run / "final" / "config.json").is_file()


# ------------------------------------------------------------------ the config files

EXPECTED_CONFIGS = {
    "single-gpu.yaml": "NO", "multi-gpu-ddp.yaml": "MULTI_GPU",
    "fsdp-full-state-dict.yaml": "FSDP", "fsdp-sharded-state-dict.yaml": "FSDP",
    "deepspeed-zero2.yaml": "DEEPSPEED", "deepspeed-zero3.yaml": "DEEPSPEED",
    "cpu-2proc-ddp.yaml": "MULTI_GPU",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIGS))
def test_bundled_accelerate_configs_load_and_fit_the_recipes(name, cache_dir):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(CONFIGS / name))
    assert loaded.distributed_type.value == EXPECTED_CONFIGS[name]
    for family in FAMILIES:
        notes = check_accelerate_config(CONFIGS / name, load_recipe(
            f"{family}-tiny", [f"data.cache_dir={cache_dir}"]))
        assert any("global batch" in n for n in notes)
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED_CONFIGS)


def _write(tmp_path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_accelerate_config_refusals_name_the_problem(tmp_path):
    recipe = load_recipe("bert-tiny")
    with pytest.raises(ConfigError, match="nothere.yaml: no such file"):
        check_accelerate_config(tmp_path / "nothere.yaml", recipe)
    wrong_type = _write(tmp_path, "type.yaml", "distributed_type: MULTI_GPU\nnum_processes: abc\n")
    with pytest.raises(ConfigError, match="type.yaml: num_processes='abc' must be an integer"):
        check_accelerate_config(wrong_type, recipe)
    bad = _write(tmp_path, "bad.yaml", "distributed_type: MULTI_GPU\nnum_prcesses: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not a valid Accelerate config.*num_prcesses"):
        check_accelerate_config(bad, recipe)
    base = (CONFIGS / "deepspeed-zero2.yaml").read_text()
    accumulating = load_recipe("bert-tiny", ["train.gradient_accumulation_steps=4"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=4.*DeepSpeed"):
        check_accelerate_config(CONFIGS / "deepspeed-zero2.yaml", accumulating)
    ds_gas = _write(tmp_path, "gas.yaml", base.replace("gradient_accumulation_steps: 1",
                                                       "gradient_accumulation_steps: 8"))
    with pytest.raises(ConfigError, match="DeepSpeed gradient_accumulation_steps=8"):
        check_accelerate_config(ds_gas, recipe)
    zero3 = _write(tmp_path, "z3.yaml", (CONFIGS / "deepspeed-zero3.yaml").read_text()
                   .replace("zero3_save_16bit_model: true", "zero3_save_16bit_model: false"))
    with pytest.raises(ConfigError, match="ZeRO-3 without zero3_save_16bit_model"):
        check_accelerate_config(zero3, recipe)
    with pytest.raises(ConfigError, match="gradient_clipping=1.0 differs"):
        check_accelerate_config(CONFIGS / "deepspeed-zero2.yaml",
                                load_recipe("bert-tiny", ["train.max_grad_norm=0.5"]))
    local = _write(tmp_path, "local.yaml", (CONFIGS / "fsdp-full-state-dict.yaml").read_text()
                   .replace("FULL_STATE_DICT", "LOCAL_STATE_DICT"))
    with pytest.raises(ConfigError, match="LOCAL_STATE_DICT"):
        check_accelerate_config(local, recipe)
    wrap = _write(tmp_path, "wrap.yaml", (CONFIGS / "fsdp-full-state-dict.yaml").read_text()
                  .replace("fsdp_version: 2", "fsdp_version: 2\n  fsdp_transformer_layer_cls_"
                                                "to_wrap: GPT2Block"))
    with pytest.raises(ConfigError, match="GPT2Block not in the bert model"):
        check_accelerate_config(wrap, recipe)
    nodes = _write(tmp_path, "nodes.yaml", (CONFIGS / "multi-gpu-ddp.yaml").read_text()
                   .replace("num_machines: 1", "num_machines: 3"))
    with pytest.raises(ConfigError, match="multiple of num_machines=3"):
        check_accelerate_config(nodes, recipe)
    # what is not refused is said: which mixed precision wins, multi-node launch
    two_nodes = _write(tmp_path, "two.yaml", (CONFIGS / "multi-gpu-ddp.yaml").read_text()
                       .replace("num_machines: 1", "num_machines: 2"))
    notes = " ".join(check_accelerate_config(two_nodes, recipe))
    assert "train.mixed_precision=no is used" in notes and "--machine_rank" in notes
    assert "16 processes" not in notes and "8 processes" in notes


def test_deepspeed_at_run_time_refuses_accumulation_and_gets_the_micro_batch():
    """configure_accelerator on a stand-in for a DeepSpeed Accelerator (DeepSpeed is not
    installed here)."""
    def accelerator(ds):
        plugin = SimpleNamespace(deepspeed_config=ds)
        return SimpleNamespace(distributed_type=SimpleNamespace(value="DEEPSPEED"),
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    ds = {"gradient_accumulation_steps": 1, "train_micro_batch_size_per_gpu": "auto"}
    configure_accelerator(accelerator(ds), load_recipe("bert-tiny", ["train.batch_size=12"]))
    assert ds["train_micro_batch_size_per_gpu"] == 12
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2"):
        configure_accelerator(accelerator({}), load_recipe(
            "bert-tiny", ["train.gradient_accumulation_steps=2"]))
    with pytest.raises(ConfigError, match="DeepSpeed gradient_accumulation_steps=4"):
        configure_accelerator(accelerator({"gradient_accumulation_steps": 4}),
                              load_recipe("bert-tiny"))


def _rank(pid: int) -> int | None:
    """The RANK a launched worker was given (its environment, from /proc)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_sigterm_to_one_worker_stops_both_at_the_same_saved_step(runs, cache_dir, real_text):
    """SIGTERM reaches only rank 1 (as a preempted node's process might): the ranks agree
    on it at the next step, both write their state into the same checkpoint and each
    exits 143 with one line (resuming from such a checkpoint: test_faults.py)."""
    run = runs.work / "bert-sigterm"
    # the command line takes each key once: these two replace _overrides' own
    replaced = ("train.save_every=", "train.max_steps=")
    overrides = [*(o for o in _overrides("bert", run, cache_dir, real_text, B)
                   if not o.startswith(replaced)), "train.save_every=0", "train.max_steps=400"]
    args = ["-m", "overture", "pretrain", "bert-tiny", *overrides]
    log_path = run.parent / "bert-sigterm.log"
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(_launch_command(*args), stdout=log,
                                    stderr=subprocess.STDOUT, env=_env(),
                                    start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert launcher.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no progress within 300 s"
            time.sleep(0.05)
        rank1 = [pid for pid in _descendants(launcher.pid) if _rank(pid) == 1]
        assert rank1, "rank 1 not found"
        os.kill(rank1[0], signal.SIGTERM)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    output = log_path.read_text()
    # the launcher reports the workers' exit code 143 with its own ChildFailedError
    # summary; the workers themselves print no traceback
    workers_output = output.split("failed (exitcode: 143)")[0]
    assert "Traceback" not in workers_output, workers_output[-3000:]
    assert launcher.returncode != 0
    stopped = [line for line in output.splitlines() if "interrupted: stopped by" in line]
    assert len(stopped) == 2, output[-3000:]  # one line from each rank
    saved = latest_checkpoint(run)
    step = json.loads((saved / "train_state.json").read_text())["step"]
    assert all(f"at step {step};" in line for line in stopped), stopped
    assert (saved / "random_states_0.pkl").is_file() and (saved / "random_states_1.pkl").is_file()
    assert 3 <= step < 400
