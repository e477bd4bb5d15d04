"""Tasks: metrics against hand-computed values, the official GLUE loaders on fixtures in
the distributed layout, the Hub loader on a local copy, custom task YAML, submission
files."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from overture.config import ConfigError
from overture.tasks import GLUE, SCORED, TaskDataError, get_task, load_task
from overture.tasks.custom import load_custom_task
from overture.tasks.glue import read_glue_split, read_hub_split
from overture.tasks.metrics import compute, glue_score, task_score
from overture.tasks.submission import write_submission

# ----------------------------------------------------------------------------- metrics


def test_classification_metrics_match_hand_computed_values():
    pred, gold = [1, 0, 1, 1], [1, 0, 0, 1]
    got = compute(("accuracy", "f1"), pred, gold)
    assert got["accuracy"] == pytest.approx(0.75)
    assert got["f1"] == pytest.approx(0.8)  # tp 2, fp 1, fn 0: P 2/3, R 1
    # TP 1, TN 2, FP 1, FN 0: (1*2 - 1*0) / sqrt(2 * 1 * 3 * 2)
    mcc = compute(("matthews_correlation",), [1, 1, 0, 0], [1, 0, 0, 0])
    assert mcc["matthews_correlation"] == pytest.approx(2 / math.sqrt(12))


def test_correlations_match_hand_computed_values():
    got = compute(("pearson", "spearman"), [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert got["pearson"] == pytest.approx(3 / math.sqrt(2 * 42 / 9))  # cov 3, var 2, 42/9
    assert got["spearman"] == pytest.approx(1.0)  # same ranks
    # ranks differ by 0, 1, 1: 1 - 6 * 2 / (3 * (9 - 1))
    assert compute(("spearman",), [1, 3, 2], [1, 2, 3])["spearman"] == pytest.approx(0.5)


def test_task_score_averages_its_metrics_and_glue_averages_tasks():
    assert task_score({"f1": 0.8, "accuracy": 0.75}, ("f1", "accuracy")) == pytest.approx(0.775)
    assert glue_score({"mrpc": 0.775, "rte": 0.5}) == pytest.approx(0.6375)


def test_the_table_holds_every_glue_task_with_its_official_metrics():
    assert set(GLUE) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte",
                         "wnli", "ax"}
    assert set(SCORED) == set(GLUE) - {"ax"}
    assert GLUE["cola"].metrics == ("matthews_correlation",)
    assert set(GLUE["mrpc"].metrics) == set(GLUE["qqp"].metrics) == {"f1", "accuracy"}
    assert GLUE["stsb"].metrics == ("pearson", "spearman") and GLUE["stsb"].is_regression
    assert [s.name for s in GLUE["mnli"].dev_splits] == ["dev_matched", "dev_mismatched"]
    assert get_task("SST-2") is GLUE["sst2"]
    with pytest.raises(KeyError, match="did you mean 'sst2'"):
        get_task("sst3")


# ----------------------------------------------------------------------------- loaders


def _write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_cola_has_no_header_and_its_test_file_has_one(tmp_path):
    _write(tmp_path / "CoLA" / "train.tsv",
           "gj04\t1\t\tOur friends won't buy this analysis.\n"
           "gj04\t0\t*\tThey drank the pub.\n")
    _write(tmp_path / "CoLA" / "test.tsv", "index\tsentence\n0\tBill whistled past the house.\n")
    cola = GLUE["cola"]
    rows = read_glue_split(tmp_path, cola, cola.split("train"))
    assert rows.texts == [("Our friends won't buy this analysis.",), ("They drank the pub.",)]
    assert rows.labels == [1, 0]
    test = read_glue_split(tmp_path, cola, cola.split("test"))
    assert test.ids == ["0"] and test.labels == [None]


def test_quotes_inside_sentences_are_kept_verbatim(tmp_path):
    _write(tmp_path / "SST-2" / "dev.tsv",
           'sentence\tlabel\nhe said " wonderful " and left .\t1\n"quoted start\t0\n')
    rows = read_glue_split(tmp_path, GLUE["sst2"], GLUE["sst2"].split("dev"))
    assert rows.texts == [('he said " wonderful " and left .',), ('"quoted start',)]
    assert rows.labels == [1, 0]


def test_mnli_columns_are_found_by_header_name(tmp_path):
    header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse"
              "\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3"
              "\tlabel4\tlabel5\tgold_label\n")
    row = "0\t1\t1e\tfiction\t( a )\t( b )\t(S a)\t(S b)\tA man sleeps.\tA person rests.\t" \
          "entailment\tentailment\tneutral\tentailment\tentailment\tentailment\n"
    _write(tmp_path / "MNLI" / "dev_matched.tsv", header + row)
    mnli = GLUE["mnli"]
    rows = read_glue_split(tmp_path, mnli, mnli.split("dev_matched"))
    assert rows.texts == [("A man sleeps.", "A person rests.")]
    assert rows.labels == [mnli.labels.index("entailment")]


def test_a_wrong_field_count_or_unknown_label_names_the_file_and_line(tmp_path):
    path = _write(tmp_path / "RTE" / "train.tsv",
                  "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n"
                  "1\tA.\tB.\n2\tC.\tD.\tmaybe\n3\tE.\tF.\tnot_entailment\n")
    rte = GLUE["rte"]
    with pytest.raises(TaskDataError, match=f"{path}:3: 3 fields, expected 4"):
        read_glue_split(tmp_path, rte, rte.split("train"))
    rows = read_glue_split(tmp_path, rte, rte.split("train"), skip_bad_rows=True)
    assert rows.ids == ["0", "3"] and rows.skipped == 2  # line 4's label 'maybe' too
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tmaybe\n")
    with pytest.raises(TaskDataError, match=f"{path}:2: label 'maybe' is not one of"):
        read_glue_split(tmp_path, rte, rte.split("train"))


def test_a_missing_task_file_names_the_expected_path(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "QNLI" / "train.tsv")):
        read_glue_split(tmp_path, GLUE["qnli"], GLUE["qnli"].split("train"))


def test_the_hub_loader_reads_a_local_copy_of_the_glue_dataset(tmp_path):
    # The layout of the Hub's nyu-mll/glue: one folder per config, Parquet per split,
    # configs declared in the README; MNLI's class order differs from the TSV files'.
    _write(tmp_path / "README.md", "---\nconfigs:\n- config_name: mnli\n  data_files:\n"
           "  - split: validation_matched\n    path: mnli/validation_matched-*.parquet\n---\n")
    (tmp_path / "mnli").mkdir()
    pq.write_table(pa.table({"premise": ["A man sleeps.", "It rains."],
                             "hypothesis": ["A person rests.", "It is dry."],
                             "label": [0, 2], "idx": [0, 1]}),
                   tmp_path / "mnli" / "validation_matched-00000-of-00001.parquet")
    mnli = GLUE["mnli"]
    rows = read_hub_split(mnli, mnli.split("dev_matched"), str(tmp_path))
    assert rows.texts[1] == ("It rains.", "It is dry.")
    assert [mnli.labels[y] for y in rows.labels] == ["entailment", "contradiction"]


# ----------------------------------------------------------------------------- custom


def test_a_custom_task_reads_csv_jsonl_and_parquet_and_round_trips(tmp_path):
    _write(tmp_path / "data" / "train.csv",
           'title,body,stars\nGood,"Loved it, truly",pos\nBad,"Broke, sadly",neg\n')
    _write(tmp_path / "data" / "dev.jsonl",
           '{"title": "Fine", "body": "Works", "stars": "pos"}\n')
    pq.write_table(pa.table({"title": ["Meh"], "body": ["Ok"], "id": ["t1"]}),
                   tmp_path / "data" / "test.parquet")
    spec = _write(tmp_path / "reviews.yaml",
                  "name: reviews\ntrain: data/train.csv\ndev: data/dev.jsonl\n"
                  "test: data/test.parquet\ntext_columns: [title, body]\nlabel_column: stars\n"
                  "metrics: [accuracy, f1]\nid_column: id\n")
    task = load_custom_task(spec)
    assert task.task.labels == ("neg", "pos") and task.task.metrics == ("accuracy", "f1")
    train = task.read("train")
    assert train.texts == [("Good", "Loved it, truly"), ("Bad", "Broke, sadly")]
    assert train.labels == [1, 0]
    assert task.read("dev").labels == [1]
    test = task.read("test")
    assert test.ids == ["t1"] and test.labels == [None]
    again = _write(tmp_path / "again.yaml", task.to_yaml())
    assert load_custom_task(again).config == task.config


def test_a_custom_row_with_a_missing_field_or_unknown_label_names_file_and_line(tmp_path):
    train = _write(tmp_path / "train.csv", "text,label\nfine,pos\n,neg\ngood,maybe\n")
    _write(tmp_path / "dev.csv", "text,label\nok,pos\n")
    spec = _write(tmp_path / "t.yaml", "name: t\ntrain: train.csv\ndev: dev.csv\n"
                  "text_columns: [text]\nlabel_column: label\nlabels: [neg, pos]\n")
    task = load_custom_task(spec)
    with pytest.raises(TaskDataError, match=f"{train}:3: missing field 'text'"):
        task.read("train")
    spec.write_text(spec.read_text() + "skip_bad_rows: true\n")
    rows = load_custom_task(spec).read("train")
    assert rows.texts == [("fine",)] and rows.skipped == 2


def test_a_custom_task_file_with_a_bad_key_is_a_clear_error(tmp_path):
    spec = _write(tmp_path / "t.yaml", "name: t\ntrain: a.csv\ndev: b.csv\ntext_column: [x]\n"
                  "label_column: y\n")
    with pytest.raises(ConfigError, match=f"{spec}: missing keys \\['text_columns'\\]"):
        load_custom_task(spec)
    spec.write_text("name: t\ntrain: a.csv\ndev: b.csv\ntext_columns: [x]\nlabel_column: y\n"
                    "metrics: [acuracy]\n")
    with pytest.raises(ConfigError, match="did you mean 'accuracy'"):
        load_custom_task(spec)


def test_load_task_takes_a_glue_name_or_a_yaml_path(tmp_path):
    assert load_task("rte", str(tmp_path)).task is GLUE["rte"]
    with pytest.raises(ConfigError, match="unknown task 'rtee'"):
        load_task("rtee")


# ----------------------------------------------------------------------------- submission


def test_submission_files_have_the_leaderboard_names_and_label_strings(tmp_path):
    sst2, mnli, stsb = GLUE["sst2"], GLUE["mnli"], GLUE["stsb"]
    path = write_submission(tmp_path, sst2, sst2.split("test"), ["0", "1"], [1, 0])
    assert path.name == "SST-2.tsv"
    assert path.read_text() == "index\tprediction\n0\t1\n1\t0\n"
    path = write_submission(tmp_path, mnli, mnli.split("test_mismatched"), ["7"],
                            [mnli.labels.index("neutral")])
    assert path.name == "MNLI-mm.tsv" and path.read_text().splitlines()[1] == "7\tneutral"
    path = write_submission(tmp_path, stsb, stsb.split("test"), ["0", "1"], [5.7, -0.2])
    assert path.read_text().splitlines()[1:] == ["0\t5.000", "1\t0.000"]
    rte = GLUE["rte"]
    assert write_submission(tmp_path, rte, rte.split("test"), ["3"], [1]).read_text() \
        == "index\tprediction\n3\tnot_entailment\n"
