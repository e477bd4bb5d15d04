"""Next-sentence pairs: label balance, provenance of A and B, lengths."""

from __future__ import annotations

import random

import pytest

from helpers import prepare
from overture.pretrain.text.builders import sentence_starts
from overture.pretrain.text.nsp import IS_NEXT, IS_RANDOM, create_pairs

DOC_STRIDE = 100_000


def _synthetic_documents(n_docs: int, seed: int = 0) -> list[list[list[int]]]:
    """Token id = doc * DOC_STRIDE + position in the document, so any token tells which
    document it came from and where."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        position, segments = 0, []
        for _ in range(rng.randint(1, 12)):
            length = rng.randint(1, 40)
            segments.append([d * DOC_STRIDE + position + k for k in range(length)])
            position += length
        docs.append(segments)
    return docs


@pytest.fixture(scope="module")
def pairs():
    return create_pairs(_synthetic_documents(1500), max_seq_len=64, short_seq_prob=0.1,
                        rng=random.Random(7))


def test_label_balance_is_half_and_half(pairs):
    assert len(pairs) > 3000
    share = sum(p.label == IS_NEXT for p in pairs) / len(pairs)
    assert share == pytest.approx(0.5, abs=0.02)


def test_is_next_pairs_are_consecutive_text_of_one_document(pairs):
    checked_untruncated = 0
    for p in (p for p in pairs if p.label == IS_NEXT):
        docs = {t // DOC_STRIDE for t in p.tokens_a + p.tokens_b}
        assert len(docs) == 1
        a, b = [t % DOC_STRIDE for t in p.tokens_a], [t % DOC_STRIDE for t in p.tokens_b]
        assert a == list(range(a[0], a[0] + len(a)))  # A is contiguous text
        assert b == list(range(b[0], b[0] + len(b)))  # B is contiguous text
        assert b[0] > a[-1]  # B follows A
        if len(a) + len(b) < 61:  # nothing truncated: B starts right where A ends
            assert b[0] == a[-1] + 1
            checked_untruncated += 1
    assert checked_untruncated > 100


def test_random_pairs_take_b_from_another_document(pairs):
    randoms = [p for p in pairs if p.label == IS_RANDOM]
    assert randoms
    for p in randoms:
        doc_a = {t // DOC_STRIDE for t in p.tokens_a}
        doc_b = {t // DOC_STRIDE for t in p.tokens_b}
        assert len(doc_a) == 1 and doc_a != doc_b


def test_pairs_never_exceed_max_seq_len(pairs):
    assert max(len(p.tokens_a) + len(p.tokens_b) + 3 for p in pairs) <= 64
    assert all(p.tokens_a and p.tokens_b for p in pairs)


def test_short_seq_prob_produces_short_examples():
    docs = _synthetic_documents(400, seed=3)
    lengths = lambda prob: [len(p.tokens_a) + len(p.tokens_b)  # noqa: E731
                            for p in create_pairs(docs, 64, prob, random.Random(1))]
    assert sum(x < 30 for x in lengths(1.0)) > 2 * sum(x < 30 for x in lengths(0.0))


def test_lines_split_into_sentences_at_end_punctuation_and_space():
    line = "It rained . Then it stopped! Did it? yes, 3.5 mm"
    starts = sentence_starts(line)
    pieces = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], len(line)])]
    assert pieces == ["It rained .", "Then it stopped!", "Did it?", "yes, 3.5 mm"]


def _cuts_by_sentence_of_each_token(line: str, offsets) -> list[int]:
    """The rule itself, token by token: a token belongs to the sentence its first
    character is in; a cut wherever that sentence changes."""
    import bisect

    starts = sentence_starts(line)
    sentence = [bisect.bisect_right(starts, start) for start, _ in offsets]
    return [i for i in range(1, len(sentence)) if sentence[i] != sentence[i - 1]]


def test_sentence_cuts_follow_each_tokens_first_character(make_recipe):
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    from overture.pretrain.text.builders import sentence_cuts

    tok = Tokenizer.from_str(prepare(make_recipe("unused")).tokenizer.backend_tokenizer.to_str())
    lines = ["It rained.  Then it stopped! Did it? yes, 3.5 mm", "One sentence only",
             "Dots... and more. ?! . . x", "Tab.\tNew line.\u00a0Odd space. \u00c9t\u00e9.",
             "  Lead. Trail.  ", "a.b. c!  d?"]
    for line in lines:
        enc = tok.encode(line, add_special_tokens=False)
        cuts = sentence_cuts(line, enc)
        # the same pieces as the rule (a cut may repeat, or fall at 0 or the end)
        pieces = [enc.ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(enc.ids)]) if b > a]
        rule = _cuts_by_sentence_of_each_token(line, enc.offsets)
        assert pieces == [enc.ids[a:b] for a, b in zip([0, *rule], [*rule, len(enc.ids)])]
    assert len(sentence_cuts(lines[0], tok.encode(lines[0], add_special_tokens=False))) == 3
    # offsets that go back (no tokenizer here does): the rule, token by token
    line = "Aa bb. Cc dd. Ee ff."
    offsets = [(0, 2), (3, 5), (5, 6), (7, 9), (10, 12), (4, 5), (12, 13), (14, 16), (17, 19)]
    assert sentence_cuts(line, SimpleNamespace(offsets=offsets)) == [3, 5, 6, 7] == \
        _cuts_by_sentence_of_each_token(line, offsets)


def test_prepared_real_text_is_balanced_and_well_formed(make_recipe):
    recipe = make_recipe("unused", "data.max_seq_len=128", "objective.max_predictions_per_seq=20")
    data = prepare(recipe, progress=False)
    tok = data.tokenizer
    stats = data.stats
    pairs = stats[f"train_label_{IS_NEXT}"] + stats[f"train_label_{IS_RANDOM}"]
    assert stats[f"train_label_{IS_NEXT}"] / pairs == pytest.approx(0.5, abs=0.02)
    for row in data.train.select(range(min(3000, len(data.train))))["input_ids"]:
        assert len(row) <= 128
        assert row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id
        assert row.count(tok.sep_token_id) == 2
