"""Continued pretraining (``model.init_from``): a text family starts from a checkpoint's
weights and tokenizer instead of fresh ones, as ``run_mlm.py --model_name_or_path``
and domain- / task-adaptive pretraining (Gururangan et al. 2020) do.

Two halves:
- when the recipe is read (``continue_from``), the checkpoint's config fills the
  ``model:`` section and its tokenizer becomes the recipe's: a size the recipe gives
  that disagrees, or a ``tokenizer:`` key that would make another vocabulary, is refused
  in one line naming both values; a checkpoint of another architecture is refused too;
- when the model is built (``load_weights``), the family's pretraining class loads the
  weights; its pretraining heads that the checkpoint lacks (a base ``BertModel`` has no
  MLM or NSP head) are created fresh and named in the log, and a checkpoint missing
  weights of the encoder itself is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from ...config import ConfigError

log = logging.getLogger(__name__)

KEY = "model.init_from"
VOCABULARY_TRAINING = ("min_frequency", "train_max_mb")
"""tokenizer: keys that only steer the training of a vocabulary, which does not happen."""
TOKENIZER_KINDS = {"WordPiece": "wordpiece", "BPE": "bpe", "Unigram": "unigram"}


def continue_from(family: type, raw: dict, where) -> dict:
    """The raw recipe with ``model:`` filled from ``model.init_from``'s config (the keys
    it does not give) and ``tokenizer:`` set to the checkpoint's tokenizer."""
    from ...config import _where
    from ...hub import resolve_checkpoint
    from ...registry import family_name

    model = dict(raw["model"])
    given = str(model["init_from"])
    path = resolve_checkpoint(given, KEY)
    config = checkpoint_config(path, given)
    if config.model_type not in family.model_types:
        raise ConfigError(f"{KEY}={given!r} holds a {config.model_type!r} model; objective.name="
                          f"{family_name(family)} continues {' / '.join(family.model_types)} "
                          f"checkpoints{_family_hint(config.model_type)}")
    architecture = family.model_config.architecture
    for key, value in family.checkpoint_values(config).items():
        if key not in model:
            model[key] = value
        elif model[key] != value and key in architecture:
            raise ConfigError(f"{_where(where, 'model.' + key)}: model.{key}={model[key]!r} but "
                              f"{KEY}={given!r} has {value!r}: the checkpoint sets the sizes; "
                              f"remove model.{key}")
    if "unpadded" in {f.name for f in dataclasses.fields(family.model_config)}:
        from .unpadded import is_decoder

        if is_decoder(config):  # its causal / cross attention has no unpadded form
            if model.get("unpadded"):
                raise ConfigError(f"{_where(where, 'model.unpadded')}: model.unpadded=true but "
                                  f"{KEY}={given!r} is a decoder (is_decoder / "
                                  "add_cross_attention), which trains padded only; remove "
                                  "model.unpadded")
            model["unpadded"] = False  # null follows the checkpoint
    model["init_from"] = path
    section = raw.get("tokenizer")
    tokenizer = check_tokenizer(section if isinstance(section, dict) else {}, path, given, where)
    return {**raw, "model": model, "tokenizer": tokenizer if section is None
            or isinstance(section, dict) else section}


def checkpoint_config(path: str, given: str):
    """The checkpoint's transformers config; an unreadable one is one line."""
    from transformers import AutoConfig

    from ...errors import first_line
    from ...hub import quiet_transformers

    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{KEY}={given!r}: cannot read its config ({first_line(err)})") from None


def check_tokenizer(section: dict, path: str, given: str, where) -> dict:
    """The tokenizer section for the checkpoint's own tokenizer: each key the recipe
    gives must agree with it, and keys that would train a vocabulary are refused."""
    from ...config import _where
    from ...hub import load_tokenizer

    tok = load_tokenizer(path, KEY)
    rows = checkpoint_config(path, given).vocab_size
    if len(tok) > rows:
        raise ConfigError(f"{KEY}={given!r}: its tokenizer has {len(tok)} tokens but the model "
                          f"embeds {rows}; save the model and tokenizer together")
    facts = {"vocab_size": len(tok), **tokenizer_kind(tok)}
    for key, value in section.items():
        where_key = _where(where, f"tokenizer.{key}")
        if key in VOCABULARY_TRAINING:
            raise ConfigError(f"{where_key}: tokenizer.{key}={value!r} trains a vocabulary, but "
                              f"{KEY}={given!r} uses its checkpoint's tokenizer as it is; "
                              f"remove tokenizer.{key}")
        if key == "name_or_path" and value is not None and _same_folder(value, path):
            continue
        known = path if key == "name_or_path" else facts.get(key)
        if value is not None and known is not None and value != known:
            raise ConfigError(f"{where_key}: tokenizer.{key}={value!r} but {KEY}={given!r}'s "
                              f"tokenizer has {known!r}; the checkpoint's tokenizer is used as "
                              f"it is: remove tokenizer.{key}")
    return {**section, **{k: v for k, v in facts.items() if v is not None},
            "name_or_path": path}


