"""The `overture` command as a user runs it (subprocesses, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OVERTURE_CACHE", None)
    return subprocess.run([sys.executable, "-m", "overture", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    """`overture pretrain bert-tiny` end to end on the embedded corpus, kept short."""
    work = tmp_path_factory.mktemp("cli")
    done = run_cli("pretrain", "bert-tiny", "train.max_steps=30", "train.save_every=15",
                   "train.eval_every=15", "train.log_every=5", f"data.cache_dir={cache_dir}",
                   "output_dir=runs/tiny", cwd=work)
    return work, done


def test_pretrain_tiny_recipe_end_to_end(tiny_run):
    work, done = tiny_run
    assert done.returncode == 0, done.stderr[-3000:]
    run = work / "runs" / "tiny"
    final = run / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "recipe.yaml"):
        assert (final / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000015", "step-000030"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20, 25, 30]
    assert train_records[-1]["loss"] < train_records[0]["loss"]  # it learns
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 for r in train_records)
    assert {r["step"] for r in records if r["split"] == "eval"} == {0, 15, 30}
    assert "tokens/s=" in done.stderr  # the progress bar shows throughput
    # library chatter overture already accounts for: the tied decoder at every save, the
    # export's "Writing model shards" bar
    assert "Removed shared tensor" not in done.stderr
    assert "Writing model shards" not in done.stderr


def test_report_draws_a_png(tiny_run):
    work, _ = tiny_run
    done = run_cli("report", "runs/tiny", cwd=work)
    assert done.returncode == 0, done.stderr[-2000:]
    png = work / "runs" / "tiny" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_dry_run_prints_recipe_parameters_and_data_statistics(tmp_path, cache_dir):
    done = run_cli("pretrain", "bert-tiny", "--dry-run", f"data.cache_dir={cache_dir}",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "# resolved recipe" in out and "hidden_size: 128" in out
    assert "parameters: " in out
    stats = dict(line.strip().split(": ", 1) for line in out.splitlines()
                 if line.startswith("  ") and ": " in line and line.strip().split(": ")[0] in (
                     "mask_rate", "mask_split_mask", "nsp_label_1", "padding_efficiency"))
    assert abs(float(stats["mask_rate"]) - 0.15) < 0.01
    assert abs(float(stats["mask_split_mask"]) - 0.8) < 0.03
    assert abs(float(stats["nsp_label_1"]) - 0.5) < 0.03
    assert 0 < float(stats["padding_efficiency"]) <= 1
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_unknown_override_key_names_the_key_and_suggests(tmp_path):
    done = run_cli("pretrain", "bert-tiny", "train.max_step=5", cwd=tmp_path)
    assert done.returncode == 2
    assert "train.max_step" in done.stderr and "did you mean train.max_steps" in done.stderr


def test_missing_corpus_file_names_the_path(tmp_path):
    done = run_cli("pretrain", "bert-tiny", "data.corpus=[no/such/file.txt]", cwd=tmp_path)
    assert done.returncode == 2
    assert "no/such/file.txt" in done.stderr and "not found" in done.stderr


def test_recipes_lists_the_bundled_recipes(tmp_path):
    done = run_cli("recipes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
    from overture.registry import list_families

    for family in list_families():  # every family, with its size, e.g. "110.1M"
        mine = [r for r in rows.values() if r[1] == family]
        if family == "classify":  # fine-tuning: the checkpoint's size
            assert mine and all(r[2] == "ckpt" for r in mine)
            continue
        if family in ("gan-int-cls", "dfgan"):  # sized by a text encoder not here
            assert mine and all(r[2] == "?" for r in mine)
            continue
        continuing = ("tapt", "tapt-roberta", "dapt")  # the size of the checkpoint given
        assert all(r[2] == "ckpt" for r in mine if r[0] in continuing)
        sized = [r for r in mine if r[0] not in continuing]
        assert sized and all(r[2].endswith("M") and float(r[2][:-1]) > 0 for r in sized)
    assert float(rows["bert-base"][2][:-1]) == pytest.approx(110, abs=1)
    assert float(rows["gpt2-small"][2][:-1]) == pytest.approx(124, abs=1)
    assert float(rows["albert-base"][2][:-1]) == pytest.approx(12, abs=0.5)


def test_prepare_builds_the_examples_and_trains_nothing(tmp_path, cache_dir, capsys):
    from overture.atomic import COMPLETE
    from overture.cli import main

    assert main(["prepare", "bert-tiny", f"data.cache_dir={cache_dir}",
                 f"output_dir={tmp_path / 'run'}"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]  # "FOLDER: N train / M eval examples"
    folder = Path(line.rsplit(": ", 1)[0])
    assert int(line.rsplit(": ", 1)[1].split()[0].replace(",", "")) > 0
    assert (folder / COMPLETE).is_file() and (folder / "train.arrow").is_file()
    assert not (tmp_path / "run").exists()


def test_two_processes_train_one_run_written_once(tmp_path, cache_dir):
    """`accelerate launch`-style data parallelism on CPU (gloo): both ranks train, rank
    0 alone writes metrics, checkpoints and final/."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    env.pop("OVERTURE_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "overture", "pretrain", "bert-tiny", "train.max_steps=4", "train.log_every=1",
         "train.save_every=2", "train.eval_every=0", f"data.cache_dir={cache_dir}",
         "output_dir=run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 4]  # one record per step: only rank 0 writes
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (run / "final" / "model.safetensors").is_file()
    assert not list(run.rglob("*.tmp*"))


