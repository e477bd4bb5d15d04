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


def test_a_glue_file_with_a_bom_keeps_its_first_column_name(tmp_path):
    # MRPC's label is its first column: a byte-order mark must not become part of its name
    path = tmp_path / "MRPC" / "dev.tsv"
    path.parent.mkdir()
    path.write_bytes(b"\xef\xbb\xbf" + "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                     "1\t101\t102\t\"The same three members...\" said the report.\tThe "
                     "report said the same.\n".encode())
    mrpc = GLUE["mrpc"]
    rows = read_glue_split(tmp_path, mrpc, mrpc.split("dev"))
    assert rows.texts == [('"The same three members..." said the report.',
                           "The report said the same.")]
    assert rows.labels == [mrpc.labels.index("1")]


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


# ----------------------------------------------------------------------------- custom TSV

# MRPC-style rows (Quality, #1 ID, #2 ID, #1 String, #2 String): sentences that start
# with a quote, close it mid-sentence, or never close it on their line, as news text does
QUOTED = [
    '"The same three members of the response team were there," said the report.',
    '"We are not going to comment on rumours, the spokesman said on Tuesday.',
    '"It is a big step forward for the whole region," he added.',
    '"Nobody expected the figures to be this weak," an analyst wrote.',
    '"Prices will rise again next quarter.',
    '"Our customers come first" was the slogan of the campaign.',
    '"That is simply not true," the minister told reporters in the capital.',
    '"The deal is done," both companies said in a joint statement.',
]
PLAIN = [
    "Shares of the company fell {n} percent in early trading.",
    "The board approved the plan after a {n}-hour meeting.",
    "Officials said {n} people were evacuated from the building.",
    "The report was published on day {n} of the inquiry.",
    'The agency called the result "encouraging" in its note {n}.',
]