def tokenizer_kind(tok) -> dict:
    """``kind`` (wordpiece, bpe, unigram) and ``lowercase`` of a fast tokenizer, read from
    its definition; None where it says nothing we know."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    kind = TOKENIZER_KINDS.get((spec.get("model") or {}).get("type"))
    return {"kind": kind, "lowercase": _lowercases(spec.get("normalizer"))}


def _lowercases(normalizer: dict | None) -> bool | None:
    if not normalizer:
        return False
    kind = normalizer.get("type")
    if kind == "BertNormalizer":
        return bool(normalizer.get("lowercase"))
    if kind == "Lowercase":
        return True
    if kind == "Sequence":
        parts = [_lowercases(n) for n in normalizer.get("normalizers", [])]
        return True if True in parts else (None if None in parts else False)
    return False if kind in ("NFC", "NFD", "NFKC", "NFKD", "Strip", "StripAccents",
                             "Replace", "Prepend") else None


def _same_folder(a: str, b: str) -> bool:
    from ...hub import resolve_checkpoint

    try:
        return Path(resolve_checkpoint(a, "tokenizer.name_or_path")).resolve() == Path(b).resolve()
    except ConfigError:
        return False


def _family_hint(model_type: str) -> str:
    """" (for gpt2: objective.name=gpt)", when a registered family continues it."""
    from ...registry import get_family, list_families

    for name in list_families():
        if model_type in getattr(get_family(name), "model_types", ()):
            return f" (for {model_type}: objective.name={name})"
    return ""


def training_settings(section) -> dict:
    """The model section's keys that are not the architecture: dropout, initialisation,
    attention kernel (the recipe's, set on the checkpoint's config)."""
    skip = {*type(section).architecture, "init_from", "attn_implementation", "unpadded"}
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
            if f.name not in skip}


def load_weights(family, model_class, heads: dict[str, str]):
    """``model_class`` with model.init_from's config and weights, the recipe's training
    settings on the config. ``heads``: attribute path -> name of each pretraining head
    ("cls.predictions": "the MLM head"); one missing from the checkpoint is created fresh
    and logged, any other missing weight is refused."""
    from transformers import AutoConfig

    from ...errors import first_line
    from ...hub import quiet_transformers

    section = family.recipe.model
    path = section.init_from
    config = AutoConfig.from_pretrained(path)
    for key, value in training_settings(section).items():
        if hasattr(config, key):
            setattr(config, key, value)
    kernel = getattr(section, "attn_implementation", None)
    extra = {"attn_implementation": kernel} if kernel else {}
    try:
        with quiet_transformers(progress_bars=not Path(path).is_dir()):
            model, info = model_class.from_pretrained(path, config=config,
                                                      output_loading_info=True, **extra)
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{KEY}={path!r}: cannot load its weights ({first_line(err)})") from None
    missing = list(info.get("missing_keys") or ())
    inside = lambda name, prefix: name == prefix or name.startswith(prefix + ".")  # noqa: E731
    encoder = [k for k in missing if not any(inside(k, p) for p in heads)]
    if encoder:
        raise ConfigError(f"{KEY}={path!r} lacks {len(encoder)} weights of the "
                          f"{type(model).__name__} encoder ({encoder[0]}, ...): it is not a "
                          "full checkpoint of this architecture")
    for prefix, name in heads.items():
        if any(inside(k, prefix) for k in missing):
            log.info("%s: %s (%s.*) is not in the checkpoint: created fresh", KEY, name, prefix)
    # by the module holding them: "bert.pooler.dense.*", not "bert.*" (the whole encoder)
    unused = sorted({k.rsplit(".", 1)[0] + ".*" for k in info.get("unexpected_keys") or ()})
    if unused:
        log.info("%s: %s of the checkpoint not used (this objective has no such head)", KEY,
                 ", ".join(unused))
    return model
