"""Corpus reading (counters, formats, errors) and the on-disk example cache."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from overture.config import ConfigError
from overture.data import prepare as prepare_module
from overture.data.corpus import (CorpusStats, Source, default_corpus_path, iter_documents,
                                  resolve_sources)
from helpers import prepare


def _docs(source: Source, stats: CorpusStats | None = None):
    return list(iter_documents(source, "text", "train", stats or CorpusStats()))


def test_text_documents_split_on_blank_lines_and_counters(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"first line\nsecond \xff line\n \n\n\n  \nnext doc\n\n")
    stats = CorpusStats()
    docs = _docs(Source("text", str(path)), stats)
    assert docs == [["first line", "second \ufffd line"], ["next doc"]]
    assert stats.documents == 2 and stats.lines == 3
    assert stats.invalid_utf8_replaced == 1
    assert stats.empty_lines_skipped == 3  # four blank lines between docs, one separates
    assert stats.bytes == path.stat().st_size


def test_jsonl_csv_and_parquet_rows_are_documents(tmp_path):
    rows = [{"text": "alpha one.\nalpha two."}, {"text": ""}, {"text": "beta"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "c.csv").write_text('text\n"alpha one.\nalpha two."\n""\nbeta\n')
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.csv", "c.parquet"):
        [source] = resolve_sources([str(tmp_path / name)], tmp_path)
        stats = CorpusStats()
        assert _docs(source, stats) == [["alpha one.", "alpha two."], ["beta"]], name
        assert stats.empty_documents_skipped == 1, name


def test_missing_text_column_names_the_file_and_columns(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}))
    [source] = resolve_sources([str(tmp_path / "c.jsonl")], tmp_path)
    with pytest.raises(ConfigError, match=r"c\.jsonl.*no column 'text'.*body"):
        _docs(source)


def test_missing_file_and_empty_glob_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found.*nope.txt"):
        resolve_sources([str(tmp_path / "nope.txt")], tmp_path)
    with pytest.raises(ConfigError, match="no file matches the glob"):
        resolve_sources([str(tmp_path / "*.txt")], tmp_path)


def test_a_build_that_fails_leaves_no_half_built_cache(make_recipe, tmp_path, real_text):
    corpus = tmp_path / "slice.txt"
    corpus.write_text(real_text.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    recipe = make_recipe("unused", f"data.corpus=[{corpus}]", "data.eval_fraction=1",
                         f"data.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match="holds them all out"):  # found once built
        prepare(recipe, progress=False)
    assert not list((tmp_path / "cache").rglob("*.tmp-*"))


def test_empty_corpus_is_a_clear_error(make_recipe, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    recipe = make_recipe("unused", f"data.corpus=[{empty}]", f"data.cache_dir={tmp_path}")
    with pytest.raises(ConfigError, match="no text|empty"):
        prepare(recipe, progress=False)


def test_default_corpus_is_prose_from_the_python_installation(cache_dir):
    path = default_corpus_path(cache_dir)
    docs = _docs(Source("text", str(path)))
    assert len(docs) > 1000
    words = sum(len(line.split()) for doc in docs for line in doc)
    assert words > 100_000


def test_cache_is_reused_and_rebuilt_when_a_setting_changes(make_recipe, monkeypatch):
    recipe = make_recipe("unused", "data.short_seq_prob=0.2")
    first = prepare(recipe, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(prepare_module, "_build", fail)
    again = prepare(recipe, progress=False)
    assert again.folder == first.folder and len(again.train) == len(first.train)
    changed = make_recipe("unused", "data.short_seq_prob=0.3")
    with pytest.raises(AssertionError, match="reused"):
        prepare(changed, progress=False)  # a changed setting needs a new build


def test_output_does_not_depend_on_the_number_of_workers(make_recipe, tmp_path, real_text):
    corpus = tmp_path / "slice.txt"
    corpus.write_text(real_text.read_text(encoding="utf-8")[:400_000], encoding="utf-8")
    base = (f"data.corpus=[{corpus}]", "data.chunk_mb=0.06")
    one = prepare(make_recipe("unused", *base, f"data.cache_dir={tmp_path / 'a'}"),
                  progress=False)
    # The same tokenizer for both (WordPiece training may order tied characters
    # differently from one training to the next).
    [tokenizer] = (tmp_path / "a" / "tokenizers").iterdir()
    two = prepare(make_recipe("unused", *base, "data.num_proc=2", f"data.cache_dir={tmp_path / 'b'}",
                              f"tokenizer.name_or_path={tokenizer}"), progress=False)
    assert one.stats["windows"] >= 4 and two.stats["workers"] == 2
    assert one.train["input_ids"] == two.train["input_ids"]
    assert one.train["mlm_ids"] == two.train["mlm_ids"]
    assert one.eval["input_ids"] == two.eval["input_ids"]


def test_default_corpus_drops_code_paragraphs_and_is_extracted_once(cache_dir):
    from overture.data.corpus import _prose_paragraphs

    doc = ("Return the number of items in the container, counting each one of them once.\n\n"
           ">>> len([1, 2, 3])\n3\n\n"
           "    indented = example(block, of, code, that, is, long, enough, to, count)\n\n"
           "x = f(a)[0] + g(b)[1] * h(c)[2] - k(d)[3] / m(e)[4] + n(f)[5] + o(g)[6] + p(h)[7]")
    assert _prose_paragraphs(doc, 12) == [doc.split("\n\n")[0]]
    path = default_corpus_path(cache_dir)
    stamp = path.stat().st_mtime_ns
    assert default_corpus_path(cache_dir) == path and path.stat().st_mtime_ns == stamp


def test_overture_cache_replaces_the_default_cache_dir(monkeypatch, tmp_path):
    from overture.config import load_recipe

    recipe = load_recipe("bert-tiny")  # data.cache_dir left at its default
    monkeypatch.setenv("OVERTURE_CACHE", str(tmp_path / "elsewhere"))
    assert recipe.data.resolved_cache_dir == tmp_path / "elsewhere"


def test_a_changed_corpus_file_changes_the_cache_key(tmp_path):
    import os

    from overture.data.corpus import corpus_fingerprint

    corpus = tmp_path / "c.txt"
    corpus.write_text("One sentence here.\n")
    before = corpus_fingerprint(resolve_sources([str(corpus)], tmp_path))
    corpus.write_text("One sentence there.\n")
    os.utime(corpus, ns=(1, 1))  # a new mtime, whatever the clock's resolution
    assert corpus_fingerprint(resolve_sources([str(corpus)], tmp_path)) != before


def test_eval_corpus_is_held_out_whole_from_its_own_file(make_recipe, tmp_path, real_text):
    held_out = tmp_path / "held.txt"
    held_out.write_text("Zebras graze on the wide plains of the savanna every morning. "
                        "Zebras then rest near the river until the evening comes.\n\n" * 40)
    data = prepare(make_recipe("unused", f"data.eval_corpus=[{held_out}]"), progress=False)
    tok = data.tokenizer
    held = set(tok(held_out.read_text(), add_special_tokens=False)["input_ids"])
    # the original ids (static masks are stored beside the corrupted inputs)
    eval_ids = set()
    for row, positions, ids in zip(data.eval["input_ids"], data.eval["mlm_positions"],
                                   data.eval["mlm_ids"]):
        row = list(row)
        for position, original in zip(positions, ids):
            row[position] = original
        eval_ids.update(row)
    assert eval_ids - set(tok.all_special_ids) <= held  # eval text is the held-out file only
    train_ids = {i for row in data.train[:200]["input_ids"] for i in row}
    assert len(train_ids - held) > 100  # training text is the corpus
    assert data.stats["eval_examples"] == len(data.eval) > 0


def test_a_script_without_a_main_guard_gets_an_error_not_a_hang(tmp_path, real_text,
                                                                  cache_dir):
    """Preparation's workers are spawned and re-import the user's script; without
    ``if __name__ == "__main__":`` the script runs again in each worker, which dies. That
    must end the run with a message saying so (multiprocessing.Pool had replaced the dead
    workers forever, and the script hung with 2,500 lines of tracebacks)."""
    import subprocess
    import sys

    corpus = tmp_path / "slice.txt"
    corpus.write_text(real_text.read_text(encoding="utf-8")[:300_000], encoding="utf-8")
    script = tmp_path / "pretrain.py"
    script.write_text(
        "from overture.config import load_recipe\n"
        "from overture.engine import train\n"
        f"recipe = load_recipe('bert-tiny', ['output_dir={tmp_path / 'run'}',\n"
        f"    'data.corpus=[{corpus}]', 'data.cache_dir={cache_dir}', 'data.num_proc=2',\n"
        "    'data.chunk_mb=0.06', 'tokenizer.vocab_size=2048', 'train.max_steps=1'])\n"
        "train(recipe, progress=False)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("overture.errors.RunError: data preparation: a worker process")
    assert 'if __name__ == "__main__":' in last and "data.num_proc=1" in last


class _SlowBuilder:
    """An example builder whose windows take ``seconds`` each (spawned workers import
    it from this module)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def setup(self):
        pass

    def draft(self, docs, tag, copies):
        import time
        from collections import Counter

        time.sleep(self.seconds if docs else 0)  # a window of no documents: at once
        return [], Counter()

    def finish(self, tag, batch):
        return batch


