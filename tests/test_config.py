"""Recipe loading: overrides, validation messages, phases, bundled recipes."""

from __future__ import annotations

import pytest

from overture.config import ConfigError, bundled_recipes, load_recipe


@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_every_bundled_recipe_loads_and_validates(name):
    recipe = load_recipe(name, checkpoint=False)  # longformer-base continues a converted run
    assert recipe.total_steps > 0
    assert all(p.max_seq_len is None or p.max_seq_len <= recipe.model.position_limit()[1]
               for p in recipe.resolved_phases())  # None: images have no sequence length


def test_bert_base_has_the_papers_two_phases():
    phases = load_recipe("bert-base").resolved_phases()
    assert [(p.max_seq_len, p.max_predictions_per_seq) for p in phases] == [(128, 20), (512, 80)]
    assert phases[0].steps == 9 * phases[1].steps


def test_dotted_overrides_parse_yaml_scalars():
    recipe = load_recipe("bert-tiny", ["train.max_steps=7", "train.lr=3e-4",
                                       "data.corpus=[a.txt, b.txt]", "train.max_grad_norm=null"])
    assert recipe.train.max_steps == 7 and recipe.train.lr == 3e-4
    assert recipe.data.corpus == ["a.txt", "b.txt"] and recipe.train.max_grad_norm is None


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=64", "unknown key 'model.hiden_size'; did you mean model.hidden_size"),
    ("train.max_steps=many", "train.max_steps must be int"),
    ("train.optimizer=adam", "train.optimizer='adam' is not one of adamw, lamb"),
    ("model.num_attention_heads=3", "not divisible"),
    ("objective.mask_replace_prob=0.95", "exceeds 1"),
    ("data.max_seq_len=512", "exceeds model.max_position_embeddings"),
    ("nonsense", "not KEY=VALUE"),
])
def test_invalid_values_name_the_key_and_the_override_that_set_it(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")) as err:
        load_recipe("bert-tiny", [override])
    text = str(err.value)
    if override == "model.num_attention_heads=3":  # hidden_size (the file's) is the key named
        assert text.startswith(str(bundled_recipes()["bert-tiny"]) + ": ")
    elif override != "nonsense":  # out-of-range values too, not only unknown keys and types
        assert text.startswith(f"command-line override {override!r} (recipe "), text


def test_a_typo_in_an_override_is_not_blamed_on_the_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  max_steps: 10\n  lr: 1e-3\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path, ["trian.max_steps=5"])
    assert str(err.value).startswith(f"command-line override 'trian.max_steps=5' (recipe {path}): "
                                     "unknown key 'trian'; did you mean train?")
    with pytest.raises(ConfigError) as err:  # the same typo in the file is the file's
        path.write_text("trian:\n  max_steps: 10\n")
        load_recipe(path, ["train.max_steps=5"])
    assert str(err.value).startswith(f"{path}: unknown key 'trian'")


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: 64\n  layers: 2\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown key 'model.layers'"):
        load_recipe(path)


def test_a_yaml_syntax_error_is_one_line_with_its_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: 64\n   layers: 2\n")  # mis-indented
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value) == (f"{path}: not valid YAML: line 3, column 10: mapping values "
                              "are not allowed here")


def test_unknown_recipe_name_suggests_a_bundled_one():
    with pytest.raises(ConfigError, match="did you mean 'bert-tiny'"):
        load_recipe("bert-tiy")


def test_an_unknown_family_suggests_the_nearest_registered_one():
    with pytest.raises(ConfigError, match=r"objective.name='robert'.*did you mean 'roberta'"):
        load_recipe("bert-tiny", ["objective.name=robert"])


def test_the_family_types_the_model_and_objective_sections():
    with pytest.raises(ConfigError, match="model.hidden_size"):  # GPT sizes are n_embd...
        load_recipe("gpt-tiny", ["model.hidden_size=64"])
    with pytest.raises(ConfigError, match="objective.packing"):  # RoBERTa's, not BERT's
        load_recipe("bert-tiny", ["objective.packing=doc_sentences"])
    assert load_recipe("roberta-tiny", ["objective.packing=doc_sentences"]).objective.packing \
        == "doc_sentences"


