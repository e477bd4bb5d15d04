"""Finding and loading a transformers model: a local folder, a run folder's final/, or a
Hub name; loaded without transformers' multi-line LOAD REPORT, which becomes one line.

A name that is not a local folder is looked up once, quickly: in the local Hugging Face
cache, then (unless ``HF_HUB_OFFLINE`` is set) with one short Hub query. Left to itself,
``from_pretrained`` retries an unreachable Hub for about a minute and then blames
whatever it loaded first (often the tokenizer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

# owner/name or name: what the Hub accepts as a repository id
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def looks_like_path(name: str) -> bool:
    """True when ``name`` cannot be a Hub repository id, or is written as a path
    (./x, ../x, /x, ~/x, x/, a\\b, a/b/c, or a/b where the folder a exists here)."""
    if name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or "\\" in name:
        return True
    if not _REPO_ID.match(name) or "--" in name or ".." in name:
        return True
    head = name.split("/", 1)[0]
    return "/" in name and Path(head).is_dir()


def resolve_checkpoint(checkpoint: str, option: str = "--checkpoint") -> str:
    """A final/ folder as given, a run folder's final/, or a Hub name that exists.

    Raises ConfigError at once, naming ``option`` (an option as typed, ``--checkpoint
    DIR``, or a recipe key as set, ``model.init_from='DIR'``), for a missing local path,
    a folder with no config.json, or a Hub name that is neither cached nor on the Hub."""
    path = Path(str(checkpoint)).expanduser()
    if (path / "final" / "config.json").is_file():
        return str(path / "final")
    where = given(option, checkpoint)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{where}: no config.json here nor in "
                              f"{path / 'final'}; give a run's final/ folder")
        return str(path)
    name = str(checkpoint)
    if looks_like_path(name):
        raise ConfigError(f"{where}: no such folder (nothing was written)")
    _check_hub_name(name, where)
    return name


def given(option: str, value) -> str:
    """How the user gave ``value``: "--checkpoint DIR" for an option, "key='DIR'" for a
    recipe key."""
    return f"{option} {value}" if option.startswith("-") else f"{option}={str(value)!r}"


def _check_hub_name(name: str, where: str) -> None:
    """A Hub repository id is usable when its config.json is cached, or the Hub has it."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    not_local = f"{where}: no such folder, and no Hub model of that name in the cache"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{not_local} (HF_HUB_OFFLINE is set; nothing was written)")
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(name, timeout=10)
    except GatedRepoError:
        return  # it exists; from_pretrained gives the access error with its own advice
    except RepositoryNotFoundError:
        raise ConfigError(f"{not_local} nor on the Hub (nothing was written)") from None
    except Exception as err:  # noqa: BLE001 - no network, proxy, DNS: one line, at once
        raise ConfigError(f"{not_local}, and the Hub could not be reached "
                          f"({type(err).__name__}); nothing was written") from None


@contextlib.contextmanager
def quiet_transformers(progress_bars: bool = True) -> Iterator[None]:
    """transformers' warnings (the LOAD REPORT, tokenizer length notes) silenced inside,
    and with ``progress_bars=False`` its bars too ("Writing model shards"); restored
    after. Hub download bars stay when ``progress_bars`` is True."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress_bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars and not progress_bars:
            hf_logging.enable_progress_bar()


def load_pretrained(auto_class, path: str, **kwargs):
    """``auto_class.from_pretrained(path, **kwargs)`` without the LOAD REPORT; what the
    report would say (weights unused, new, resized) is logged as one line instead. A
    local folder loads without progress bars; a Hub name keeps its download bars."""
    with quiet_transformers(progress_bars=not Path(path).is_dir()):
        model, info = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
    summary = loading_summary(info)
    if summary:
        log.info("%s from %s: %s", type(model).__name__, path, summary)
    return model


def loading_summary(info: dict) -> str:
    """One line from ``from_pretrained``'s loading info: which weights of the checkpoint
    were unused and which of the model are new, grouped by their first name
    ("cls.* unused (6 tensors); classifier.* new (2 tensors)"); "" when all matched."""
    parts = []
    for key, word in (("unexpected_keys", "unused"), ("missing_keys", "new"),
                      ("mismatched_keys", "resized")):
        names = [k[0] if isinstance(k, tuple) else k for k in info.get(key) or ()]
        if names:
            groups = sorted({n.split(".", 1)[0] + (".*" if "." in n else "") for n in names})
            parts.append(f"{', '.join(groups)} {word} ({len(names)} tensors)")
    return "; ".join(parts)


# What a transformers tokenizer is saved as; a local folder with none of them would load
# as an empty tokenizer of its config's class (BERT: 5 tokens, every word [UNK]).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def load_tokenizer(path: str, option: str = "--checkpoint"):
    """``AutoTokenizer.from_pretrained(path)``, quietly; a local folder without tokenizer
    files, and any loading error, is one ConfigError naming ``option``."""
    from transformers import AutoTokenizer

    folder = Path(str(path)).expanduser()
    where = given(option, path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{where}: no tokenizer files there "
                          f"({', '.join(TOKENIZER_FILES[:3])}, ...); save the tokenizer "
                          "beside the model (tokenizer.save_pretrained(folder))")
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        from .errors import first_line

        raise ConfigError(f"{where}: cannot load its tokenizer "
                          f"({first_line(err)})") from None