def test_bf16_tensorboard_and_mfu_with_a_given_peak(tmp_path, cache_dir):
    # a process of its own: Accelerate fixes the precision once per process
    done = run_cli("pretrain", "bert-tiny", "train.max_steps=2", "train.log_every=1",
                   "train.eval_every=0", "train.mixed_precision=bf16",
                   "train.report_to=[tensorboard]", "train.peak_tflops=1.0",
                   f"data.cache_dir={cache_dir}", "output_dir=run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
              .splitlines() if json.loads(line)["split"] == "train"]
    assert [r["step"] for r in logged] == [1, 2] and all(r["loss"] < 20 for r in logged)
    assert logged[-1]["mfu"] == pytest.approx(logged[-1]["tflops"] / 1.0)
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))  # the tracker's log


# Every command of the README's "Command line" section, with its most common mistake,
# and the words its one line of stderr must hold. {bert} is a trained tiny BERT final/,
# {image} an image one, {empty} an empty folder.
COMMON_ERRORS = {
    "pretrain": (["pretrain", "bert-tiyn"], "recipe 'bert-tiyn' not found"),
    "pretrain override": (["pretrain", "bert-tiny", "trian.max_steps=5"],
                          "command-line override 'trian.max_steps=5'"),
    "pretrain bad YAML": (["pretrain", "{empty}/bad.yaml"], "not valid YAML: line 3, column 9: mapping values"),
    "prepare": (["prepare", "bert-tiny", "data.corpus=[no/such.txt]"],
                "file not found: 'no/such.txt'"),
    "recipes": (["recipes", "bert"], "unrecognized arguments: bert"),
    "finetune": (["finetune", "--checkpoint", "nope/dir", "--task", "sst2"],
                 "--checkpoint nope/dir: no such folder"),
    "finetune --images": (["finetune", "--checkpoint", "{image}", "--images", "no/such/dir"],
                          "no/such/dir"),
    "probe": (["probe", "--checkpoint", "no/such/run", "--data", "digits"], "no/such/run"),
    "glue": (["glue", "--checkpoint", "{bert}", "--tasks", "sst3"], "--tasks"),
    "features": (["features", "--checkpoint", "{bert}", "--input", "no/such.txt",
                  "--output", "{empty}/f.npy"], "--input no/such.txt: no such file"),
    "convert-long": (["convert-long", "--checkpoint", "no/such/dir", "--output",
                      "{empty}/long"], "--checkpoint no/such/dir: no such folder"),
    "generate": (["generate", "--checkpoint", "{bert}", "--prompt", "Once"],
                 "which generates nothing"),
    "report": (["report", "{empty}"], "no metrics log here"),
    "finetune --images, too few": (["finetune", "--checkpoint", "{image}", "--images",
                                    "{empty}/pets"], "only 4 training examples, fewer than "
                                                     "one batch"),
}

_RUN_EACH = r"""
import json, os, sys
from overture.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    path = os.path.join(sys.argv[2], name.replace(" ", "_") + ".err")
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)  # everything written to stderr, by anyone, lands here
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
        sys.stderr.flush()
        os.dup2(saved, 2)
    results[name] = [code, path]
print(json.dumps(results))
"""


