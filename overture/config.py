"""Typed recipe configuration: dataclasses, YAML loading, dotted overrides, validation.

A recipe is a YAML file whose sections map one-to-one onto the dataclasses below. Every
error names the file and the dotted key at fault, and unknown keys suggest the nearest
valid one, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


from .errors import ConfigError  # noqa: F401 - re-exported: overture.config.ConfigError


TOKENIZER_KINDS = ("wordpiece", "bpe", "unigram")
DEFAULT_CACHE = "~/.cache/overture"


def cache_folder(cache_dir: str) -> Path:
    """``data.cache_dir`` as a folder: env OVERTURE_CACHE replaces the default one only;
    a folder the recipe or the command line names wins over the environment."""
    env = os.environ.get("OVERTURE_CACHE")
    folder = Path(env if env and cache_dir == DEFAULT_CACHE else cache_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file, /proc/x, no permission: one line, not a traceback
        key = "OVERTURE_CACHE" if env and cache_dir == DEFAULT_CACHE else "data.cache_dir"
        raise ConfigError(f"{key}={str(folder)!r} cannot be used as a cache folder "
                          f"({err.strerror or err}); choose a folder you can write to") from None
    return folder


@dataclass
class TokenizerConfig:
    """Train a vocabulary with `tokenizers` (the family's special tokens), or load one."""

    name_or_path: str | None = None
    """Existing tokenizer (local folder or Hub name); null trains one on the corpus."""
    kind: str | None = None
    """wordpiece (BERT), bpe (byte-level BPE: RoBERTa, GPT-2) or unigram (ALBERT,
    SentencePiece-style); null: the family's own."""
    vocab_size: int = 30522
    """Size of the trained vocabulary, special tokens included."""
    lowercase: bool | None = None
    """Lowercase (and, for WordPiece, strip accents); null: the family's default."""
    min_frequency: int = 2
    """Minimum count for a merged piece to enter the vocabulary."""
    train_max_mb: float = 512.0
    """Train the vocabulary on at most this many MB of the corpus (its start)."""

    def validate(self) -> None:
        positive(self, "tokenizer", "vocab_size", "min_frequency", "train_max_mb")
        if self.kind is not None:
            choice(self, "tokenizer", "kind", TOKENIZER_KINDS)


@dataclass
class DataConfig:
    """Where the corpus comes from and how examples are cut from it."""

    corpus: list[str] = field(default_factory=lambda: ["default"])
    """Sources: file paths or globs (.txt .jsonl .json .csv .parquet), hf:NAME[:CONFIG]
    for a Hugging Face Hub dataset, task:NAME for the training text of a GLUE task (or
    task:FILE.yaml, a custom task), or 'default' for the embedded corpus."""
    task_dir: str | None = None
    """The official GLUE distribution (SST-2/train.tsv, ...) that task: sources read;
    null: the Hub dataset nyu-mll/glue."""
    eval_corpus: list[str] = field(default_factory=list)
    """Held-out sources, same forms as corpus (e.g. WikiText's test.txt); when given,
    evaluation uses them whole and data.eval_fraction is not held out of the corpus."""
    text_column: str = "text"
    """Column holding the document text in JSONL / CSV / Parquet / Hub sources."""
    hf_split: str = "train"
    """Split read from Hub datasets."""
    max_seq_len: int = 128
    """Tokens per example, special tokens included (GPT: the block size)."""
    short_seq_prob: float = 0.1
    """Probability of a shorter target length (BERT: 0.1), to train on short inputs too."""
    dupe_factor: int = 1
    """Passes over the corpus with different pairs (and masks, when static). BERT used 10."""
    eval_fraction: float = 0.01
    """Fraction of documents held out for evaluation."""
    eval_max_examples: int = 2000
    """Cap on held-out examples kept."""
    num_proc: int = 0
    """Worker processes for preprocessing; 0 uses every core."""
    chunk_mb: float = 1.0
    """Documents are processed in windows of about this many MB; random NSP partners and
    packed blocks come from the same window, so it also bounds memory. Small windows keep
    the workers evenly busy to the end (4 MB left one of 2 workers idle for the last
    window of a 20 MB corpus)."""
    cache_dir: str = DEFAULT_CACHE
    """Where tokenizers and prepared examples are cached; env OVERTURE_CACHE replaces the
    default, not a folder the recipe or the command line names."""
    seed: int = 12345
    """Seed for pairing, packing, masking (static) and the held-out split."""

    def validate(self) -> None:
        check_seed("data.seed", self.seed)
        positive(self, "data", "max_seq_len", "dupe_factor", "chunk_mb", "eval_max_examples")
        if self.max_seq_len < 8:
            raise ConfigError(f"data.max_seq_len={self.max_seq_len} is too short: "
                              "use at least 8 tokens")
        fraction(self, "data", "short_seq_prob", "eval_fraction")
        if self.num_proc < 0:
            raise ConfigError(f"data.num_proc={self.num_proc} must be >= 0 (0 = all cores)")
        glue_tasks = [c for c in (*self.corpus, *self.eval_corpus) if str(c).startswith("task:")
                      and not str(c).endswith((".yaml", ".yml"))]
        for entry in glue_tasks:  # a misspelt task is named now, before any work
            from .tasks import get_task

            try:
                get_task(entry[len("task:"):])
            except KeyError as err:
                raise ConfigError(f"data.corpus: {entry!r}: {err.args[0]}") from None
        if self.task_dir is not None and not glue_tasks:
            raise ConfigError(f"data.task_dir={self.task_dir!r} is read only for a GLUE task "
                              "source (data.corpus: [task:sst2]); remove it, or add one")

    @property
    def resolved_cache_dir(self) -> Path:
        return cache_folder(self.cache_dir)


@dataclass
class Phase:
    """One stage of a multi-stage schedule (BERT: 90% of steps at 128 tokens, then 512)."""

    steps: int = 0
    """Optimizer steps in this phase."""
    max_seq_len: int | None = None
    """Overrides data.max_seq_len for this phase."""
    batch_size: int | None = None
    """Overrides train.batch_size for this phase."""
    max_predictions_per_seq: int | None = None
    """Overrides objective.max_predictions_per_seq for this phase (masked-LM families)."""


UPDATE_KEYS = ("lr", "optimizer", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
               "lr_schedule", "warmup_steps")
"""The train settings an update may set for its own optimizer (train.updates.NAME)."""


@dataclass
class UpdateOptions:
    """``train.updates.NAME``: the optimizer settings of one update (a GAN's generator and
    discriminator), over train's and the family's defaults; null keeps those."""

    lr: float | None = None
    optimizer: str | None = None
    """adamw or lamb."""
    weight_decay: float | None = None
    adam_beta1: float | None = None
    adam_beta2: float | None = None
    adam_epsilon: float | None = None
    lr_schedule: str | None = None
    """linear, cosine or constant."""
    warmup_steps: int | None = None
    """Warmup in this update's own optimizer steps."""

    def validate(self, where: str = "train.updates") -> None:
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        # checked as the train settings they replace (same ranges, same messages)
        probe = TrainConfig(**given)
        try:
            probe.validate()
        except ConfigError as err:
            raise ConfigError(str(err).replace("train.", f"{where}.", 1)) from None


@dataclass
class TrainConfig:
    """The optimisation loop."""

    seed: int = 42
    """Seed for initialisation, shuffling and dynamic masking."""
    max_steps: int = 1000
    """Optimizer steps (ignored when phases are given: their steps add up instead)."""
    epochs: float | None = None
    """Passes over the training examples; when set, max_steps is derived from the number
    of examples, the batch size, the processes and the accumulation (fine-tuning)."""
    max_time: float | None = None
    """Wall-clock budget in minutes; the run checkpoints and exports when it runs out."""
    batch_size: int = 32
    """Examples per device per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    optimizer: str = "adamw"
    """adamw (fused when available) or lamb (You et al. 2019, from timm)."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay; not applied to biases and LayerNorm weights."""
    adam_beta1: float = 0.9
    """First-moment decay."""
    adam_beta2: float = 0.999
    """Second-moment decay."""
    adam_epsilon: float = 1e-6
    """Denominator epsilon."""
    lr_schedule: str = "linear"
    """Decay after warmup: linear, cosine or constant."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of all steps (used when warmup_steps is 0)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    mixed_precision: str = "no"
    """no, fp16 or bf16 (passed to Accelerate)."""
    eval_every: int = 0
    """Evaluate on the held-out split every N steps (0: only at the end)."""
    eval_batches: int = 20
    """Held-out batches per evaluation: the first eval_batches x batch_size held-out
    examples, each evaluated once whatever the number of processes."""
    eval_examples: int | None = None
    """Held-out examples per evaluation, in place of eval_batches (a sample-based metric
    such as FID needs thousands); null: eval_batches x batch_size."""
    log_every: int = 10
    """Write a metrics record every N steps."""
    save_every: int = 0
    """Save a full checkpoint every N steps (0: only at the end)."""
    interval_unit: str = "steps"
    """Unit of eval_every and save_every: steps, or epochs (of the training examples)."""
    group_by_length: bool = False
    """Batch examples of similar length (less padding): each epoch's shuffled order is
    cut into groups of 50 batches, each sorted by length. Needs a length column."""
    best_metric: str | None = None
    """An evaluation metric (e.g. accuracy); final/ is exported from the evaluation where
    it was best, and best/ holds that model meanwhile."""
    best_mode: str = "max"
    """max or min: which direction of best_metric is better."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without a better best_metric (0: never)."""
    max_nonfinite_steps: int = 0
    """Steps with a NaN / infinite loss that may be skipped (not applied, counted, logged)
    before the run stops; 0 stops at the first one. fp16 loss-scaler skips are separate."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    resume: str = "auto"
    """auto: continue from the latest complete checkpoint in output_dir if any;
    never: refuse to start over an existing run; or a checkpoint folder path."""
    report_to: list[str] = field(default_factory=list)
    """Accelerate trackers, e.g. [tensorboard] or [wandb]; metrics.jsonl is always written."""
    num_workers: int = 0
    """DataLoader worker processes."""
    compile: bool = False
    """torch.compile every trained model (Inductor): slower first steps while it compiles;
    faster later ones for GPT on CPU, not for every model (measure: benchmarks/). Without
    dropout the losses equal eager's to float rounding; compiled dropout draws its masks
    from another generator. Tested on one process."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for the mfu of the records (null: a known GPU's datasheet
    figure in bf16 / fp16 runs, else a GEMM measured once per machine in the run's dtype
    and cached: overture/peak.py)."""
    updates: dict[str, UpdateOptions] = field(default_factory=dict)
    """Per-update optimizer settings by update name (a GAN: generator / discriminator lr
    and betas): ``train.updates.generator.lr=1e-4``; unset keys are train's."""

    def for_update(self, name: str, defaults: dict | None = None) -> "TrainConfig":
        """This config with update ``name``'s settings: the family's ``defaults`` for it
        (``Update.options``), then ``train.updates.NAME`` from the recipe."""
        given = {**(defaults or {}), **{
            k: v for k, v in dataclasses.asdict(self.updates.get(name, UpdateOptions())).items()
            if v is not None}}
        return dataclasses.replace(self, **given) if given else self

    def validate(self) -> None:
        positive(self, "train", "max_steps", "batch_size", "gradient_accumulation_steps",
                  "lr", "log_every", "eval_batches", "keep_last")
        check_seed("train.seed", self.seed)
        if self.eval_examples is not None and self.eval_examples <= 0:
            raise ConfigError(f"train.eval_examples={self.eval_examples} must be positive "
                              "(or null: train.eval_batches batches)")
        for name, options in self.updates.items():
            options.validate(f"train.updates.{name}")
        choice(self, "train", "optimizer", ("adamw", "lamb"))
        choice(self, "train", "lr_schedule", ("linear", "cosine", "constant"))
        choice(self, "train", "mixed_precision", ("no", "fp16", "bf16"))
        choice(self, "train", "interval_unit", ("steps", "epochs"))
        choice(self, "train", "best_mode", ("max", "min"))
        fraction(self, "train", "warmup_ratio")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs={self.epochs} must be positive")
        if self.early_stopping_patience < 0:
            raise ConfigError(f"train.early_stopping_patience={self.early_stopping_patience} "
                              "must be >= 0")
        if self.early_stopping_patience and not (self.best_metric and self.eval_every):
            raise ConfigError("train.early_stopping_patience needs train.best_metric and "
                              "train.eval_every > 0")
        for name in ("warmup_steps", "eval_every", "save_every", "num_workers",
                     "max_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.peak_tflops is not None and not 0 < self.peak_tflops < float("inf"):
            raise ConfigError(f"train.peak_tflops={self.peak_tflops} must be a positive "
                              "number of TFLOP/s (or null: measured)")
        if self.max_time is not None and not 0 < self.max_time < float("inf"):  # NaN too
            raise ConfigError(f"train.max_time={self.max_time} must be a positive finite "
                              "number of minutes")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise ConfigError(f"train.resume={self.resume!r}: not 'auto', 'never' or an "
                              "existing checkpoint folder")
        if self.report_to:  # Accelerate's own list of trackers, and which are installed
            from accelerate.tracking import get_available_trackers
            from accelerate.utils import LoggerType

            known = tuple(t.value for t in LoggerType if t.value != "all")
            installed = {str(getattr(t, "value", t)) for t in get_available_trackers()}
            for tracker in self.report_to:
                choice_value("train.report_to", tracker, known)
                # Accelerate only warns, and logs nowhere, when the package is missing
                if tracker not in installed:
                    raise ConfigError(f"train.report_to: {tracker} is not installed (pip "
                                      f"install {tracker}); metrics.jsonl is written without "
                                      "any tracker")


@dataclass
class Recipe:
    """A whole pretraining run. ``model`` and ``objective`` are the family's dataclasses
    (overture.registry), chosen by ``objective.name``."""

    name: str = "run"
    """Run name (trackers, logs)."""
    description: str = ""
    """One line shown by `overture recipes`."""
    output_dir: str = "runs/run"
    """Run folder: checkpoints/, final/, metrics.jsonl."""
    model: Any = None
    """The family's model section (sizes); the vocabulary size comes from the tokenizer."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Text families only: image families have no vocabulary."""
    data: Any = field(default_factory=DataConfig)
    """The family's data section: ``DataConfig`` (a text corpus) unless the family
    names another in ``data_config`` (images)."""
    objective: Any = None
    """The family's objective section; ``name`` picks the family."""
    train: TrainConfig = field(default_factory=TrainConfig)
    phases: list[Phase] = field(default_factory=list)
    """Optional stages; each overrides sequence length, batch size and predictions cap."""
    requires: list[str] = field(default_factory=list)
    """Keys the user must set before the recipe runs, e.g. model.init_from for a
    continued-pretraining recipe (which checkpoint to continue is the user's choice)."""

    def check_requires(self) -> None:
        """Refuse to run with a required key left unset (null or empty)."""
        for key in self.requires:
            value: Any = self
            for part in key.split("."):
                value = getattr(value, part, None)
            if value in (None, "", []):
                raise ConfigError(f"{key} is required by recipe {self.name!r}: "
                                  f"{_REQUIRED_HINTS.get(key, 'set it')}")

    def validate(self) -> None:
        for section in (self.model, self.tokenizer, self.data, self.objective, self.train):
            section.validate()
        if (isinstance(self.data, DataConfig) and not self.data.corpus
                and "data.corpus" not in self.requires):  # a required one is checked at run
            raise ConfigError("data.corpus is empty: give at least one file, glob, "
                              "hf:NAME, task:NAME or 'default'")
        for key in self.requires:
            section, _, name = key.partition(".")
            if not hasattr(getattr(self, section, None), name):
                raise ConfigError(f"requires: {key!r} is not a key of this recipe "
                                  f"(objective.name={self.objective.name!r})")
        if self.phases and self.train.epochs is not None:
            raise ConfigError("train.epochs and phases exclude each other: phases count steps")
        for i, phase in enumerate(self.phases):
            if phase.steps <= 0:
                raise ConfigError(f"phases[{i}].steps={phase.steps} must be a positive integer")
            if (phase.max_predictions_per_seq is not None
                    and not hasattr(self.objective, "max_predictions_per_seq")):
                raise ConfigError(f"phases[{i}].max_predictions_per_seq: objective "
                                  f"{self.objective.name!r} has no masked-LM predictions")
        key, limit = self.model.position_limit()
        for i, phase in enumerate(self.resolved_phases()):
            if phase.max_seq_len is not None and phase.max_seq_len > limit:
                # the key that set it, so that the error names where it came from
                name = (f"phases[{i}].max_seq_len" if self.phases and self.phases[i].max_seq_len
                        else "data.max_seq_len")
                raise ConfigError(f"{name}={phase.max_seq_len} exceeds model.{key}={limit}")

    def resolved_phases(self) -> list[Phase]:
        """The phases with every field filled in (one phase when none are given)."""
        given = self.phases or [Phase(steps=self.train.max_steps)]
        return [Phase(steps=p.steps,
                      max_seq_len=p.max_seq_len or getattr(self.data, "max_seq_len", None),
                      batch_size=p.batch_size or self.train.batch_size,
                      max_predictions_per_seq=(
                          p.max_predictions_per_seq
                          or getattr(self.objective, "max_predictions_per_seq", None)))
                for p in given]

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.resolved_phases())

    def for_dataset(self, examples: int, processes: int) -> "Recipe":
        """A copy with ``train.epochs``, epoch intervals and ``warmup_ratio`` turned into
        optimizer steps, for ``examples`` training examples on ``processes`` processes
        (each epoch drops the last incomplete batch)."""
        import copy
        import math

        recipe = copy.deepcopy(self)
        cfg = recipe.train
        per_epoch = self.steps_per_epoch(examples, processes)
        if cfg.epochs is not None:
            cfg.max_steps = max(1, math.ceil(cfg.epochs * per_epoch))
        if cfg.interval_unit == "epochs":
            cfg.eval_every, cfg.save_every = cfg.eval_every * per_epoch, cfg.save_every * per_epoch
            cfg.interval_unit = "steps"
        if cfg.warmup_steps == 0 and cfg.warmup_ratio:
            cfg.warmup_steps = math.ceil(cfg.warmup_ratio * recipe.total_steps)
        return recipe

    def steps_per_epoch(self, examples: int, processes: int) -> int:
        """Optimizer steps in one pass over ``examples`` on ``processes`` processes (the
        last incomplete batch dropped), at least 1."""
        cfg = self.train
        batches = examples // (cfg.batch_size * processes)
        return max(1, batches // cfg.gradient_accumulation_steps)

    def to_dict(self) -> dict[str, Any]:
        tree = dataclasses.asdict(self)
        if not isinstance(self.data, DataConfig):  # a family without text has no tokenizer
            del tree["tokenizer"]
        return tree

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_REQUIRED_HINTS = {"model.init_from": "give the checkpoint to continue, "
                                       "model.init_from=DIR (an overture final/ or a "
                                       "transformers folder) or a Hub name",
                   "data.corpus": "give the text to train on, data.corpus=[task:sst2] (a "
                                  "task's training text) or data.corpus=[FILE or GLOB, ...]"}


# --------------------------------------------------------------------------- loading


def load_recipe(source: str | os.PathLike, overrides: list[str] | None = None,
                defaults: list[str] | None = None, checkpoint: bool = True) -> Recipe:
    """Load a recipe from a YAML path or a bundled recipe name, apply KEY=VALUE overrides
    (dotted paths, values parsed as YAML scalars) and validate it. An error in a key or
    value that an override set names the override, not the file. ``defaults`` are KEY=VALUE
    settings a command puts between the file and the user's overrides (the task's
    epochs for ``finetune``): the user's overrides replace them. A text family's
    ``model.init_from`` checkpoint completes the model and tokenizer sections
    (``checkpoint=False``: left as written, for listing recipes without their inputs)."""
    path = resolve_recipe_path(source)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    for key, (item, value) in parse_overrides(defaults or []).items():
        _set_dotted(raw, key, value, item)
    given = parse_overrides(overrides or [])
    for key, (item, value) in given.items():
        _set_dotted(raw, key, value, item)
    train = raw.get("train")
    # the user's max_steps wins over the recipe's epochs, as transformers.Trainer's
    # max_steps over num_train_epochs; the user's eval_batches over the recipe's
    # eval_examples; both of a pair given on the command line contradict
    steps = next((v[0] for k, v in given.items()
                  if k == "train.max_steps" or k.split(".")[0] == "phases"), None)
    _user_setting_wins(given, train, steps, "epochs", "the length of training")
    _user_setting_wins(given, train, given.get("train.eval_batches", (None,))[0],
                       "eval_examples", "the size of an evaluation")
    if "train.max_steps" in given and raw.get("phases"):  # the phases' steps are the length
        raise ConfigError(f"command-line override {given['train.max_steps'][0]!r} is not used "
                          "when phases are given (their steps set the length of training); "
                          "change phases[i].steps instead")
    return recipe_from_dict(raw, where=Where(str(path), {k: v[0] for k, v in given.items()}),
                            checkpoint=checkpoint)


def _user_setting_wins(given: dict, train, item: str | None, key: str, what: str) -> None:
    """A command-line ``item`` replaces the recipe's ``train.KEY``, which sets ``what``
    the other way; ``train.KEY`` on the command line as well is refused."""
    if item is None or not isinstance(train, dict) or train.get(key) is None:
        return
    if f"train.{key}" in given:
        raise ConfigError(f"command-line overrides {item!r} and {given[f'train.{key}'][0]!r} "
                          f"both set {what}; give one of them")
    train[key] = None


def parse_overrides(items: list[str], unique: bool = False) -> dict[str, tuple[str, Any]]:
    """KEY=VALUE overrides -> {dotted key: (the item as given, its value parsed as YAML)},
    in order. A later item for a key replaces an earlier one (callers compose lists);
    with ``unique`` (what a user typed) the same key twice is refused."""
    given: dict[str, tuple[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.max_steps=50)")
        if unique and key.strip() in given:  # two settings of one key: neither is ignored
            raise ConfigError(f"command-line overrides {given[key.strip()][0]!r} and {item!r} "
                              "set the same key; give it once")
        given.pop(key.strip(), None)  # the later one, in its place in the order
        given[key.strip()] = (item, _parse_scalar(value))
    return given


class Where(str):
    """Where a recipe's values come from, for error messages: the file, except for the
    keys that command-line overrides set (``overrides``: dotted key -> "KEY=VALUE")."""

    overrides: dict[str, str]

    def __new__(cls, file: str, overrides: dict[str, str] | None = None):
        where = super().__new__(cls, file)
        where.overrides = overrides or {}
        return where

    def of(self, dotted: str) -> str:
        """The file, or "command-line override KEY=VALUE" when an override set ``dotted``
        (or a key inside it, or the section holding it)."""
        for key, item in self.overrides.items():
            if key == dotted or key.startswith(dotted + ".") or dotted.startswith(
                    (key + ".", key + "[")):
                return f"command-line override {item!r} (recipe {self})"
        return str(self)


def _where(where: str, dotted: str) -> str:
    return where.of(dotted) if isinstance(where, Where) else where


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error
    (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # a list or mapping as a key: PyYAML's own one-line error
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a name, not {type(key).__name__}",
                    key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in this mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message (context, snippet, caret) as one line with its place."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return at + problem + (f" ({context})" if context else "")


def recipe_from_dict(raw: dict, where: str = "recipe", checkpoint: bool = True) -> Recipe:
    """A validated Recipe from a mapping; ``objective.name`` (default bert) picks the
    family whose dataclasses type the ``model`` and ``objective`` sections, and completes
    them from ``model.init_from`` when it continues a checkpoint (unless not
    ``checkpoint``)."""
    from .registry import get_family

    objective = raw.get("objective") or {}
    if not isinstance(objective, dict):
        raise ConfigError(f"{_where(where, 'objective')}: objective must be a mapping, "
                          f"got {objective!r}")
    family = get_family(objective.get("name", "bert"))
    data_config = getattr(family, "data_config", DataConfig)
    if data_config is not DataConfig and "tokenizer" in raw:
        raise ConfigError(f"{_where(where, 'tokenizer')}: objective.name="
                          f"{objective.get('name')!r} trains on images and has no tokenizer; "
                          "remove the tokenizer section or overrides")
    model = raw.get("model")
    if (checkpoint and isinstance(model, dict) and model.get("init_from")
            and hasattr(family, "continue_from")):
        raw = family.continue_from(raw, where)  # the checkpoint's sizes and tokenizer
    recipe = from_dict(Recipe, raw, where=where,
                       types={"model": family.model_config,
                              "objective": family.objective_config, "data": data_config})
    recipe.model = recipe.model or family.model_config()
    recipe.objective = recipe.objective or family.objective_config()
    if "data" not in raw:
        recipe.data = data_config()
    try:
        recipe.validate()
    except ConfigError as err:  # validate() knows the key; say where its value came from
        key = re.match(r"[\w.\[\]]*", str(err)).group(0)  # "train.lr=..." -> train.lr
        raise ConfigError(f"{_where(where, key)}: {err}") from None
    return recipe


def resolve_recipe_path(source: str | os.PathLike) -> Path:
    """A YAML path as given, or the bundled recipe of that name (``bert-tiny``)."""
    path = Path(source)
    if path.is_file():
        return path
    bundled = bundled_recipes()
    name = path.name.removesuffix(".yaml")
    if name in bundled and not path.parent.parts[1:]:
        return bundled[name]
    hint = difflib.get_close_matches(name, list(bundled), n=1)
    raise ConfigError(f"recipe {str(source)!r} not found: not a file and not a bundled recipe"
                      + (f" (did you mean {hint[0]!r}?)" if hint else "")
                      + "; `overture recipes` lists the bundled ones")


def bundled_recipes() -> dict[str, Path]:
    """Bundled recipe names mapped to their YAML files."""
    folder = Path(__file__).resolve().parent / "recipes"
    if not folder.is_dir():  # editable install: recipes/ sits beside overture/
        folder = Path(__file__).resolve().parent.parent / "recipes"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict, dotted: str, value: Any, item: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"command-line override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, data: Any, where: str, prefix: str = "",
              types: dict[str, type] | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types.

    ``where`` (the file) and ``prefix`` (the dotted path so far) make error messages exact;
    ``types`` overrides the declared type of some fields (the family's sections).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(where, prefix.rstrip('.'))}: {prefix.rstrip('.') or 'recipe'} "
                          f"must be a mapping, got {data!r}")
    hints = {**typing.get_type_hints(cls), **(types or {})}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{_where(where, dotted)}: unknown key {dotted!r}{hint} "
                              f"(valid keys here: {', '.join(fields)})")
        kwargs[key] = _coerce(hints[key], value, where, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, dotted)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, dotted + ".")
    if origin is list:
        if isinstance(value, (str, dict)) or not isinstance(value, list):
            value = [value] if isinstance(value, (str, dict)) else value
        if not isinstance(value, list):
            raise ConfigError(f"{_where(where, dotted)}: {dotted} must be a list, got {value!r}")
        return [_coerce(args[0], v, where, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"{_where(where, dotted)}: {dotted} must be a mapping, got {value!r}")
    if origin is dict and dataclasses.is_dataclass(args[1]):  # sections keyed by name
        return {str(k): from_dict(args[1], v, where, f"{dotted}.{k}.") for k, v in value.items()}
    if tp in (int, float, str, bool) and not (isinstance(value, tp)
                                              and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{_where(where, dotted)}: {dotted} must be {tp.__name__}, got {value!r}")
    return value


def positive(obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0 or value == float("inf"):  # NaN fails the first test
            raise ConfigError(f"{section}.{name}={value} must be a positive finite number")


def check_seed(key: str, value: int) -> None:
    """A seed torch, numpy and scikit-learn all take, with room for the process index
    that Accelerate's per-process seeding adds: 0 .. 2**31 - 1."""
    if not 0 <= value < 2**31:
        raise ConfigError(f"{key}={value} must be between 0 and {2**31 - 1} (a seed)")


def fraction(obj: Any, section: str, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(obj, name) <= 1.0:
            raise ConfigError(f"{section}.{name}={getattr(obj, name)} must be between 0 and 1")


def choice(obj: Any, section: str, name: str, options: tuple[str, ...]) -> None:
    choice_value(f"{section}.{name}", getattr(obj, name), options)


def choice_value(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(options)}{hint}")
