"""Feature extraction: batch-independent pooling, layers, normalisation, the command's
files, and ``overture.load(DIR).encode`` equal to ``overture features``."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import overture
from overture.cli import main

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
