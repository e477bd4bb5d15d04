"""What each family promises beyond the contract: RoBERTa's packing and positions,
ALBERT's sentence order and n-gram spans, whole-word and knowledge masking, GPT's blocks
and sampling."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from helpers import prepare, tiny
from overture.cli import main
from overture.data.prepare import IndexedDataset
from overture.pretrain.text.masking import IGNORE_INDEX, MaskingSpec, mask_tokens
from overture.pretrain.text.packing import pack_blocks, pack_sentences
from overture.pretrain.text.sop import IN_ORDER, SWAPPED, create_sop_pairs

SEP = -1


def _documents(seed: int, count: int = 80) -> list[list[list[int]]]:
    """Documents of sentences; token = document * 1000 + sentence (lengths 1..9)."""
    rng = random.Random(seed)
    return [[[d * 1000 + s] * rng.randint(1, 9) for s in range(rng.randint(1, 6))]
            for d in range(count)]


def _doc(token: int) -> int:
    return token // 1000


# ---------------------------------------------------------------------------- RoBERTa


def test_full_sentences_fill_inputs_and_cross_documents_only_at_a_separator():
    docs = _documents(0)
    blocks = pack_sentences(docs, 20, SEP, cross_documents=True, counts=Counter())
    assert len(blocks) > 10
    for block in blocks:
        assert len(block) <= 20
        for a, b in zip(block, block[1:]):
            if SEP not in (a, b):
                assert _doc(a) == _doc(b)  # a document change is always marked
        for i, t in enumerate(block):
            if t == SEP:
                assert 0 < i < len(block) - 1 and _doc(block[i - 1]) != _doc(block[i + 1])
    for block, following in zip(blocks, blocks[1:]):  # closed only when the next won't fit
        first = following[0]
        length = following.count(first)
        starts_document = first % 1000 == 0
        assert len(block) + length + starts_document > 20
    # every sentence whole, in order: the blocks are the corpus minus the dropped tail
    stream = [t for b in blocks for t in b if t != SEP]
    corpus = [t for d in docs for s in d for t in s]
    assert corpus[:len(stream)] == stream
    sentences = Counter(stream)
    assert all(sentences[s[0]] == len(s) for d in docs for s in d if s[0] in sentences)


def test_doc_sentences_never_cross_a_document():
    blocks = pack_sentences(_documents(1), 20, SEP, cross_documents=False, counts=Counter())
    for block in blocks:
        assert SEP not in block and len({_doc(t) for t in block}) == 1 and len(block) <= 20
    crossing = pack_sentences(_documents(1), 20, SEP, cross_documents=True, counts=Counter())
    assert any(SEP in b for b in crossing)  # the same documents do cross when allowed


def test_roberta_inputs_are_packed_full_on_real_text(cache_dir, real_text):
    # long inputs, as the paper's 512: a sentence is small against them
    data = prepare(tiny("roberta", "unused", cache_dir, real_text, "data.max_seq_len=256",
                        "model.max_position_embeddings=256"))
    tok = data.tokenizer
    rows = data.train.select(range(min(2000, len(data.train))))["input_ids"]
    assert all(r[0] == tok.bos_token_id and r[-1] == tok.eos_token_id for r in rows)
    assert all(len(r) <= 256 for r in rows)
    assert np.mean([len(r) for r in rows]) / 256 > 0.85  # full to within one sentence


def test_roberta_position_table_is_offset_by_the_padding_id(cache_dir, real_text):
    recipe = tiny("roberta", "unused", cache_dir, real_text)
    data = prepare(recipe)
    model = data.objective.build_models()["model"].model
    pad = data.tokenizer.pad_token_id
    assert pad == 1
    assert model.config.max_position_embeddings == 128 + pad + 1
    ids = torch.randint(5, 1000, (2, 128))  # the longest input the recipe allows
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (2, 128, model.config.vocab_size)


def test_roberta_dynamic_masks_change_every_epoch(cache_dir, real_text):
    recipe = tiny("roberta", "unused", cache_dir, real_text)
    data = prepare(recipe)
    collator = data.objective.collator(recipe.resolved_phases()[0])
    rows = IndexedDataset(data.train).__getitems__(list(range(32)))
    labels = []
    for epoch in (0, 1, 0):
        collator.set_epoch(epoch)
        labels.append(collator(rows)["labels"] != IGNORE_INDEX)
    assert not torch.equal(labels[0], labels[1]) and torch.equal(labels[0], labels[2])


# ---------------------------------------------------------------------------- ALBERT


def test_sop_pairs_are_consecutive_spans_swapped_half_the_time():
    rng = random.Random(0)
    docs = []
    for d in range(400):  # strictly increasing tokens: order is visible in the values
        start = d * 10_000
        lengths = [rng.randint(3, 15) for _ in range(rng.randint(1, 8))]
        offsets = np.cumsum([0, *lengths])
        docs.append([list(range(start + a, start + b)) for a, b in zip(offsets, offsets[1:])])
    pairs = create_sop_pairs(docs, 64, 0.1, random.Random(1))
    assert len(pairs) > 300
    for p in pairs:
        assert _doc(p.tokens_a[0] // 10) == _doc(p.tokens_b[0] // 10)  # one document
        if p.label == IN_ORDER:
            assert max(p.tokens_a) < min(p.tokens_b)
        else:
            assert p.label == SWAPPED and min(p.tokens_a) > max(p.tokens_b)


def test_a_one_segment_document_still_gives_an_ordered_pair():
    docs = [[list(range(d * 100, d * 100 + 10))] for d in range(200)]  # one segment each
    pairs = create_sop_pairs(docs, 64, 0.0, random.Random(2))
    assert len(pairs) == 200  # one pair per document, none dropped, no random partner
    for p in pairs:
        a, b = (p.tokens_a, p.tokens_b) if p.label == IN_ORDER else (p.tokens_b, p.tokens_a)
        assert a + b == list(range(a[0], a[0] + 10))  # the segment, split in two


def test_sop_labels_are_balanced_on_real_text(cache_dir, real_text):
    stats = prepare(tiny("albert", "unused", cache_dir, real_text)).stats
    total = stats["train_label_0"] + stats["train_label_1"]
    assert total == stats["train_examples"] > 1000
    assert stats["train_label_1"] / total == pytest.approx(0.5, abs=0.02)


def test_ngram_span_lengths_follow_one_over_n_at_a_15_percent_rate():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (600, 256), generator=generator)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    spec = MaskingSpec(mask_token_id=4, random_token_ids=torch.arange(10, 1000),
                       mlm_probability=0.15, max_predictions_per_seq=256,
                       mask_replace_prob=0.8, random_replace_prob=0.1, max_ngram=3)
    _, labels = mask_tokens(ids, special, spec, generator)
    selected = (labels != IGNORE_INDEX).numpy()
    assert selected.sum() / (~special).sum().item() == pytest.approx(0.15, abs=0.005)
    spans: Counter = Counter()
    for row in selected:  # spans never touch, so each run of selected tokens is one span
        edges = np.diff(np.r_[0, row.astype(int), 0])
        spans.update((np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist())
    total = sum(spans.values())
    assert set(spans) == {1, 2, 3}
    # p(n) = (1/n) / (1 + 1/2 + 1/3): 6/11, 3/11, 2/11
    for n, p in {1: 6 / 11, 2: 3 / 11, 3: 2 / 11}.items():
        assert spans[n] / total == pytest.approx(p, abs=0.02), (n, spans)


def test_albert_factorizes_embeddings_and_shares_layers(cache_dir, real_text):
    recipe = tiny("albert", "unused", cache_dir, real_text, "model.num_hidden_layers=6")
    objective = prepare(recipe).objective
    model = objective.build_models()["model"].model
    embeddings = model.albert.embeddings.word_embeddings.weight
    assert embeddings.shape == (len(objective.tokenizer), 64)  # V x E, E != H
    assert model.albert.encoder.embedding_hidden_mapping_in.weight.shape == (128, 64)
    assert len(model.albert.encoder.albert_layer_groups) == 1  # 6 layers, one weight set
    deeper = sum(p.numel() for p in model.parameters())
    shallow = sum(p.numel() for p in prepare(tiny("albert", "unused", cache_dir, real_text))
                  .objective.build_models()["model"].parameters())
    assert deeper == shallow  # depth costs no parameters


# ---------------------------------------------------------------------------- word units


def _partial_words(recipe) -> tuple[int, int]:
    """(words partly selected, multi-token words wholly selected) over 64 rows."""
    data = prepare(recipe)
    collator = data.objective.collator(recipe.resolved_phases()[0])
    rows = IndexedDataset(data.train).__getitems__(list(range(64)))
    labels = collator(rows)["labels"]
    special_ids = data.tokenizer.all_special_ids
    partial = whole = 0
    for i, (ids, starts) in enumerate(zip(rows["columns"]["input_ids"],
                                          rows["columns"]["unit_start"])):
        selected = (labels[i, :len(ids)] != IGNORE_INDEX).numpy()
        # a word cut by pair truncation starts again after [CLS] / [SEP]
        after_special = np.r_[False, np.isin(ids, special_ids)[:-1]]
        units = np.cumsum(np.asarray(starts, dtype=bool) | after_special)
        for u in np.unique(units[selected]):
            in_unit = selected[units == u]
            partial += int(not in_unit.all())
            whole += int(in_unit.all() and len(in_unit) > 1)
    return partial, whole


def test_whole_word_masking_never_masks_part_of_a_word(cache_dir, real_text):
    recipe = tiny("bert", "unused", cache_dir, real_text, "objective.masking=dynamic",
                  "objective.mask_unit=word")
    partial, whole = _partial_words(recipe)
    assert partial == 0 and whole > 10


def test_knowledge_masking_treats_a_listed_phrase_as_one_unit(cache_dir, tmp_path):
    corpus = tmp_path / "cities.txt"
    lines = ["She moved to New York City in spring. The New Yorker wrote about it.",
             "Prices in New York City rose. A new york city guide sold well."]
    corpus.write_text("\n\n".join(lines * 200) + "\n", encoding="utf-8")
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("# entities\nNew York City\n", encoding="utf-8")
    recipe = tiny("bert", "unused", tmp_path / "cache", corpus, "objective.masking=dynamic",
                  "objective.mask_unit=knowledge", f"objective.knowledge_phrases={phrases}",
                  "tokenizer.vocab_size=200")
    data = prepare(recipe)
    builder = data.objective.builder(recipe.resolved_phases()[0])
    builder.setup()
    tok = data.tokenizer
    [sentences] = builder.tokenize([[lines[0]]], 1000, Counter())
    encoded = [v for sentence in sentences for v in sentence]
    ids, starts = [v >> 1 for v in encoded], [v & 1 for v in encoded]
    words = tok.convert_ids_to_tokens(ids)
    city = tok("new york city", add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(ids)) if ids[i:i + len(city)] == city)
    assert starts[at] == 1 and not any(starts[at + 1:at + len(city)])  # one unit
    yorker = tok("new yorker", add_special_tokens=False)["input_ids"]
    at = next(i for i in range(at + len(city), len(ids)) if ids[i:i + len(yorker)] == yorker)
    assert starts[at + 1] == 1, words  # "New Yorker" is not the phrase: word boundaries
    partial, whole = _partial_words(recipe)
    assert partial == 0 and whole > 0


# ---------------------------------------------------------------------------- GPT


def test_gpt_blocks_are_exactly_block_size_and_labels_are_the_inputs(cache_dir, real_text):
    from transformers import GPT2LMHeadModel

    recipe = tiny("gpt", "unused", cache_dir, real_text)
    data = prepare(recipe)
    lengths = set(map(len, data.train["input_ids"])) | set(map(len, data.eval["input_ids"]))
    assert lengths == {128}
    eot = data.tokenizer.eos_token_id
    stream = [t for row in data.train.select(range(200))["input_ids"] for t in row]
    assert stream.count(eot) > 5  # documents joined by <|endoftext|>
    batch = data.objective.collator(recipe.resolved_phases()[0])(
        IndexedDataset(data.train).__getitems__([0, 1, 2]))
    assert torch.equal(batch["labels"], batch["input_ids"])
    module = data.objective.build_models()["model"].eval()
    with torch.no_grad():
        sums = module(**batch)
        reference = GPT2LMHeadModel.forward(module.model, input_ids=batch["input_ids"],
                                            labels=batch["labels"]).loss
    count = data.objective.target_counts(batch)["lm"]
    assert count == 3 * 127
    assert (sums["lm_loss_sum"] / count).item() == pytest.approx(reference.item(), rel=1e-5)


def test_pack_blocks_drops_only_the_last_partial_block():
    counts: Counter = Counter()
    blocks = pack_blocks([[[1, 2, 3]], [[4, 5]], [[6]]], 4, 0, counts)
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6]] and counts["tokens_dropped"] == 1


def test_generate_samples_reproducibly_from_a_trained_gpt(trained, capsys):
    run = trained("gpt")
    args = ["generate", "--checkpoint", str(run), "--prompt", "The war", "--max-new-tokens",
            "12", "--seed", "3"]
    outputs = []
    for extra in ([], [], ["--seed", "4"], ["--temperature", "0"],
                  ["--temperature", "0", "--seed", "4"]):
        assert main([*args, *extra]) == 0
        outputs.append(capsys.readouterr().out.strip())
    assert outputs[0] == outputs[1] and outputs[0].startswith("The war")
    assert outputs[0] != outputs[2]
    assert outputs[3] == outputs[4]  # greedy: the seed does not matter
    assert len(outputs[0]) > len("The war")


def test_final_works_with_the_text_generation_pipeline(trained):
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(trained("gpt") / "final"))
    text = generator("The war", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("The war") and len(text) > len("The war")


def test_generate_keeps_the_end_of_a_prompt_too_long_for_the_model(trained, capsys,
                                                                    monkeypatch):
    import logging

    heard: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: heard.append(record.getMessage())
    monkeypatch.setattr(logging.getLogger("transformers"), "handlers",
                        [*logging.getLogger("transformers").handlers, handler])
    long_prompt = "the history of the city " * 60  # > 128 tokens
    assert main(["generate", "--checkpoint", str(trained("gpt") / "final"), "--prompt",
                 long_prompt, "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "keeping its last 123" in captured.err
    # overture's note only: not transformers' "longer than the specified maximum" warning
    assert heard == [], heard


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "no/such/run"], "no/such/run"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "500"], "--max-new-tokens=500 must be below the model's context "
                                  "of 128"),
    (["--top-p", "1.5"], "--top-p=1.5 must be"),
    (["--top-p", "nan"], "--top-p=nan must be a finite number"),
    (["--temperature", "nan"], "--temperature=nan must be a finite number"),
    (["--temperature", "inf"], "--temperature=inf must be a finite number"),
    (["--temperature", "-1"], "--temperature=-1.0 must be"),
    (["--top-k", "-1"], "--top-k=-1 must be"),
])
def test_generate_bad_input_is_one_clear_line(trained, capsys, monkeypatch, args, message):
    import overture.generate

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the input was checked")

    monkeypatch.setattr(overture.generate, "load_pretrained", no_loading)
    base = {"--checkpoint": str(trained("gpt")), "--prompt": "The"}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    assert main(["generate", *[x for kv in base.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err


def test_generate_refuses_a_masked_lm_checkpoint(trained, capsys):
    assert main(["generate", "--checkpoint", str(trained("bert")), "--prompt", "The"]) == 2
    assert "which generates nothing" in capsys.readouterr().err


def test_generate_refuses_an_image_checkpoint_saying_so(tmp_path, capsys):
    final = tmp_path / "run" / "final"  # as a timm / torchvision run writes it
    final.mkdir(parents=True)
    (final / "config.json").write_text(json.dumps({"architecture": "resnet18",
                                                   "num_classes": 10}))
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "The"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: --checkpoint {tmp_path / 'run'} is an image checkpoint, which "
                     "generates nothing: generate takes a GPT-style one (a gpt family final/ "
                     "or a transformers causal LM) or a text-to-image one (gan-int-cls, dfgan)"]


def test_tokenizer_kind_overrides_the_familys_choice(tmp_path, real_text):
    import json

    corpus = tmp_path / "slice.txt"
    corpus.write_text(real_text.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    models = {}
    for kind in (None, "unigram"):
        extra = [f"tokenizer.kind={kind}"] if kind else []
        tok = prepare(tiny("gpt", "unused", tmp_path / "cache", corpus, "tokenizer.vocab_size=300",
                           *extra)).tokenizer
        models[kind] = json.loads(tok.backend_tokenizer.to_str())["model"]["type"]
    assert models == {None: "BPE", "unigram": "Unigram"}


def test_albert_base_is_a_tenth_of_bert_base_at_the_same_vocabulary():
    from overture.cli import count_parameters
    from overture.config import load_recipe
    from overture.registry import build_objective

    albert, bert = (count_parameters(build_objective(load_recipe(name)), 30000)
                    for name in ("albert-base", "bert-base"))
    assert albert == pytest.approx(11.8e6, rel=0.01) and bert == pytest.approx(109.7e6, rel=0.01)


def test_resuming_a_run_with_another_family_is_refused(trained):
    from overture.checkpoint import find_resume_point
    from overture.config import ConfigError, load_recipe

    run = trained("bert")
    (run / "checkpoints").mkdir(exist_ok=True)
    recipe = load_recipe("gpt-tiny", [f"output_dir={run}"])
    with pytest.raises(ConfigError, match="objective.name: 'bert' -> 'gpt'"):
        find_resume_point(recipe)


def test_mlm_loss_on_selected_positions_equals_the_stock_models_loss(cache_dir, real_text):
    # The head runs only where a token is masked; the loss must be the stock
    # BertForPreTraining's, which runs the head everywhere and ignores label -100.
    recipe = tiny("bert", "unused", cache_dir, real_text)
    data = prepare(recipe)
    batch = data.objective.collator(recipe.resolved_phases()[0])(
        IndexedDataset(data.train).__getitems__(list(range(8))))
    module = data.objective.build_models()["model"].eval()
    with torch.no_grad():
        ours = module(**batch)
        stock = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             token_type_ids=batch["token_type_ids"], labels=batch["labels"],
                             next_sentence_label=batch["sentence_label"])
        masked = (batch["labels"] != IGNORE_INDEX).sum()
        nsp = torch.nn.functional.cross_entropy(stock.seq_relationship_logits,
                                                batch["sentence_label"])
    assert ours["mlm_loss_sum"] / masked + ours["nsp_loss_sum"] / 8 == pytest.approx(
        stock.loss.item(), rel=1e-5)
    assert ours["nsp_loss_sum"] / 8 == pytest.approx(nsp.item(), rel=1e-5)


def test_bert_pairs_carry_token_types_zero_for_a_and_one_for_b(cache_dir, real_text):
    recipe = tiny("bert", "unused", cache_dir, real_text)
    data = prepare(recipe)
    batch = data.objective.collator(recipe.resolved_phases()[0])(
        IndexedDataset(data.train).__getitems__(list(range(16))))
    sep = data.tokenizer.sep_token_id
    for ids, types, mask in zip(batch["input_ids"], batch["token_type_ids"],
                                batch["attention_mask"]):
        real = int(mask.sum())
        first_sep = int((ids == sep).nonzero()[0])
        assert types[:first_sep + 1].eq(0).all() and types[first_sep + 1:real].eq(1).all()
        assert types[real:].eq(0).all() and first_sep + 1 < real


def test_bert_without_nsp_is_a_masked_lm_on_full_sentences(cache_dir, real_text):
    recipe = tiny("bert", "unused", cache_dir, real_text, "objective.nsp=false")
    data = prepare(recipe)
    assert data.objective.heads == ("mlm",)
    module = data.objective.build_models()["model"]
    assert type(module.model).__name__ == "BertForMaskedLM"
    batch = data.objective.collator(recipe.resolved_phases()[0])(
        IndexedDataset(data.train).__getitems__(list(range(8))))
    assert "sentence_label" not in batch and "token_type_ids" not in batch
    # packed sentences, not pairs: [CLS] ... [SEP] rows, mostly full
    tok = data.tokenizer
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        assert row[0] == tok.cls_token_id and row[int(mask.sum()) - 1] == tok.sep_token_id
    stats = prepare(recipe).stats
    assert stats["train_tokens"] / (stats["train_examples"] * recipe.data.max_seq_len) > 0.6