def test_a_worker_killed_between_results_stops_preparation_with_one_message():
    """The worker dies while the main process reads the next window: the pool's next
    submit() fails, not a result(); both must give the one-line error."""
    import multiprocessing
    import os
    import signal
    import time

    from overture.config import DataConfig
    from overture.errors import RunError

    def windows():
        for i in range(12):
            if i == 6:  # the two workers are busy and nothing is being waited for
                os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
                time.sleep(1.0)
            yield i, [["a b c"]], 10, 0.0

    mapped = prepare_module._map_windows(windows(), _SlowBuilder(0.2), DataConfig(), 2,
                                         workers_finish=True)
    with pytest.raises(RunError, match="a worker process ended before its window was "
                                       "done .* may have been killed"):
        list(mapped)
    assert not multiprocessing.active_children()


def _ended(pid: int) -> bool:
    """Whether process ``pid`` is gone (or a zombie no one has reaped yet)."""
    from pathlib import Path

    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" in status.read_text()
    except FileNotFoundError:
        return True


def _workers_left_after_kill_9(main) -> list[int]:
    """kill -9 the process ``main``, which printed its two workers' pids as its first
    line; the pids of those still running 20 s later (killed then, not to be left)."""
    import os
    import signal
    import time

    workers = [int(p) for p in main.stdout.readline().split()]
    assert len(workers) == 2
    main.send_signal(signal.SIGKILL)
    main.wait()
    deadline = time.monotonic() + 20
    while not all(_ended(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in workers if not _ended(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def _mapping_script(windows: str) -> str:
    """The start of a script mapping ``windows`` (a Python expression) with two workers
    whose windows take a minute each (run with this folder on PYTHONPATH)."""
    return ("import multiprocessing, os, signal, sys, threading, time\n"
            "from overture.config import DataConfig\n"
            "from overture.data import prepare\n"
            "from test_data import _SlowBuilder\n"
            "if __name__ == '__main__':\n"
            f"    windows = {windows}\n"
            "    mapped = prepare._map_windows(windows, _SlowBuilder(60), DataConfig(), 2,\n"
            "                                  workers_finish=True)\n")


@pytest.mark.skipif(not __import__("os").path.isdir("/proc"), reason="reads /proc")
def test_workers_end_when_the_main_process_is_killed(tmp_path):
    """kill -9 (or SIGTERM, or the out-of-memory killer) on the main process during
    preparation: its workers must not wait forever on their queues."""
    import subprocess
    import sys

    script = tmp_path / "prepare.py"
    script.write_text(
        _mapping_script("((i, [['a']], 1, 0.0) for i in range(4))") +
        "    threading.Thread(target=lambda: next(mapped), daemon=True).start()\n"
        "    while len(multiprocessing.active_children()) < 2:\n"
        "        time.sleep(0.05)\n"
        "    print(*[p.pid for p in multiprocessing.active_children()], flush=True)\n"
        "    time.sleep(120)\n")
    env = {**__import__("os").environ,
           "PYTHONPATH": str(Path(__file__).resolve().parent)}
    main = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert _workers_left_after_kill_9(main) == []


def test_ctrl_c_ends_the_workers_at_once_without_waiting_for_queued_windows(tmp_path):
    """Ctrl-C (to the whole terminal group) while one worker is busy and one idle: the
    command must not wait for the window in flight (a minute here), a second Ctrl-C must
    not leave it hanging in the pool's shutdown, and no worker prints a traceback (an
    idle one had)."""
    import subprocess
    import sys

    script = tmp_path / "prepare.py"
    script.write_text(
        _mapping_script("((i, [['a']] if i == 0 else [], 1, 0.0) for i in range(2))") +
        "    def ctrl_c():\n"
        "        while len(multiprocessing.active_children()) < 2:\n"
        "            time.sleep(0.05)\n"
        "        time.sleep(1.0)  # the workers are in their windows\n"
        "        os.killpg(0, signal.SIGINT)\n"
        "        time.sleep(0.05)\n"
        "        os.killpg(0, signal.SIGINT)  # a second one, during the shutdown\n"
        "    threading.Thread(target=ctrl_c, daemon=True).start()\n"
        "    started = time.monotonic()\n"
        "    try:\n"
        "        next(mapped)\n"
        "    except KeyboardInterrupt:\n"
        "        pass\n"
        "    left = len(multiprocessing.active_children())\n"
        "    print(f'{time.monotonic() - started:.1f}', left, flush=True)\n")
    env = {**__import__("os").environ,
           "PYTHONPATH": str(Path(__file__).resolve().parent)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=60, start_new_session=True)
    seconds, children = done.stdout.split()
    assert float(seconds) < 20 and children == "0"
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.skipif(not __import__("os").path.isdir("/proc"), reason="reads /proc")
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_worker_pools_workers_end_with_its_killed_main_process(tmp_path, start):
    """overture.workers.worker_pool, as text preparation (spawn) and the image check (the
    platform's default, fork on Linux) use it: kill -9 of the main process ends its busy
    workers too, whichever way they were started."""
    import subprocess
    import sys

    script = tmp_path / "pool.py"
    script.write_text(
        "import multiprocessing, time\n"
        "from overture.workers import worker_pool\n"
        "if __name__ == '__main__':\n"
        f"    with worker_pool(2, str, start={start!r}) as pool:\n"
        "        busy = [pool.submit(time.sleep, 120) for _ in range(2)]\n"
        "        while len(multiprocessing.active_children()) < 2:\n"
        "            time.sleep(0.05)\n"
        "        print(*[p.pid for p in multiprocessing.active_children()], flush=True)\n"
        "        time.sleep(120)\n")
    main = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert _workers_left_after_kill_9(main) == []
