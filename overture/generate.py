"""`overture generate`: sample a continuation from a causal-LM checkpoint (a final/
folder, which is a plain transformers model + tokenizer)."""

from __future__ import annotations

import sys

from .config import check_seed
from .errors import ConfigError, first_line
from .hub import load_pretrained, load_tokenizer, quiet_transformers, resolve_checkpoint


def generate(checkpoint: str, prompt: str, max_new_tokens: int = 40,
             temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
             seed: int = 0) -> str:
    """The prompt and ``max_new_tokens`` sampled tokens (greedy when temperature is 0).
    A prompt too long for the model keeps its last tokens, with a note on stderr."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={max_new_tokens} must be at least 1")
    # NaN fails every comparison: test finiteness first, each option on its own
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature={temperature} must be a finite number >= 0 "
                          "(0 decodes greedily)")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise ConfigError(f"--top-p={top_p} must be a finite number in (0, 1]")
    check_seed("--seed", seed)
    if top_k < 0:
        raise ConfigError(f"--top-k={top_k} must be >= 0 (0 disables top-k filtering)")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = resolve_checkpoint(checkpoint)  # the command refuses other families' first
    try:
        config = AutoConfig.from_pretrained(path)
        architecture = (config.architectures or ["?"])[0]
        # Auto would wrap a masked LM's encoder in an untrained LM head: refuse it
        if architecture not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            raise ValueError(f"its architecture is {architecture}")
    except (OSError, ValueError) as err:
        raise ConfigError(f"--checkpoint {checkpoint}: not a causal-LM checkpoint "
                          f"({first_line(err)})") from err
    tokenizer = load_tokenizer(path, "--checkpoint")
    # every check before the weights load, so that an error is one line
    room = getattr(config, "n_positions", None) or config.max_position_embeddings
    if max_new_tokens >= room:
        raise ConfigError(f"--max-new-tokens={max_new_tokens} must be below the model's "
                          f"context of {room} tokens")
    # overture keeps the end of a long prompt below (and says so): no transformers note
    with quiet_transformers():
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ConfigError("--prompt is empty: give at least one word to continue")
    if ids.shape[1] + max_new_tokens > room:
        keep = room - max_new_tokens
        print(f"note: the prompt has {ids.shape[1]} tokens; keeping its last {keep} "
              f"(context {room} - {max_new_tokens} new tokens)", file=sys.stderr)
        ids = ids[:, -keep:]
    try:
        model = load_pretrained(AutoModelForCausalLM, path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--checkpoint {checkpoint}: not a causal-LM checkpoint "
                          f"({first_line(err)})") from err
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=sample, temperature=temperature if sample else None,
        top_k=top_k if sample else None, top_p=top_p if sample else None,
        pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
