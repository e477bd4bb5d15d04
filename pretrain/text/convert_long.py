"""`overture convert-long`: a BERT or RoBERTa masked LM made into a LongformerForMaskedLM,
as Beltagy et al. 2020 start Longformer from RoBERTa (allenai/longformer's
convert_model_to_long notebook).

- Position embeddings are tiled: the source's learned positions are copied again and
  again until the new length is covered (the paper found this far better than random
  new positions). Longformer numbers positions from pad_id + 1 (as RoBERTa); a RoBERTa
  source keeps its rows 0 .. pad_id, a BERT source (positions from 0) gets its row k at
  pad_id + 1 + k and a zero padding row.
- Each layer's query / key / value projections are copied into both the local (sliding
  window) and the global projections; every other weight is taken as is.

With a window covering a short input (window / 2 >= its length), local attention is
full attention, so the converted model gives the source's masked-LM outputs there (with
or without global attention on <s>: its global projections are the local ones).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from ...atomic import fresh_tmp_dir, publish_dir
from ...errors import ConfigError, first_line

log = logging.getLogger(__name__)

# model_type -> (attribute of the encoder, first position row of a token, head key map)
SOURCES = {
    "bert": ("bert", lambda pad: 0, {
        "cls.predictions.transform.dense.": "lm_head.dense.",
        "cls.predictions.transform.LayerNorm.": "lm_head.layer_norm.",
        "cls.predictions.decoder.": "lm_head.decoder.",
        "cls.predictions.bias": "lm_head.bias"}),
    "roberta": ("roberta", lambda pad: pad + 1, {"lm_head.": "lm_head."}),
}


def convert_to_long(checkpoint: str, output: str | Path, max_length: int = 4096,
                    window: int = 512) -> Path:
    """Write a LongformerForMaskedLM folder (and the source's tokenizer, its
    model_max_length set to ``max_length``) made from ``checkpoint`` into ``output``.
    Refuses an existing ``output``; bad input raises ConfigError with one clear line."""
    from transformers import AutoConfig, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    from ...hub import load_tokenizer, quiet_transformers, resolve_checkpoint

    output = Path(output).expanduser()
    if output.exists():
        raise ConfigError(f"--output {output} exists; give a new folder (nothing was written)")
    if window <= 0 or window % 2:
        raise ConfigError(f"--window={window} must be an even positive integer")
    if max_length <= 0:
        raise ConfigError(f"--max-length={max_length} must be a positive integer")
    if max_length < window:
        raise ConfigError(f"--max-length={max_length} is shorter than --window={window}: "
                          "the window would cover every input (use plain RoBERTa / BERT)")
    path = resolve_checkpoint(checkpoint)
    where = f"--checkpoint {checkpoint}"
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: not a transformers checkpoint ({first_line(err)})") from None
    if config.model_type not in SOURCES:
        raise ConfigError(f"{where} holds a {config.model_type!r} model; convert-long takes a "
                          f"BERT or RoBERTa masked LM ({', '.join(SOURCES)})")
    # a RoBERTa source numbers positions from pad_token_id + 1: its inputs are shorter
    positions = config.max_position_embeddings - SOURCES[config.model_type][1](
        config.pad_token_id or 0)
    if max_length <= positions:
        raise ConfigError(f"--max-length={max_length} must exceed the {positions} positions of "
                          f"{where} (a long model longer than its source; nothing was written)")
    if config.hidden_act != "gelu":
        raise ConfigError(f"{where}: hidden_act={config.hidden_act!r}; Longformer's masked-LM "
                          "head uses gelu, so only gelu models convert exactly")
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    # a refused checkpoint is one line: no loading bar, no LOAD REPORT of missing keys
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        source, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ConfigError(f"{where}: cannot load its model ({first_line(err)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if info["missing_keys"]:
        raise ConfigError(f"{where}: its weights lack {len(info['missing_keys'])} tensors "
                          f"(e.g. {sorted(info['missing_keys'])[0]}): a masked-LM head is needed")
    tokenizer = load_tokenizer(path, "--checkpoint")  # its own one-line errors

    model = long_model(source, tokenizer, max_length, window)
    tokenizer.model_max_length = max_length
    try:
        tmp = fresh_tmp_dir(output)
    except OSError as err:
        raise ConfigError(f"--output {output} cannot be written ({err.strerror or err}); "
                          "choose a folder you can write to") from None
    try:
        with quiet_transformers(progress_bars=False):  # no "Writing model shards" bar
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not publish_dir(tmp, output, replace=False):
            raise ConfigError(f"--output {output} appeared while converting; it was left as is")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s (%s) -> LongformerForMaskedLM, %d tokens, window %d: %s",
             checkpoint, config.model_type, max_length, window, output)
    return output


def long_model(source, tokenizer, max_length: int, window: int):
    """The LongformerForMaskedLM made from ``source`` (a BERT / RoBERTa masked LM)."""
    from transformers import LongformerConfig, LongformerForMaskedLM

    cfg = source.config
    prefix, first_row, head_map = SOURCES[cfg.model_type]
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else tokenizer.pad_token_id
    config = LongformerConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        max_position_embeddings=max_length + pad + 1, type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.initializer_range, layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=pad,
        bos_token_id=tokenizer.cls_token_id if tokenizer.bos_token_id is None
        else tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id if tokenizer.eos_token_id is None
        else tokenizer.eos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        tie_word_embeddings=getattr(cfg, "tie_word_embeddings", True),
        attention_window=[window] * cfg.num_hidden_layers)

    state = {}
    for key, value in source.state_dict().items():
        if key.startswith(prefix + "."):
            rest = key[len(prefix) + 1:]
            if not rest.startswith("pooler."):
                state["longformer." + rest] = value
            continue
        for old, new in head_map.items():
            if key.startswith(old):
                state[new + key[len(old):]] = value
                break
    for i in range(cfg.num_hidden_layers):
        attention = f"longformer.encoder.layer.{i}.attention.self."
        for name in ("query", "key", "value"):
            for part in ("weight", "bias"):
                state[f"{attention}{name}_global.{part}"] = state[f"{attention}{name}.{part}"]
    positions = "longformer.embeddings.position_embeddings.weight"
    state[positions] = tile_positions(state[positions], first_row(pad), pad, max_length)

    model = LongformerForMaskedLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.decoder.weight", "lm_head.decoder.bias", "lm_head.bias"}
    if unexpected or set(missing) - tied:
        raise ConfigError(f"convert-long: the {cfg.model_type} weights do not map onto "
                          f"Longformer (missing {sorted(set(missing) - tied)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model.eval()


def tile_positions(table: torch.Tensor, first: int, pad: int, max_length: int) -> torch.Tensor:
    """A Longformer position table of ``max_length + pad + 1`` rows: the source's
    learned rows (from ``first``, where its first token's position is) repeated from row
    pad + 1 on; rows 0 .. pad are the source's when it numbers positions as Longformer
    (RoBERTa), else zeros (BERT: they are only ever looked up for padding)."""
    learned = table[first:]
    new = table.new_zeros(max_length + pad + 1, table.shape[1])
    if first == pad + 1:
        new[:first] = table[:first]
    for start in range(0, max_length, len(learned)):
        rows = min(len(learned), max_length - start)
        new[pad + 1 + start:pad + 1 + start + rows] = learned[:rows]
    return new