def test_an_explicit_max_steps_wins_over_the_recipes_epochs_and_both_are_refused():
    recipe = load_recipe("image-finetune", ["train.max_steps=7"])  # the recipe: 20 epochs
    assert (recipe.train.max_steps, recipe.train.epochs) == (7, None)
    assert recipe.for_dataset(10_000, 1).train.max_steps == 7
    assert load_recipe("image-finetune", ["train.epochs=2"]).train.epochs == 2
    with pytest.raises(ConfigError, match=r"command-line overrides 'train\.max_steps=7' and "
                                          r"'train\.epochs=2' both set the length of training"):
        load_recipe("image-finetune", ["train.max_steps=7", "train.epochs=2"])


def test_an_explicit_eval_batches_wins_over_the_recipes_eval_examples_and_both_are_refused():
    from overture.evaluation import eval_size

    recipe = load_recipe("gan-int-cls-digits", ["train.eval_batches=2"])  # recipe: 359 images
    assert recipe.train.eval_examples is None
    assert eval_size(recipe, recipe.resolved_phases()[0]) == 2 * 64
    assert eval_size(*(lambda r: (r, r.resolved_phases()[0]))(
        load_recipe("gan-int-cls-digits"))) == 359
    with pytest.raises(ConfigError, match=r"command-line overrides 'train\.eval_batches=2' and "
                                          r"'train\.eval_examples=9' both set the size of an "
                                          "evaluation"):
        load_recipe("gan-int-cls-digits", ["train.eval_batches=2", "train.eval_examples=9"])


@pytest.mark.parametrize("overrides, message", [
    (["phases=[{steps: 3}]", "train.max_steps=10"],
     "command-line override 'train.max_steps=10' is not used when phases are given"),
    (["train.max_time=nan"], "train.max_time=nan must be a positive finite number"),
    (["train.max_time=.inf"], "train.max_time=inf must be a positive finite number"),
    (["train.seed=-1"], "train.seed=-1 must be between 0 and 2147483647"),
    (["data.seed=99999999999"], "data.seed=99999999999 must be between 0 and 2147483647"),
])
def test_settings_that_would_be_ignored_or_crash_later_are_refused_now(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_recipe("bert-tiny", overrides)
    assert message in str(err.value)


def test_a_key_given_twice_in_a_recipe_file_is_refused_with_its_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  max_steps: 5\n  lr: 1e-3\n  max_steps: 9\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value) == (f"{path}: not valid YAML: line 4, column 3: key 'max_steps' is "
                              "given twice in this mapping")


def test_a_tracker_that_is_not_installed_is_refused(monkeypatch):
    import accelerate.tracking
    from accelerate.utils import LoggerType

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers",
                        lambda: [LoggerType.TENSORBOARD])  # wandb absent
    with pytest.raises(ConfigError, match=r"train\.report_to: wandb is not installed "
                                          r"\(pip install wandb\)"):
        load_recipe("bert-tiny", ["train.report_to=[wandb]"])
    assert load_recipe("bert-tiny", ["train.report_to=[tensorboard]"]).train.report_to == [
        "tensorboard"]  # installed with the dev extras


def test_an_explicit_cache_dir_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERTURE_CACHE", str(tmp_path / "env"))
    assert load_recipe("bert-tiny").data.resolved_cache_dir == tmp_path / "env"
    named = load_recipe("bert-tiny", [f"data.cache_dir={tmp_path / 'mine'}"])
    assert named.data.resolved_cache_dir == tmp_path / "mine"
    image = load_recipe("resnet-tiny-digits", [f"data.cache_dir={tmp_path / 'img'}"])
    assert image.data.resolved_cache_dir == tmp_path / "img"


def test_a_cache_dir_that_cannot_be_a_folder_is_one_error(tmp_path):
    (tmp_path / "afile").write_text("")
    recipe = load_recipe("bert-tiny", [f"data.cache_dir={tmp_path / 'afile'}"])
    with pytest.raises(ConfigError, match=r"data\.cache_dir='.*afile' cannot be used as a "
                                          r"cache folder \(File exists\)"):
        recipe.data.resolved_cache_dir


def test_the_same_key_twice_on_the_command_line_is_refused(capsys):
    from overture.cli import main

    assert main(["pretrain", "bert-tiny", "train.max_steps=5", "--dry-run",
                 "train.max_steps=7"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: command-line overrides 'train.max_steps=5' and 'train.max_steps=7' set the "
        "same key; give it once"]
    # composed in code (a command's own settings, then the user's), the later one wins
    assert load_recipe("bert-tiny", ["train.max_steps=5", "train.max_steps=7"]).train.max_steps == 7


def test_a_list_as_a_yaml_key_is_one_line(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text("train:\n  ? [a, b]\n  : 1\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}: not valid YAML: line 2, column 5: a key must "
                                     "be a name, not list")
