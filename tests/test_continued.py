"""Continued pretraining (model.init_from) for every text family: a continued run starts
at the loss its checkpoint ended with, from an overture final/ or a folder saved by plain
transformers; it resumes exactly; missing pretraining heads are created and named;
conflicting sizes, tokenizer keys and architectures are refused; TAPT's corpus is the
task's training text."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from helpers import classify_inputs, continued, prepare, records, text_families, tiny
from overture.cli import main
from overture.config import ConfigError, load_recipe
from overture.data.corpus import CorpusStats, iter_documents, resolve_sources
from overture.engine import train
from overture.registry import build_objective, get_family

TEXT = text_families()
BASE = ("train.batch_size=4", "data.max_seq_len=32", "train.log_every=1",
        "train.eval_batches=2")


@pytest.fixture(scope="module")
def source(tmp_path_factory, cache_dir, real_text):
    """A family's tiny run of 3 steps, evaluated at its end: (run folder, its last eval
    record)."""
    runs = {}

    def get(family):
        if family not in runs:
            run = tmp_path_factory.mktemp(f"source-{family}") / "run"
            train(tiny(family, run, cache_dir, real_text, *BASE, "train.max_steps=3",
                       "train.eval_every=3", "train.save_every=0"), progress=False)
            evals = records(run, "eval")
            runs[family] = run, evals[max(evals)]
        return runs[family]

    return get


def _eval_losses(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if k == "loss" or (k.endswith("_loss") and k != "train_loss")}


@pytest.mark.parametrize("family", TEXT)
def test_a_continued_run_starts_at_the_loss_its_checkpoint_ended_with_and_resumes_exactly(
        family, source, tmp_path, cache_dir, real_text):
    run, last = source(family)
    recipe = lambda out, *extra: continued(  # noqa: E731
        family, run, out, cache_dir, real_text, *BASE, "train.max_steps=4",
        "train.eval_every=4", "train.save_every=2", "train.keep_last=5", *extra)
    first = recipe(tmp_path / "continued")
    # the checkpoint's sizes and tokenizer, not the family's defaults
    assert first.model.init_from == str(run / "final")
    source_recipe = load_recipe(run / "final" / "recipe.yaml")
    for key in type(first.model).architecture:
        assert getattr(first.model, key) == getattr(source_recipe.model, key), key
    train(first, progress=False)
    evals = records(tmp_path / "continued", "eval")
    for key, value in _eval_losses(last).items():  # step 0 of the new run = the old run's end
        assert evals[0][key] == pytest.approx(value, abs=1e-5), (family, key)
    straight = records(tmp_path / "continued")

    # a crash after step 2: the continued run resumes where it was, not from init_from
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "continued", again)
    shutil.rmtree(again / "checkpoints" / "step-000004")
    shutil.rmtree(again / "final")
    (again / "metrics.jsonl").write_text("")
    train(recipe(again), progress=False)
    resumed = records(again)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key, value in _eval_losses(straight[step]).items():
            assert resumed[step][key] == pytest.approx(value, abs=1e-5), (family, step, key)


@pytest.mark.parametrize("family", TEXT)
def test_a_folder_saved_by_plain_transformers_continues_the_same(family, source, tmp_path,
                                                                cache_dir, real_text):
    import transformers
    from transformers import AutoTokenizer

    run, last = source(family)
    folder = tmp_path / "saved"
    auto = getattr(transformers, get_family(family).auto_class)
    auto.from_pretrained(run / "final").save_pretrained(folder)
    AutoTokenizer.from_pretrained(run / "final").save_pretrained(folder)
    out = tmp_path / "run"
    train(continued(family, folder, out, cache_dir, real_text, *BASE, "train.max_steps=1",
                    "train.eval_every=1"), progress=False)
    for key, value in _eval_losses(last).items():
        assert records(out, "eval")[0][key] == pytest.approx(value, abs=1e-5), (family, key)


def test_a_base_encoder_gets_fresh_heads_and_the_log_names_each(source, tmp_path, cache_dir,
                                                                 real_text, caplog):
    from transformers import AutoTokenizer, BertModel

    run, _ = source("bert")
    folder = tmp_path / "encoder"
    encoder = BertModel.from_pretrained(run / "final", add_pooling_layer=False)
    encoder.save_pretrained(folder)
    AutoTokenizer.from_pretrained(run / "final").save_pretrained(folder)
    recipe = continued("bert", folder, tmp_path / "run", cache_dir, real_text, *BASE)
    objective = build_objective(recipe)
    objective.load_tokenizer()
    with caplog.at_level(logging.INFO, logger="overture.pretrain.text.continued"):
        model = objective.build_models()["model"].model
    fresh = [r.getMessage() for r in caplog.records if "created fresh" in r.getMessage()]
    assert fresh == [f"model.init_from: {name} ({path}.*) is not in the checkpoint: created "
                     "fresh" for path, name in (
                         ("cls.predictions", "the MLM head"),
                         ("cls.seq_relationship", "the NSP head"),
                         ("bert.pooler", "the pooler under the NSP head"))]
    loaded = model.bert.state_dict()
    for key, value in encoder.state_dict().items():  # every encoder weight is the checkpoint's
        assert torch.equal(loaded[key], value), key
    # the MLM decoder stays tied to the (loaded) word embeddings
    assert model.cls.predictions.decoder.weight.data_ptr() == \
        model.bert.embeddings.word_embeddings.weight.data_ptr()
    # the other way: the NSP head and pooler of a full checkpoint, unused by MLM alone,
    # are named by their modules (not "bert.*", which would read as the whole encoder)
    caplog.clear()
    recipe = continued("bert", run, tmp_path / "mlm", cache_dir, real_text, *BASE,
                       "objective.nsp=false")
    objective = build_objective(recipe)
    objective.load_tokenizer()
    with caplog.at_level(logging.INFO, logger="overture.pretrain.text.continued"):
        objective.build_models()
    assert [r.getMessage() for r in caplog.records] == [
        "model.init_from: bert.pooler.dense.*, cls.seq_relationship.* of the checkpoint not "
        "used (this objective has no such head)"]


def test_sizes_tokenizer_keys_and_architectures_that_disagree_are_refused(
        source, tmp_path, cache_dir, real_text):
    from transformers import AutoTokenizer

    run, _ = source("bert")
    final = run / "final"
    hidden = load_recipe(final / "recipe.yaml").model.hidden_size
    vocab = len(AutoTokenizer.from_pretrained(final))
    make = lambda *extra, family="bert": continued(  # noqa: E731
        family, run, tmp_path / "r", cache_dir, real_text, *extra)
    refusals = {
        ("model.hidden_size=64",): f"model.hidden_size=64 but model.init_from='{run}' has "
                                   f"{hidden}: the checkpoint sets the sizes; remove "
                                   "model.hidden_size",
        ("tokenizer.vocab_size=999",): f"tokenizer.vocab_size=999 but model.init_from="
                                       f"'{run}''s tokenizer has {vocab}",
        ("tokenizer.lowercase=false",): "tokenizer.lowercase=False but model.init_from=",
        ("tokenizer.kind=bpe",): "tokenizer.kind='bpe' but model.init_from=",
        ("tokenizer.min_frequency=1",): "tokenizer.min_frequency=1 trains a vocabulary, but "
                                        f"model.init_from='{run}' uses its checkpoint's "
                                        "tokenizer as it is",
        ("tokenizer.name_or_path=bert-base-uncased",): "tokenizer.name_or_path="
                                                       "'bert-base-uncased' but model.init_from=",
    }
    for extra, message in refusals.items():
        with pytest.raises(ConfigError) as err:
            make(*extra)
        assert message in str(err.value), (extra, str(err.value))
        assert str(err.value).startswith("command-line override"), str(err.value)
    with pytest.raises(ConfigError, match=r"model.init_from='.*' holds a 'bert' model; "
                                          r"objective.name=gpt continues gpt2 checkpoints "
                                          r"\(for bert: objective.name=bert\)"):
        make(family="gpt")
    # agreeing values and training settings are the user's: they win
    agreed = make(f"model.hidden_size={hidden}", f"tokenizer.vocab_size={vocab}",
                  "model.hidden_dropout_prob=0.3", "tokenizer.name_or_path=" + str(final))
    objective = build_objective(agreed)
    objective.load_tokenizer()
    config = objective.build_models()["model"].model.config
    assert config.hidden_dropout_prob == 0.3 and config.hidden_size == hidden


def test_continued_pretraining_errors_are_one_line_with_exit_2(source, tmp_path, capsys,
                                                                cache_dir, real_text):
    run, _ = source("bert")
    cases = {
        ("gpt-tiny", f"model.init_from={run}"):
            f"error: model.init_from='{run}' holds a 'bert' model; objective.name=gpt "
            "continues gpt2 checkpoints (for bert: objective.name=bert)",
        ("tapt",): "error: model.init_from is required by recipe 'tapt': give the checkpoint "
                   "to continue, model.init_from=DIR (an overture final/ or a transformers "
                   "folder) or a Hub name",
        ("tapt", f"model.init_from={tmp_path / 'nowhere'}"):
            f"error: model.init_from='{tmp_path / 'nowhere'}': no such folder (nothing was "
            "written)",
        ("tapt", f"model.init_from={run}"):
            "error: data.corpus is required by recipe 'tapt': give the text to train on, "
            "data.corpus=[task:sst2] (a task's training text) or data.corpus=[FILE or GLOB, ...]",
        ("tapt", f"model.init_from={run}", "data.corpus=[task:sst3]"):
            "error: command-line override 'data.corpus=[task:sst3]' (recipe ",
        ("tapt", f"model.init_from={run}", "data.corpus=[a.txt]", "data.task_dir=glue"):
            "error: command-line override 'data.task_dir=glue' (recipe ",
    }
    for argv, message in cases.items():
        code = main(["pretrain", *argv, f"output_dir={tmp_path / 'out'}",
                     f"data.cache_dir={cache_dir}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (argv, err)
        assert err[0].startswith(message), (argv, err)
        if "task:sst3" in argv[-1]:
            assert err[0].endswith("data.corpus: 'task:sst3': unknown task 'sst3' (did you mean "
                                   "'sst2'?); GLUE tasks: cola, sst2, mrpc, stsb, qqp, mnli, "
                                   "qnli, rte, wnli, ax, or a custom task's YAML file"), err
        assert not (tmp_path / "out").exists()


def test_a_task_corpus_is_exactly_the_tasks_training_texts(cache_dir, real_text, tmp_path):
    _, glue = classify_inputs(cache_dir, real_text)
    sst2 = [line.split("\t")[0] for line in
            (glue / "SST-2" / "train.tsv").read_text().splitlines()[1:]]
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text(
        "index\tsentence1\tsentence2\tlabel\n0\tA \"quoted\" premise.\tIts hypothesis.\t"
        "entailment\n1\tSecond premise.\tSecond hypothesis.\tnot_entailment\n")
    for corpus, task_dir, expected in (
            ("task:sst2", glue, [[s] for s in sst2]),
            ("task:rte", tmp_path, [['A "quoted" premise.', "Its hypothesis."],
                                    ["Second premise.", "Second hypothesis."]])):
        sources = resolve_sources([corpus], cache_dir, str(task_dir))
        stats = CorpusStats()
        documents = [d for s in sources for d in iter_documents(s, "text", "train", stats)]
        assert documents == expected
        assert stats.documents == len(expected)
    with pytest.raises(ConfigError, match=r"data.corpus: 'task:mrpc': .*MRPC/train.tsv not "
                                          r"found \(data.task_dir="):
        resolve_sources(["task:mrpc"], cache_dir, str(tmp_path))
    # TAPT prepares its examples from them: every train and held-out token is the task's
    recipe = continued("bert", classify_inputs(cache_dir, real_text)[0], tmp_path / "tapt",
                       cache_dir, real_text, "data.corpus=[task:sst2]", f"data.task_dir={glue}",
                       "objective.nsp=false", "objective.masking=dynamic")  # inputs unmasked
    data = prepare(recipe)
    tok = data.tokenizer
    words = {w for s in sst2 for w in tok.tokenize(s)}
    special = set(tok.all_special_ids)
    seen = {t for split in (data.train, data.eval) for row in split["input_ids"] for t in row
            if t not in special}
    assert seen and set(tok.convert_ids_to_tokens(sorted(seen))) <= words
    assert data.stats["corpus"]["documents"] == len(sst2)


def test_a_loaded_tokenizers_fixed_padding_and_truncation_do_not_cut_the_corpus(
        cache_dir, real_text, tmp_path):
    """A sentence-transformers tokenizer.json pads and truncates every encoding to 128
    tokens; examples must hold the text's tokens, never its padding, and lose nothing."""
    checkpoint, _ = classify_inputs(cache_dir, real_text)
    folder = tmp_path / "padded"
    shutil.copytree(checkpoint, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["padding"] = {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of":
                       None, "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
    spec["truncation"] = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst",
                          "stride": 0}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    plain = prepare(continued("bert", checkpoint, "unused", cache_dir, real_text,
                              "objective.nsp=false"))
    padded = prepare(continued("bert", folder, "unused", cache_dir, real_text,
                               "objective.nsp=false"))
    assert padded.stats["train_tokens"] == plain.stats["train_tokens"]
    assert padded.train["input_ids"][:50] == plain.train["input_ids"][:50]
    pad = padded.tokenizer.pad_token_id
    assert not any(pad in row for row in padded.train["input_ids"][:200])


def test_continued_pretraining_recipes_list_as_sized_by_their_checkpoint(capsys):
    assert main(["recipes"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    for name, family in (("tapt", "bert"), ("tapt-roberta", "roberta"), ("dapt", "bert")):
        assert rows[name][1:3] == [family, "ckpt"], rows[name]
        recipe = load_recipe(name)
        assert recipe.requires == ["model.init_from", "data.corpus"]
        assert recipe.model.init_from is None and recipe.data.corpus == []


def test_a_tokenizer_larger_than_the_models_embedding_table_is_refused(source, tmp_path,
                                                                        cache_dir, real_text):
    from transformers import AutoTokenizer

    run, _ = source("bert")
    folder = tmp_path / "grown"
    shutil.copytree(run / "final", folder)
    tok = AutoTokenizer.from_pretrained(folder)
    rows = len(tok)
    tok.add_tokens(["zzqword"])
    tok.save_pretrained(folder)
    with pytest.raises(ConfigError) as err:
        continued("bert", folder, tmp_path / "r", cache_dir, real_text)
    assert str(err.value) == (f"model.init_from='{folder}': its tokenizer has {rows + 1} tokens "
                              f"but the model embeds {rows}; save the model and tokenizer "
                              "together")


def test_a_continued_albert_keeps_its_checkpoints_activation(source, tmp_path, cache_dir,
                                                             real_text):
    # the recipe's default (gelu_pytorch_tanh) is for fresh models: a checkpoint trained
    # with another activation continues with its own, unless the recipe sets one
    run, _ = source("albert")
    checkpoint = tmp_path / "erf"
    shutil.copytree(run / "final", checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))

    def activation(*overrides):
        recipe = continued("albert", checkpoint, tmp_path / "out", cache_dir, real_text,
                           *BASE, *overrides)
        assert recipe.model.init_from == str(checkpoint)
        model = prepare(recipe).objective.build_models()["model"].model
        return model.config.hidden_act

    assert activation() == "gelu"
    assert activation("model.hidden_act=gelu_new") == "gelu_new"
