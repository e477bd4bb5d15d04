"""Feature extraction: batch-independent pooling, layers, normalisation, the command's
files, and ``overture.load(DIR).encode`` equal to ``overture features``."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import overture
from overture.cli import main
from overture.features import position_limit, read_texts

TEXTS = ["The war ended in the spring.", "A short one.",
         "The river runs through the old city and past the mills that once stood there.",
         "Rain.", "Music was played at the festival every evening for a week.",
         "It rained . Then it stopped .", "Three", "The cat sat on the mat near the door."]


@pytest.fixture(scope="module")
def encoder(trained):
    return overture.load(trained("bert"))


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_an_embedding_does_not_depend_on_its_batch(encoder, pooling):
    alone = encoder.encode(TEXTS, pooling=pooling, batch_size=1)
    together = encoder.encode(TEXTS, pooling=pooling, batch_size=8)
    order = np.random.default_rng(0).permutation(len(TEXTS))
    shuffled = encoder.encode([TEXTS[i] for i in order], pooling=pooling, batch_size=3)
    assert alone.shape == (len(TEXTS), encoder.dim)
    assert np.allclose(alone, together, atol=1e-5)
    assert np.allclose(alone[order], shuffled, atol=1e-5)  # returned in input order
    assert not np.allclose(alone[0], alone[1])


def test_several_layers_are_averaged_and_normalize_gives_unit_length(encoder):
    last, before = (encoder.encode(TEXTS, layer=i) for i in (-1, -2))
    both = encoder.encode(TEXTS, layer=[-1, -2])
    assert np.allclose(both, (last + before) / 2, atol=1e-5)  # mean pooling is linear
    unit = encoder.encode(TEXTS, normalize=True)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert np.allclose(unit, last / np.linalg.norm(last, axis=1, keepdims=True), atol=1e-5)


def test_pooler_output_and_bad_arguments(encoder):
    from overture.config import ConfigError

    assert encoder.encode(TEXTS[:2], pooling="pooler").shape == (2, encoder.dim)
    with pytest.raises(ConfigError, match="--layer"):
        encoder.encode(TEXTS, layer=12)
    with pytest.raises(ConfigError, match="--pooling='sum'"):
        encoder.encode(TEXTS, pooling="sum")


@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".parquet"])
def test_features_command_writes_what_encode_returns_with_ids(trained, encoder, tmp_path,
                                                              suffix):
    source = tmp_path / "texts.jsonl"
    source.write_text("".join(json.dumps({"id": f"t{i}", "body": t}) + "\n"
                              for i, t in enumerate(TEXTS)))
    output = tmp_path / f"features{suffix}"
    args = ["features", "--checkpoint", str(trained("bert")), "--input", str(source),
            "--output", str(output), "--column", "body", "--id-column", "id",
            "--pooling", "mean", "--layer=-1,-2", "--batch-size", "3"]
    assert main(args) == 0
    expected = encoder.encode(TEXTS, layer=[-1, -2])
    if suffix == ".npy":
        got, ids = np.load(output), [f"t{i}" for i in range(len(TEXTS))]
    elif suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(output), "np") as f:
            got, ids = f.get_tensor("embeddings"), json.loads(f.metadata()["ids"])
    else:
        table = pq.read_table(output)
        got, ids = np.stack(table["embedding"].to_numpy(zero_copy_only=False)), \
            table["id"].to_pylist()
    assert ids == [f"t{i}" for i in range(len(TEXTS))]
    assert np.allclose(got, expected, atol=1e-5)
    assert main(args) == 2  # the output exists: refused, not overwritten
    assert main([*args, "--overwrite"]) == 0


def test_features_reads_plain_text_one_per_line(trained, encoder, tmp_path):
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    assert main(["features", "--checkpoint", str(trained("bert")), "--input", str(source),
                 "--output", str(tmp_path / "f.npy")]) == 0
    assert np.allclose(np.load(tmp_path / "f.npy"), encoder.encode(TEXTS), atol=1e-5)


def test_features_errors_name_the_input(trained, tmp_path, capsys):
    source = tmp_path / "t.csv"
    source.write_text("text,id\nhello,1\n")
    args = ["features", "--checkpoint", str(trained("bert")), "--output", str(tmp_path / "o.npy")]
    assert main([*args, "--input", str(tmp_path / "none.txt")]) == 2
    (tmp_path / "empty.txt").write_text("")
    assert main([*args, "--input", str(tmp_path / "empty.txt")]) == 2
    assert "holds no texts" in capsys.readouterr().err
    assert main([*args, "--input", str(source), "--column", "body"]) == 2
    assert "no field 'body'" in capsys.readouterr().err
    assert main([*args, "--input", str(source), "--output", str(tmp_path / "o.csv")]) == 2
    assert not (tmp_path / "o.npy").exists()


@pytest.fixture
def transformers_warnings(monkeypatch) -> list[str]:
    """What transformers logs at WARNING or above during the test (its LOAD REPORT...)."""
    import logging

    heard: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: heard.append(record.getMessage())
    logger = logging.getLogger("transformers")
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, handler])
    return heard


def _one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_features_refuses_rows_without_the_id_column_naming_file_and_line(trained, tmp_path,
                                                                          capsys):
    args = ["features", "--checkpoint", str(trained("bert")), "--output", str(tmp_path / "o.npy")]
    table = tmp_path / "t.csv"
    table.write_text("text,key\nhello,a\nworld,b\n")
    assert main([*args, "--input", str(table), "--id-column", "nope"]) == 2
    err = _one_line_error(capsys)
    assert f"{table}:2: no field 'nope'" in err and "--id-column" in err
    # a JSONL row lacking the id (or not an object) is named by its line
    rows = tmp_path / "t.jsonl"
    rows.write_text('{"text": "a", "key": 1}\n\n{"text": "b"}\n')
    assert main([*args, "--input", str(rows), "--id-column", "key"]) == 2
    assert f"{rows}:3: no field 'key'" in _one_line_error(capsys)
    rows.write_text('{"text": "a"}\n[1, 2]\n')
    assert main([*args, "--input", str(rows)]) == 2
    assert f"{rows}:2: not a JSON object (list)" in _one_line_error(capsys)
    assert not (tmp_path / "o.npy").exists()
    assert read_texts(table, None, "key") == (["a", "b"], ["hello", "world"])


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".tsv", ".jsonl"])
def test_features_refuses_a_utf16_input_as_pretrain_does(trained, tmp_path, capsys, suffix):
    source = tmp_path / f"texts{suffix}"
    body = {".txt": "hello\nworld\n", ".csv": "text\nhello\n", ".tsv": "text\nhello\n",
            ".jsonl": '{"text": "hello"}\n'}[suffix]
    source.write_text(body, encoding="utf-16")
    assert main(["features", "--checkpoint", str(trained("bert")), "--input", str(source),
                 "--output", str(tmp_path / "o.npy")]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("error: --input:") and str(source) in err and "UTF-16" in err
    assert not (tmp_path / "o.npy").exists()


def test_features_skips_empty_lines_keeping_line_numbers_as_ids(trained, encoder, tmp_path,
                                                                capsys, transformers_warnings):
    source = tmp_path / "texts.txt"
    # a BOM, blank and whitespace-only lines, CRLF, and a form feed inside a line (not a
    # line break: ids stay the numbers an editor shows)
    source.write_bytes("\ufefffirst text\n\n   \nsecond\r\n\t\nthird\x0cpage\n".encode())
    assert read_texts(source, None, None) == (["1", "4", "6"],
                                             ["first text", "second", "third\x0cpage"])
    capsys.readouterr()
    output = tmp_path / "f.parquet"
    assert main(["features", "--checkpoint", str(trained("bert")), "--input", str(source),
                 "--output", str(output)]) == 0
    err = capsys.readouterr().err
    assert f"--input {source}: skipped 3 empty lines" in err
    assert transformers_warnings == []  # no LOAD REPORT of the unused cls.* weights
    table = pq.read_table(output)
    assert table["id"].to_pylist() == ["1", "4", "6"]
    got = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert got.shape == (3, encoder.dim)
    assert np.allclose(got, encoder.encode(["first text", "second", "third\x0cpage"]),
                       atol=1e-5)
    # .npy keeps no ids: its rows are the kept lines, and the closing line says so
    assert main(["features", "--checkpoint", str(trained("bert")), "--input", str(source),
                 "--output", str(tmp_path / "f.npy")]) == 0
    assert "; .npy keeps no ids, so row i is the i-th text kept (not line i)" in (
        capsys.readouterr().err.strip().splitlines()[-1])
    assert np.allclose(np.load(tmp_path / "f.npy"), got, atol=1e-6)


@pytest.mark.parametrize("option, value, message", [
    ("--max-length", "0", "--max-length=0 must be a positive integer"),
    ("--max-length", "-3", "--max-length=-3 must be a positive integer"),
    ("--max-length", "100000", "--max-length=100000 exceeds the 128 positions"),
    ("--max-length", "129", "--max-length=129 exceeds the 128 positions"),
    ("--batch-size", "0", "--batch-size=0 must be"),
    ("--pooling", "bad", "--pooling='bad' is not one of"),
    ("--layer", "x", "--layer='x': give integers"),
    ("--layer", "-1,5", "--layer [5]: this model has hidden states 0..2"),
])
def test_features_bad_arguments_are_one_line_before_the_model_loads(
        trained, tmp_path, capsys, monkeypatch, option, value, message):
    import overture.features

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(overture.features, "load_pretrained", no_loading)
    source = tmp_path / "texts.txt"
    source.write_text(" ".join(TEXTS) * 20 + "\n")  # > 128 tokens
    assert main(["features", "--checkpoint", str(trained("bert")), "--input", str(source),
                 "--output", str(tmp_path / "o.npy"), f"{option}={value}"]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "o.npy").exists()


def test_load_checks_max_length_against_the_models_positions(trained):
    from transformers import BertConfig, LongformerConfig, RobertaConfig

    from overture.config import ConfigError

    with pytest.raises(ConfigError, match="--max-length=100000 exceeds the 128 positions"):
        overture.load(trained("bert"), max_length=100000)
    with pytest.raises(ConfigError, match="--max-length=0 must be a positive integer"):
        overture.load(trained("bert"), max_length=0)
    assert overture.load(trained("bert"), max_length=128).max_length == 128
    assert overture.load(trained("bert")).max_length == 128  # the default: the limit
    # RoBERTa-style models number positions from pad_token_id + 1
    assert position_limit(BertConfig(max_position_embeddings=128)) == 128
    assert position_limit(RobertaConfig(max_position_embeddings=66, pad_token_id=1)) == 64
    assert position_limit(LongformerConfig(max_position_embeddings=4098, pad_token_id=1)) == 4096


@pytest.mark.parametrize("options, named", [
    (["--column", "body"], "--column given"), (["--id-column", "key"], "--id-column given"),
    (["--column", "body", "--id-column", "key"], "--column and --id-column given")])
def test_features_refuses_column_options_on_a_plain_text_input(trained, tmp_path, capsys,
                                                               monkeypatch, options, named):
    import overture.features

    monkeypatch.setattr(overture.features, "load_pretrained",
                        lambda *a, **k: pytest.fail("the model loaded"))
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    assert main(["features", "--checkpoint", str(trained("bert")), "--input", str(source),
                 "--output", str(tmp_path / "o.npy"), *options]) == 2
    them = "them" if len(options) > 2 else "it"
    assert _one_line_error(capsys) == (
        f"error: {named}, but --input {source} is plain text (one text per line, no "
        f"columns); leave {them} out, or give a .csv / .tsv / .jsonl / .parquet input")
    assert not (tmp_path / "o.npy").exists()
    assert read_texts(source, None, None)[1] == TEXTS  # without them it reads as before


def test_features_refuses_an_output_that_is_a_folder_before_any_work(trained, tmp_path,
                                                                     capsys, monkeypatch):
    import overture.features
    from overture.config import ConfigError

    monkeypatch.setattr(overture.features, "load_pretrained",
                        lambda *a, **k: pytest.fail("the model loaded"))
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    folder = tmp_path / "feat" / "dir.npy"
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("user data")
    assert main(["features", "--checkpoint", str(trained("bert")), "--input", str(source),
                 "--output", str(folder), "--overwrite"]) == 2
    assert _one_line_error(capsys) == (f"error: --output {folder} is a folder; give a file "
                                       f"path (e.g. {folder / 'features.npy'})")
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    assert (folder / "keep.txt").read_text() == "user data"
    # the library call refuses it too, writing nothing
    with pytest.raises(ConfigError, match="is a folder; give a file path"):
        overture.features.write_features(folder, ["1"], np.zeros((1, 4), np.float32),
                                         overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def test_a_checkpoint_without_tokenizer_files_is_refused_not_read_as_unknown_words(
        trained, tmp_path, capsys):
    """transformers would load such a folder as an empty tokenizer of its config's class
    (BERT: 5 tokens), and every word would become [UNK]."""
    import shutil

    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trained("bert") / "final" / name, folder / name)
    (tmp_path / "t.txt").write_text("hello world\n")
    assert main(["features", "--checkpoint", str(folder), "--input", str(tmp_path / "t.txt"),
                 "--output", str(tmp_path / "o.npy")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --checkpoint {folder}: no tokenizer files there (tokenizer.json, "
        "tokenizer_config.json, vocab.txt, ...); save the tokenizer beside the model "
        "(tokenizer.save_pretrained(folder))"]
    assert not (tmp_path / "o.npy").exists()
