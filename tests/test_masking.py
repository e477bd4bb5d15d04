"""Masked-LM corruption: rate, 80/10/10 split, special tokens, labels, static vs dynamic."""

from __future__ import annotations

import pytest
import torch

from helpers import prepare
from overture.data.prepare import IndexedDataset
from overture.pretrain.text.masking import (IGNORE_INDEX, MaskingSpec, mask_tokens,
                                            non_special_ids)


@pytest.fixture(scope="module")
def dynamic_data(make_recipe):
    recipe = make_recipe("unused", "objective.masking=dynamic", "data.max_seq_len=128",
                         "objective.max_predictions_per_seq=20")
    return recipe, prepare(recipe, progress=False)


def _padded(data, count: int):
    rows = data.train[:count]["input_ids"]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), data.tokenizer.pad_token_id)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    tok = data.tokenizer
    special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id) | (ids == tok.pad_token_id)
    return ids, special


def _spec(tok, **kw) -> MaskingSpec:
    return MaskingSpec(mask_token_id=tok.mask_token_id, random_token_ids=non_special_ids(tok),
                       **kw)


def test_mask_rate_and_80_10_10_split_on_real_text(dynamic_data):
    _, data = dynamic_data
    ids, special = _padded(data, 2000)
    assert int((~special).sum()) >= 100_000, "needs at least 100k candidate tokens"
    corrupted, labels = mask_tokens(ids, special, _spec(data.tokenizer),
                                    torch.Generator().manual_seed(0))
    selected = labels != IGNORE_INDEX
    rate = selected.sum().item() / (~special).sum().item()
    assert rate == pytest.approx(0.15, abs=0.005)

    n = selected.sum().item()
    to_mask = (corrupted[selected] == data.tokenizer.mask_token_id).sum().item() / n
    unchanged = (corrupted[selected] == ids[selected]).sum().item() / n
    assert to_mask == pytest.approx(0.8, abs=0.01)
    assert unchanged == pytest.approx(0.1, abs=0.01)
    assert 1 - to_mask - unchanged == pytest.approx(0.1, abs=0.01)


def test_special_tokens_never_selected_and_labels_exact(dynamic_data):
    _, data = dynamic_data
    ids, special = _padded(data, 500)
    corrupted, labels = mask_tokens(ids, special, _spec(data.tokenizer),
                                    torch.Generator().manual_seed(1))
    selected = labels != IGNORE_INDEX
    assert not (selected & special).any()
    assert torch.equal(corrupted[special], ids[special])  # specials and padding untouched
    assert torch.equal(labels[selected], ids[selected])  # labels hold the original token
    assert torch.equal(corrupted[~selected], ids[~selected])  # nothing else changes


def test_random_replacements_are_never_special_tokens(dynamic_data):
    _, data = dynamic_data
    tok = data.tokenizer
    ids, special = _padded(data, 500)
    spec = _spec(tok, mask_replace_prob=0.0, random_replace_prob=1.0)
    corrupted, labels = mask_tokens(ids, special, spec, torch.Generator().manual_seed(2))
    replaced = corrupted[labels != IGNORE_INDEX]
    assert not torch.isin(replaced, torch.tensor(tok.all_special_ids)).any()


def test_max_predictions_per_seq_caps_each_row(dynamic_data):
    _, data = dynamic_data
    ids, special = _padded(data, 300)
    _, labels = mask_tokens(ids, special, _spec(data.tokenizer, max_predictions_per_seq=3),
                            torch.Generator().manual_seed(3))
    per_row = (labels != IGNORE_INDEX).sum(1)
    assert per_row.max().item() == 3
    assert (per_row[(~special).sum(1) >= 40] == 3).all()  # long rows hit the cap


def _collate(recipe, data, indices, epoch):
    collator = data.objective.collator(recipe.resolved_phases()[0])
    collator.set_epoch(epoch)
    return collator(IndexedDataset(data.train).__getitems__(indices))


def test_dynamic_masking_redraws_masks_each_pass(dynamic_data):
    recipe, data = dynamic_data
    indices = list(range(64))
    first, again = _collate(recipe, data, indices, 0), _collate(recipe, data, indices, 0)
    second_pass = _collate(recipe, data, indices, 1)
    assert torch.equal(first["labels"], again["labels"])  # reproducible (resume)
    assert not torch.equal(first["labels"] != IGNORE_INDEX, second_pass["labels"] != IGNORE_INDEX)
    assert not torch.equal(first["input_ids"], second_pass["input_ids"])


def test_static_masking_gives_the_same_masks_each_pass(make_recipe):
    recipe = make_recipe("unused", "objective.masking=static")
    data = prepare(recipe, progress=False)
    indices = list(range(64))
    first, second_pass = _collate(recipe, data, indices, 0), _collate(recipe, data, indices, 1)
    assert torch.equal(first["input_ids"], second_pass["input_ids"])
    assert torch.equal(first["labels"], second_pass["labels"])
    selected = first["labels"] != IGNORE_INDEX
    assert selected.any()
    # statically masked examples keep their [CLS]/[SEP] layout intact
    assert (first["input_ids"][:, 0] == data.tokenizer.cls_token_id).all()


def test_a_fractional_expected_count_is_rounded_stochastically():
    # 10 candidates x 15% = 1.5 tokens: rounding down would select 1 every time.
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (4000, 12), generator=generator)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    spec = MaskingSpec(mask_token_id=4, random_token_ids=torch.arange(10, 1000),
                       mlm_probability=0.15, max_predictions_per_seq=12)
    _, labels = mask_tokens(ids, special, spec, generator)
    counts = (labels != IGNORE_INDEX).sum(1)
    assert set(counts.tolist()) == {1, 2}
    assert counts.float().mean().item() == pytest.approx(1.5, abs=0.03)
