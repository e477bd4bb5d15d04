"""Bad or unusual corpus input (issue 7): clear errors naming the file, line or key;
repaired input counted; special-token strings in the text stay text; every masked-LM
row has a target."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import prepare, text_families, tiny
from overture.cli import main
from overture.config import ConfigError
from overture.data.corpus import CorpusStats, iter_documents, resolve_sources
from overture.pretrain.text.masking import IGNORE_INDEX, MaskingSpec, mask_tokens
from overture.registry import build_objective

TEXT_FAMILIES = text_families()
LITERALS = ["[SEP]", "[CLS]", "[MASK]", "[PAD]", "[UNK]", "<s>", "</s>", "<pad>", "<unk>",
            "<mask>", "<|endoftext|>"]


def _read(path: Path, stats: CorpusStats | None = None) -> list[list[str]]:
    [source] = resolve_sources([str(path)], path.parent)
    return list(iter_documents(source, "text", "train", stats or CorpusStats()))


@pytest.fixture(scope="module")
def slice_text(tmp_path_factory, real_text) -> Path:
    """About 40 KB of real text (fast tokenizer training)."""
    path = tmp_path_factory.mktemp("slice") / "slice.txt"
    path.write_text(real_text.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


# ------------------------------------------------------------------ files and formats


def test_malformed_jsonl_line_is_a_one_line_error_naming_file_and_line(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "one two three."}\n\n{"text": "four five."}\n'
                      '{"text": "six, "seven"}\n{"text": "eight."}\n')
    with pytest.raises(ConfigError, match=r"c\.jsonl, line 4, column \d+: not valid JSON"):
        _read(corpus)
    assert main(["prepare", "bert-tiny", f"data.corpus=[{corpus}]",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"error: .*c\.jsonl, line 4", err[0]), err


def test_invalid_utf8_in_jsonl_and_csv_is_replaced_and_counted(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "caf\xe9 \xff\xfe ok"}\n'
                                       b'{"text": "\xef\xbf\xbd kept"}\n')
    (tmp_path / "c.csv").write_bytes(b'text\n"caf\xe9 \xff\xfe ok"\n\xef\xbf\xbd kept\n')
    (tmp_path / "c.tsv").write_bytes(b'id\ttext\n1\tcaf\xe9 \xff\xfe ok\n2\t\xef\xbf\xbd kept\n')
    for name in ("c.jsonl", "c.csv", "c.tsv"):
        stats = CorpusStats()
        assert _read(tmp_path / name, stats) == [["caf\ufffd \ufffd\ufffd ok"],
                                                 ["\ufffd kept"]], name
        assert stats.invalid_utf8_replaced == 3, name  # a literal U+FFFD is not counted
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext\na\n")
    assert _read(tmp_path / "bom.jsonl") == _read(tmp_path / "bom.csv") == [["a"]]


def test_binary_file_is_refused_as_not_text(tmp_path):
    program = tmp_path / "program"
    program.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    with pytest.raises(ConfigError, match=r"program looks like a binary file.*NUL"):
        resolve_sources([str(program)], tmp_path)
    noise = tmp_path / "noise.txt"  # no NUL, but mostly not UTF-8 (e.g. Latin-1 / images)
    noise.write_bytes(bytes(random.Random(0).randrange(128, 256) for _ in range(2000)))
    with pytest.raises(ConfigError, match=r"noise\.txt looks like a binary file.*invalid UTF-8"):
        resolve_sources([str(noise)], tmp_path)
    latin1 = tmp_path / "latin1.txt"  # a few bad bytes in text are repaired, not refused
    latin1.write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9. ".encode("latin-1")
                       * 20)
    assert _read(latin1)


def test_directory_as_corpus_says_it_is_a_directory_and_suggests_a_glob(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"texts' is a directory.*texts/\*\.txt"):
        resolve_sources([str(folder)], tmp_path)


def test_whitespace_only_lines_are_counted_as_empty_lines_skipped(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n\n")
    stats = CorpusStats()
    assert _read(blank, stats) == [] and stats.empty_lines_skipped == 4
    recipe = tiny("bert", "unused", tmp_path / "cache", blank)
    with pytest.raises(ConfigError, match=r"empty lines skipped: 4"):
        prepare(recipe)
    leading = tmp_path / "leading.txt"  # leading / trailing blanks are skipped, not separators
    leading.write_text(" \n\nfirst doc\n \nsecond doc\n\n\n")
    stats = CorpusStats()
    assert _read(leading, stats) == [["first doc"], ["second doc"]]
    assert stats.empty_lines_skipped == 3


# ------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("family", ["bert", "roberta", "albert"])  # wordpiece, bpe, unigram
def test_too_small_vocab_size_names_the_key_and_a_minimum_that_works(family, tmp_path,
                                                                     slice_text):
    def tokenizer(vocab_size: int):
        return build_objective(tiny(family, "unused", tmp_path / "cache", slice_text,
                                    f"tokenizer.vocab_size={vocab_size}")).load_tokenizer()

    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size=50 is too small") as err:
        tokenizer(50)
    minimum = int(re.search(r"needs at least (\d+)", str(err.value)).group(1))
    assert len(tokenizer(minimum)) == minimum  # the minimum named is enough, and exact
    with pytest.raises(ConfigError, match=f"needs at least {minimum}"):
        tokenizer(minimum - 1)


# ------------------------------------------------------------------ special-token strings


@pytest.fixture(scope="module")
def literal_corpus(tmp_path_factory, real_text) -> Path:
    """Real paragraphs, about 30% of them with a special-token string of some family."""
    rng = random.Random(0)
    # blank lines separate documents (WikiText's hold a space)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n",
                                              real_text.read_text(encoding="utf-8")[:150_000])
                  if p.strip()]
    docs = []
    for paragraph in paragraphs:
        if rng.random() < 0.3:
            words = paragraph.split()
            for _ in range(rng.randint(1, 3)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(LITERALS))
            paragraph = " ".join(words)
        docs.append(paragraph)
    path = tmp_path_factory.mktemp("literals") / "literals.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_special_token_strings_in_the_text_never_become_special_ids(family, tmp_path,
                                                                    literal_corpus):
    extra = ["objective.masking=dynamic"] if family != "gpt" else []  # inputs as cut
    recipe = tiny(family, "unused", tmp_path / "cache", literal_corpus, *extra)
    data = prepare(recipe)
    tok = data.tokenizer
    special = set(tok.all_special_ids)
    # where text is encoded: no line gives a special id
    builder = data.objective.builder(recipe.resolved_phases()[0])
    builder.setup()
    docs = [[line] for line in literal_corpus.read_text(encoding="utf-8").splitlines()
            if any(s in line for s in LITERALS)]
    assert len(docs) > 50
    encoded = [v for doc in builder.tokenize(docs, 10_000, Counter()) for s in doc for v in s]
    ids = [v >> 1 for v in encoded] if builder.units != "token" else encoded
    leaked = Counter(tok.convert_ids_to_tokens(i) for i in ids if i in special)
    assert not leaked, leaked
    # the examples keep their layout: [CLS] A [SEP] B [SEP] (BERT NSP, ALBERT SOP)
    if family in ("bert", "albert"):
        for row in data.train["input_ids"]:
            assert row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id
            assert row.count(tok.sep_token_id) == 2 and row.count(tok.cls_token_id) == 1
            assert not special - {tok.sep_token_id} & set(row[1:-1])


# ------------------------------------------------------------------ masked-LM targets


def _short_rows(rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] 1..8 tokens [SEP] rows (padded): 15% of them is below one token."""
    ids = torch.randint(10, 1000, (rows, 10), generator=generator)
    lengths = torch.randint(1, 9, (rows,), generator=generator)
    special = torch.arange(10)[None, :] > lengths[:, None]  # [SEP] and padding
    special[:, 0] = True  # [CLS]
    return ids, special