def test_each_commands_common_error_is_the_one_and_last_line_of_stderr(tmp_path, trained):
    """One process runs every command's usual mistake with stderr redirected per command:
    exit 2, and stderr is exactly one line, the error (no LOAD REPORT, progress bar,
    warning or usage block around it). Nothing is left behind in the working folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.yaml").write_text("model:\n hidden_size: 128\n  layers: 2\n")
    from PIL import Image

    for name in ("cat", "dog"):  # 5 images, 4 of them for training: less than a batch
        (empty / "pets" / name).mkdir(parents=True)
        for i in range(3 if name == "cat" else 2):
            Image.new("RGB", (8, 8), (40 * i, 90, 0)).save(empty / "pets" / name / f"{i}.png")
    slots = {"bert": str(trained("bert") / "final"), "image": str(trained("image") / "final"),
             "empty": str(empty)}
    argvs = {name: [a.format(**slots) for a in argv] for name, (argv, _) in COMMON_ERRORS.items()}
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OVERTURE_CACHE", None)
    done = subprocess.run([sys.executable, "-c", _RUN_EACH, json.dumps(argvs), str(tmp_path)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (_, words) in COMMON_ERRORS.items():
        code, path = results[name]
        lines = Path(path).read_text().splitlines()
        assert code == 2, (name, code, lines)
        assert len(lines) == 1, (name, lines)
        assert lines[0].startswith("error: ") and words in lines[0], (name, lines[0])
    assert list(work.iterdir()) == []  # no runs/ folder made by a refused command


def test_commands_find_the_family_of_a_checkpoint_through_the_registry(trained, tmp_path,
                                                                        monkeypatch, capsys):
    """generate, features and probe ask the registry which family made a checkpoint
    (final/recipe.yaml, else config.json's model_type) and call that family's method."""
    from overture.cli import main
    from overture.registry import checkpoint_family, family_name, get_family

    for family in ("bert", "gpt", "image"):
        assert family_name(checkpoint_family(str(trained(family)))) == family
    plain = tmp_path / "plain"  # a transformers folder: no recipe.yaml, its model_type
    plain.mkdir()
    (plain / "config.json").write_text(
        (trained("roberta") / "final" / "config.json").read_text())
    assert family_name(checkpoint_family(str(plain))) == "roberta"
    (plain / "config.json").write_text(json.dumps({"model_type": "distilbert"}))
    assert checkpoint_family(str(plain)) is None  # any encoder: the generic path

    calls = []
    monkeypatch.setattr(get_family("gpt"), "sample",
                        staticmethod(lambda checkpoint, prompt, **kw: calls.append(prompt)
                                     or "sampled"))
    assert main(["generate", "--checkpoint", str(trained("gpt")), "--prompt", "Once"]) == 0
    assert calls == ["Once"] and capsys.readouterr().out.strip() == "sampled"
    assert main(["probe", "--checkpoint", str(trained("bert")), "--data", "digits"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --checkpoint {trained('bert')} is a bert checkpoint; probe takes an image "
        "checkpoint (a final/ of the image or simclr family)"]


def test_the_command_line_module_imports_no_family_module():
    """cli.py reaches families only through the registry (lazy): it imports no module of
    overture.pretrain, nor any module a family lives in."""
    import ast

    import overture.cli as cli
    from overture.registry import FAMILIES

    tree = ast.parse(Path(cli.__file__).read_text())
    imported = {("overture." * (node.level > 0)) + (node.module or "")
                for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
    family_modules = {path.split(":")[0] for path in FAMILIES.values()}
    assert not imported & family_modules
    assert not [m for m in imported if m.startswith(("overture.pretrain", "pretrain"))]


def test_report_output_gets_its_missing_folders_and_a_bad_path_is_one_line(
        trained, tmp_path, capsys, monkeypatch):
    from overture.cli import main

    run = trained("bert")
    deep = tmp_path / "rep" / "missing" / "dir" / "r.png"
    assert main(["report", str(run), "--output", str(deep)]) == 0
    assert capsys.readouterr().out.strip() == str(deep)
    assert deep.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def error(output) -> str:
        assert main(["report", str(run), "--output", str(output)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    blocker = tmp_path / "notes.txt"
    blocker.write_text("user data")
    assert error(blocker / "sub" / "r.png") == (
        f"error: --output {blocker / 'sub' / 'r.png'}: cannot create its folder "
        f"{blocker / 'sub'} (Not a directory); choose another path")
    assert blocker.read_text() == "user data"
    folder = tmp_path / "rep"
    assert error(folder) == (f"error: --output {folder} is a folder; give a file path "
                             f"(e.g. {folder / 'report.png'})")
    assert sorted(p.name for p in folder.iterdir()) == ["missing"]
    import overture.report  # root may write anywhere: the permission check, simulated

    monkeypatch.setattr(overture.report.os, "access", lambda path, mode: False)
    assert error(tmp_path / "r.png") == (f"error: --output {tmp_path / 'r.png'}: cannot write "
                                         f"into {tmp_path} (permission denied); choose "
                                         "another path")
    assert not (tmp_path / "r.png").exists()


def test_prepare_and_dry_run_work_without_held_out_examples(tmp_path, cache_dir, capsys):
    from overture.cli import main

    corpus = tmp_path / "small.txt"
    corpus.write_text("One sentence here. Another one there.\n\nA second document is here. "
                      "And more text follows it.\n")
    args = [f"data.corpus=[{corpus}]", "data.eval_fraction=0", f"data.cache_dir={cache_dir}",
            "tokenizer.vocab_size=200", "tokenizer.min_frequency=1", "train.batch_size=2"]
    assert main(["prepare", "bert-tiny", *args]) == 0
    assert capsys.readouterr().out.strip().endswith(" / 0 eval examples")
    assert main(["pretrain", "bert-tiny", "--dry-run", *args]) == 0
    assert "  eval_examples: 0" in capsys.readouterr().out.splitlines()


def test_a_negative_layer_list_is_read_as_the_readme_writes_it():
    from overture.cli import _negative_values_attached, _parser

    argv = _negative_values_attached(["features", "--checkpoint", "c", "--input", "i.txt",
                                      "--output", "o.npy", "--layer", "-4,-3,-2,-1"])
    assert _parser().parse_args(argv).layer == "-4,-3,-2,-1"
    assert _negative_values_attached(["--layer", "-1", "--pooling", "cls"]) == [
        "--layer=-1", "--pooling", "cls"]
