"""`overture generate`: sample a continuation from a causal-LM checkpoint (a final/
folder, which is a plain transformers model + tokenizer)."""

from __future__ import annotations

import sys
from pathlib import Path

from .config import ConfigError


def resolve_checkpoint(checkpoint: str) -> str:
    """A final/ folder as given, a run folder's final/, or a Hub name left as is."""
    path = Path(checkpoint).expanduser()
    if (path / "final" / "config.json").is_file():
        return str(path / "final")
    if path.exists() and not (path / "config.json").is_file():
        raise ConfigError(f"--checkpoint {checkpoint}: no config.json here nor in "
                          f"{path / 'final'}; give a run's final/ folder")
    return str(path)


def generate(checkpoint: str, prompt: str, max_new_tokens: int = 40,
             temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
             seed: int = 0) -> str:
    """The prompt and ``max_new_tokens`` sampled tokens (greedy when temperature is 0).
    A prompt too long for the model keeps its last tokens, with a note on stderr."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={max_new_tokens} must be at least 1")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"--temperature={temperature} must be >= 0, --top-k={top_k} >= 0 "
                          f"and --top-p={top_p} in (0, 1]")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = resolve_checkpoint(checkpoint)
    try:
        config = AutoConfig.from_pretrained(path)
        architecture = (config.architectures or ["?"])[0]
        # Auto would wrap a masked LM's encoder in an untrained LM head: refuse it
        if architecture not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            raise ValueError(f"its architecture is {architecture}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--checkpoint {checkpoint}: not a causal-LM checkpoint "
                          f"({str(err).splitlines()[0]})") from err
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ConfigError("--prompt is empty: give at least one word to continue")
    room = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    if max_new_tokens >= room:
        raise ConfigError(f"--max-new-tokens={max_new_tokens} must be below the model's "
                          f"context of {room} tokens")
    if ids.shape[1] + max_new_tokens > room:
        keep = room - max_new_tokens
        print(f"note: the prompt has {ids.shape[1]} tokens; keeping its last {keep} "
              f"(context {room} - {max_new_tokens} new tokens)", file=sys.stderr)
        ids = ids[:, -keep:]
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=sample, temperature=temperature if sample else None,
        top_k=top_k if sample else None, top_p=top_p if sample else None,
        pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