@pytest.mark.parametrize("scheme", ["token", "word", "ngram"])
def test_every_row_with_a_maskable_token_gets_an_mlm_target(scheme):
    generator = torch.Generator().manual_seed(0)
    ids, special = _short_rows(4000, generator)
    units = None
    if scheme == "word":  # words of 1-3 tokens
        units = (torch.rand(ids.shape, generator=generator) < 0.5).long()
    spec = MaskingSpec(mask_token_id=4, random_token_ids=torch.arange(10, 1000),
                       max_predictions_per_seq=20, max_ngram=3 if scheme == "ngram" else 1)
    _, labels = mask_tokens(ids, special, spec, generator, units)
    targets = (labels != IGNORE_INDEX).sum(1)
    has_candidate = (~special).sum(1) > 0
    assert has_candidate.all()
    assert (targets[has_candidate] >= 1).all(), int((targets[has_candidate] == 0).sum())
    assert (targets[~has_candidate] == 0).all()


def test_static_masking_gives_every_example_a_target(tmp_path, slice_text):
    # ALBERT: static n-gram masking; short pairs (short_seq_prob=1)
    recipe = tiny("albert", "unused", tmp_path / "cache", slice_text,
                  "data.short_seq_prob=1.0", "data.max_seq_len=16")
    data = prepare(recipe)
    assert len(data.train) > 100
    assert all(len(p) > 0 for p in data.train["mlm_positions"])


def test_json_array_file_is_still_read(tmp_path):
    corpus = tmp_path / "rows.json"
    corpus.write_text(json.dumps([{"text": "alpha one."}, {"text": "beta"}]))
    assert _read(corpus) == [["alpha one."], ["beta"]]


def test_a_tsv_corpus_keeps_quotes_as_text_and_every_line_is_a_row(tmp_path):
    # TSV has no quoting (as the GLUE files): a field that starts with a quote must not
    # swallow the tabs and lines after it; CSV keeps its quoting
    texts = ['"The same three members of the team were there," said the report.',
             '"We will not comment on rumours, the spokesman said.',
             "Shares fell 3 percent in early trading.",
             'The agency called the result "encouraging".',
             '"Prices will rise again.']
    (tmp_path / "c.tsv").write_text(
        "id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)), encoding="utf-8")
    assert _read(tmp_path / "c.tsv") == [[t] for t in texts]
    (tmp_path / "c.csv").write_text('id,text\n1,"a, quoted\nfield"\n2,"say ""hi"""\n',
                                    encoding="utf-8")
    assert _read(tmp_path / "c.csv") == [["a, quoted", "field"], ['say "hi"']]


def test_a_corpus_row_with_more_fields_than_the_header_names_file_and_line(tmp_path):
    """A tab inside a TSV text (or an unquoted comma in a CSV one) would silently drop the
    text after it: the row is refused, naming its line."""
    (tmp_path / "c.tsv").write_text("id\ttext\n1\tfine text.\n2\tbefore tab.\tafter tab.\n")
    with pytest.raises(ConfigError, match=r"c\.tsv, line 3: 3 fields, more than the "
                                          r"header's 2 \(a tab inside a text\?\)"):
        _read(tmp_path / "c.tsv")
    (tmp_path / "c.csv").write_text('text\n"a, quoted text"\nan, unquoted one\n')
    with pytest.raises(ConfigError, match=r"c\.csv, line 3: 2 fields, more than the "
                                          r"header's 1"):
        _read(tmp_path / "c.csv")