def mrpc_style_rows(count: int = 40) -> list[tuple[str, str, str, str, str]]:
    """(label, id1, id2, sentence1, sentence2): every fifth first sentence and every
    seventh second sentence start with a quote; the others may hold quotes inside."""
    rows = []
    for i in range(count):
        first = QUOTED[i // 5 % len(QUOTED)] if i % 5 == 0 else PLAIN[i % 5].format(n=i)
        second = (QUOTED[(i + 3) % len(QUOTED)] if i % 7 == 3
                  else PLAIN[(i + 2) % 5].format(n=i + 1))
        rows.append((str(i % 2), str(1000 + 2 * i), str(1001 + 2 * i), first, second))
    return rows


def write_mrpc_style_task(folder, train_rows: int = 40, dev_rows: int = 8):
    """A custom task YAML over MRPC-style train.tsv / dev.tsv; returns (yaml, train rows,
    dev rows)."""
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    rows = mrpc_style_rows(train_rows + dev_rows)
    train, dev = rows[:train_rows], rows[train_rows:]
    for name, part in (("train", train), ("dev", dev)):
        _write(folder / f"{name}.tsv", header + "".join("\t".join(r) + "\n" for r in part))
    spec = _write(folder / "paraphrase.yaml",
                  "name: paraphrase\ntrain: train.tsv\ndev: dev.tsv\n"
                  "text_columns: ['#1 String', '#2 String']\nlabel_column: Quality\n"
                  "id_column: '#1 ID'\nlabels: ['0', '1']\nmetrics: [accuracy, f1]\n")
    return spec, train, dev


def test_tsv_fields_starting_with_a_quote_are_text_and_every_row_is_read(tmp_path):
    spec, train, dev = write_mrpc_style_task(tmp_path)
    task = load_custom_task(spec)
    rows = task.read("train")
    assert len(rows) == 40 and rows.skipped == 0
    assert rows.ids == [r[1] for r in train]
    assert rows.texts == [(r[3], r[4]) for r in train]
    assert rows.labels == [int(r[0]) for r in train]
    # the quoted fields come out exactly as written, quotes included
    assert rows.texts[0][0] == ('"The same three members of the response team were '
                                'there," said the report.')
    assert rows.texts[5][0] == ('"We are not going to comment on rumours, the spokesman '
                                'said on Tuesday.')
    assert rows.texts[3][1] == ('"That is simply not true," the minister told reporters in '
                                'the capital.')
    starts = sum(text.startswith('"') for pair in rows.texts for text in pair)
    assert starts == 8 + 6  # 8 first sentences (i % 5 == 0), 6 second ones (i % 7 == 3)
    assert len(task.read("dev")) == 8
    # a GLUE name reads through the same path: load_task on the YAML
    assert len(load_task(str(spec)).read(task.task.split("train"))) == 40


def test_a_tsv_row_with_more_fields_than_the_header_names_file_and_line(tmp_path):
    train = _write(tmp_path / "train.tsv",
                   "label\ttext\n1\tfine\n0\ta tab\tinside the text\n1\tgood\n0\t\"ok\n")
    _write(tmp_path / "dev.tsv", "label\ttext\n1\tok\n")
    spec = _write(tmp_path / "t.yaml", "name: t\ntrain: train.tsv\ndev: dev.tsv\n"
                  "text_columns: [text]\nlabel_column: label\nlabels: ['0', '1']\n")
    with pytest.raises(TaskDataError, match=f"^{train}:3: 3 fields, expected 2"):
        load_custom_task(spec).read("train")
    spec.write_text(spec.read_text() + "skip_bad_rows: true\n")
    rows = load_custom_task(spec).read("train")
    assert rows.texts == [("fine",), ("good",), ('"ok',)] and rows.skipped == 1
    # CSV too: a row wider than the header is an error; a short row lacks a field
    csv_file = _write(tmp_path / "train.csv", 'label,text\n1,"a, b"\n0,x,y\n')
    spec.write_text(spec.read_text().replace("train.tsv", "train.csv")
                    .replace("skip_bad_rows: true\n", ""))
    with pytest.raises(TaskDataError, match=f"^{csv_file}:3: 3 fields, expected 2$"):
        load_custom_task(spec).read("train")
    csv_file.write_text("label,text\n1,fine\n0\n")
    with pytest.raises(TaskDataError, match=f"^{csv_file}:3: missing field 'text'$"):
        load_custom_task(spec).read("train")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_a_bom_empty_lines_and_a_torn_last_line_are_read(tmp_path, suffix):
    lines = {".csv": ["text,label", "first one,pos", "", "second one,neg"],
             ".tsv": ["text\tlabel", "first one\tpos", "", "second one\tneg"],
             ".jsonl": ['{"text": "first one", "label": "pos"}', "",
                        '{"text": "second one", "label": "neg"}']}[suffix]
    data = tmp_path / f"train{suffix}"
    data.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())  # no final newline
    spec = _write(tmp_path / "t.yaml", f"name: t\ntrain: train{suffix}\ndev: train{suffix}\n"
                  "text_columns: [text]\nlabel_column: label\n")
    task = load_custom_task(spec)
    assert task.task.labels == ("neg", "pos")  # the header's first name is 'text', no BOM
    rows = task.read("train")
    assert rows.texts == [("first one",), ("second one",)] and rows.labels == [1, 0]


def test_a_utf16_task_file_is_refused_in_one_line(tmp_path):
    data = tmp_path / "train.tsv"
    data.write_bytes("text\tlabel\nfirst one\tpos\n".encode("utf-16"))
    _write(tmp_path / "dev.tsv", "text\tlabel\nok\tpos\n")
    spec = _write(tmp_path / "t.yaml", "name: t\ntrain: train.tsv\ndev: dev.tsv\n"
                  "text_columns: [text]\nlabel_column: label\nlabels: [neg, pos]\n")
    with pytest.raises(ConfigError) as err:
        load_custom_task(spec).read("train")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"task t: train: {data} looks like a binary file")
    assert "UTF-16" in message
