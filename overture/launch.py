"""Launching on several processes: checks of an Accelerate config file against a recipe,
and a clean end for multi-process runs.

``check_accelerate_config`` reads the file with Accelerate's own loader (the one
``accelerate launch --config_file`` uses) and says, before any GPU is taken, what would
go wrong or silently differ: it needs neither DeepSpeed nor a GPU installed, only the
YAML (and, when the file names one, the DeepSpeed JSON).

The rules, and why:

- **Mixed precision**: overture passes the recipe's ``train.mixed_precision`` to
  ``Accelerator``, so the recipe wins over the file's ``mixed_precision`` (a note says so
  when they differ).
- **DeepSpeed and gradient accumulation**: overture accumulates micro-batches itself
  (``accelerator.no_sync`` around all but the last, losses normalised by the counts of
  every micro-batch). Under DeepSpeed, ``accelerator.backward`` runs the engine's
  backward *and step* on every call, and DeepSpeed divides the loss by its own
  ``gradient_accumulation_steps``: overture's accumulation would step the optimizer once
  per micro-batch. So ``train.gradient_accumulation_steps`` must be 1 under DeepSpeed, and
  so must the file's ``gradient_accumulation_steps``; raise ``train.batch_size`` or the
  process count instead.
- **DeepSpeed clipping** is DeepSpeed's ``gradient_clipping`` (``accelerator.clip_grad_norm_``
  does nothing there): it must equal the recipe's ``train.max_grad_norm``.
- **ZeRO-3** needs ``zero3_save_16bit_model: true``: the export of ``final/`` gathers the
  weights with ``accelerator.get_state_dict``, which ZeRO-3 refuses otherwise.
- **FSDP state dict**: FULL_STATE_DICT and SHARDED_STATE_DICT both work with overture's
  checkpoints (``accelerator.save_state`` / ``load_state``) and ``final/`` export
  (``get_state_dict`` always gathers a full state dict); LOCAL_STATE_DICT is refused
  (FSDP2 lacks it, and it could only resume on the same process count).
- **Processes and machines**: counts are positive, ``num_processes`` (the total over all
  machines) is a multiple of ``num_machines``, ``machine_rank`` is in range.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from .config import ConfigError

DEEPSPEED_ACCUMULATION = (
    "overture accumulates micro-batches itself, and under DeepSpeed every backward also "
    "steps the optimizer: gradient accumulation cannot be used with DeepSpeed. Set "
    "train.gradient_accumulation_steps=1 (and gradient_accumulation_steps: 1 in the "
    "Accelerate config), and grow the global batch with train.batch_size or more processes")

_DDP_TYPES = {"MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_XPU",
              "MULTI_HPU", "MULTI_NEURON"}
_STATE_DICT_TYPES = {"FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT"}


def load_accelerate_config(path: str | os.PathLike):
    """The file parsed by Accelerate's own loader (``accelerate launch --config_file``):
    a ``ClusterConfig`` (or ``SageMakerConfig``). Errors name the file."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Accelerate config {path}: no such file (write one with "
                          "`accelerate config --config_file FILE`, or use one of "
                          "recipes/accelerate/*.yaml)")
    try:
        return load_config_from_file(str(path))
    except Exception as err:  # yaml.YAMLError, unknown keys / values (ValueError), ...
        detail = " ".join(str(err).split())
        raise ConfigError(f"Accelerate config {path}: not a valid Accelerate config file: "
                          f"{type(err).__name__}: {detail}") from None


def check_accelerate_config(path: str | os.PathLike, recipe) -> list[str]:
    """Validate an Accelerate config file against ``recipe``.

    Returns notes (what wins where the file and the recipe differ, what a launch will
    use); raises ``ConfigError`` listing every problem that would make the run fail or
    train differently from the recipe. Needs no GPU and no DeepSpeed.
    """
    cfg = load_accelerate_config(path)
    name = str(path)
    errors: list[str] = []
    notes: list[str] = []
    train = recipe.train
    kind = getattr(cfg.distributed_type, "value", str(cfg.distributed_type))

    # ---------------------------------------------------------------- where it runs
    env = getattr(cfg.compute_environment, "value", str(cfg.compute_environment))
    if env != "LOCAL_MACHINE":
        notes.append(f"compute_environment {env}: overture is tested with LOCAL_MACHINE only")
    if kind == "MEGATRON_LM":
        errors.append("distributed_type MEGATRON_LM: overture's models are transformers / "
                      "timm models, not Megatron-LM ones; use MULTI_GPU, FSDP or DEEPSPEED")
    elif kind == "MULTI_CPU":
        notes.append("distributed_type MULTI_CPU: Accelerate starts several CPU processes "
                     "only through mpirun (mpirun_config); without it a single process runs. "
                     "recipes/accelerate/cpu-2proc-ddp.yaml runs CPU DDP without mpirun")
    elif kind == "XLA":
        notes.append("distributed_type XLA (TPU): not tested with overture")

    for key in ("num_processes", "num_machines", "machine_rank"):
        value = getattr(cfg, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"Accelerate config {name}: {key}={value!r} must be an integer")
    processes = getattr(cfg, "num_processes", 1)
    machines = getattr(cfg, "num_machines", 1) or 1
    rank = getattr(cfg, "machine_rank", 0) or 0
    if processes is None or processes == -1:
        notes.append("num_processes is not set: pass --num_processes N to accelerate launch")
        processes = None
    elif processes < 1:
        errors.append(f"num_processes={processes} must be at least 1")
        processes = None
    if machines < 1:
        errors.append(f"num_machines={machines} must be at least 1")
    elif processes is not None and processes % machines:
        errors.append(f"num_processes={processes} is the total over all machines and must "
                      f"be a multiple of num_machines={machines}")
    elif machines > 1:
        if not 0 <= rank < machines:
            errors.append(f"machine_rank={rank} must be in 0..{machines - 1}")
        where = (f"main_process_ip {cfg.main_process_ip}" if getattr(cfg, "main_process_ip", None)
                 else "no main_process_ip: pass --main_process_ip IP_OF_MACHINE_0")
        notes.append(f"{machines} machines ({where}); on each machine run the same command "
                     f"with --machine_rank R (0..{machines - 1})")
    if kind == "NO" and processes is not None and processes > 1:
        errors.append(f"distributed_type NO runs one process, not num_processes={processes}: "
                      "use MULTI_GPU (DDP), FSDP or DEEPSPEED")
    if kind in _DDP_TYPES and processes == 1:
        notes.append(f"distributed_type {kind} with num_processes=1: one process")
    if getattr(cfg, "use_cpu", False) and kind in _DDP_TYPES:
        notes.append("use_cpu with MULTI_GPU: on a machine without a GPU overture forms a "
                     "gloo process group (CPU DDP); where a GPU is present it is used")
    if processes is not None:
        per_step = train.batch_size * processes * train.gradient_accumulation_steps
        notes.append(f"global batch: train.batch_size {train.batch_size} x {processes} "
                     f"processes x {train.gradient_accumulation_steps} micro-batches = "
                     f"{per_step} examples per optimizer step")

    # ---------------------------------------------------------------- precision
    file_precision = str(getattr(cfg, "mixed_precision", None) or "no").lower()
    if file_precision != train.mixed_precision:
        notes.append(f"mixed_precision: the recipe's train.mixed_precision="
                     f"{train.mixed_precision} is used, the file's {file_precision!r} is "
                     f"ignored (overture passes the recipe's value to Accelerate)")

    # ---------------------------------------------------------------- DeepSpeed
    if kind == "DEEPSPEED":
        errors += _check_deepspeed(cfg.deepspeed_config or {}, train, name, notes)
    elif train.gradient_accumulation_steps > 1 and kind in {"NO", "FSDP", *_DDP_TYPES}:
        notes.append(f"gradient accumulation: {train.gradient_accumulation_steps} micro-batches "
                     "per step, done by overture (gradients synchronised on the last)")

    # ---------------------------------------------------------------- FSDP
    if kind == "FSDP":
        errors += _check_fsdp(cfg.fsdp_config or {}, recipe, notes)

    if errors:
        raise ConfigError(f"Accelerate config {name} does not fit recipe "
                          f"{recipe.name!r}:\n  - " + "\n  - ".join(errors))
    return notes


def _check_deepspeed(ds: dict, train, name: str, notes: list[str]) -> list[str]:
    errors = []
    json_file = ds.get("deepspeed_config_file")
    if json_file and str(json_file).lower() != "none":
        path = Path(json_file)
        try:
            full = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return [f"deepspeed_config_file {path}: no such file"]
        except (OSError, ValueError) as err:
            return [f"deepspeed_config_file {path}: not valid JSON ({err})"]
        zero = full.get("zero_optimization") or {}
        accumulation = full.get("gradient_accumulation_steps")
        stage = zero.get("stage", 0)
        clipping = full.get("gradient_clipping")
        save_16bit = zero.get("stage3_gather_16bit_weights_on_model_save",
                              zero.get("stage3_gather_fp16_weights_on_model_save", False))
        for key in ("optimizer", "scheduler"):
            if key in full:
                errors.append(f"deepspeed_config_file {path} defines {key!r}: overture builds "
                              f"its own {key} from the recipe; remove it")
        micro = full.get("train_micro_batch_size_per_gpu")
        if micro not in (None, "auto") and micro != train.batch_size:
            errors.append(f"deepspeed_config_file {path}: train_micro_batch_size_per_gpu="
                          f"{micro} differs from train.batch_size={train.batch_size}; set it "
                          "to \"auto\"")
        for precision in ("fp16", "bf16"):
            enabled = (full.get(precision) or {}).get("enabled", "auto")
            if enabled != "auto" and bool(enabled) != (train.mixed_precision == precision):
                errors.append(f"deepspeed_config_file {path}: {precision}.enabled={enabled} "
                              f"contradicts train.mixed_precision={train.mixed_precision}; "
                              "set it to \"auto\"")
    else:
        accumulation = ds.get("gradient_accumulation_steps", 1)
        stage = ds.get("zero_stage", 2)
        clipping = ds.get("gradient_clipping")
        save_16bit = ds.get("zero3_save_16bit_model", False)
        if clipping is None:  # Accelerate fills "auto" clipping with 1.0
            clipping = 1.0
    if train.gradient_accumulation_steps > 1:
        errors.append(f"train.gradient_accumulation_steps={train.gradient_accumulation_steps}: "
                      + DEEPSPEED_ACCUMULATION)
    if accumulation not in (None, "auto") and str(accumulation) != "1":
        errors.append(f"DeepSpeed gradient_accumulation_steps={accumulation}: "
                      + DEEPSPEED_ACCUMULATION)
    try:
        stage = int(stage)
    except (TypeError, ValueError):
        errors.append(f"DeepSpeed zero_stage={stage!r} must be 0, 1, 2 or 3")
        stage = None
    if stage is not None and stage not in (0, 1, 2, 3):
        errors.append(f"DeepSpeed zero_stage={stage} must be 0, 1, 2 or 3")
    if stage == 3 and str(save_16bit).lower() not in ("true", "1", "auto"):
        errors.append("ZeRO-3 without zero3_save_16bit_model: true (stage3_gather_16bit_weights_"
                      "on_model_save): the export of final/ could not gather the weights")
    if clipping not in (None, "auto"):
        wanted = train.max_grad_norm
        if (wanted is None and float(clipping) > 0) or (
                wanted is not None and float(clipping) != float(wanted)):
            errors.append(f"DeepSpeed gradient_clipping={clipping} differs from "
                          f"train.max_grad_norm={wanted}: under DeepSpeed only DeepSpeed's "
                          "clipping applies; make them equal (0 disables DeepSpeed's)")
    notes.append(f"DeepSpeed ZeRO-{stage}: one trained model per run (not the GAN family); "
                 "install deepspeed on the machines that launch it")
    return errors


def _check_fsdp(fsdp: dict, recipe, notes: list[str]) -> list[str]:
    errors = []
    version = int(fsdp.get("fsdp_version", 1) or 1)
    default = "FULL_STATE_DICT" if version == 1 else "SHARDED_STATE_DICT"
    state_dict = str(fsdp.get("fsdp_state_dict_type") or default).upper()
    if version == 1:
        notes.append("fsdp_version 1: FSDP1 is deprecated in PyTorch; fsdp_version: 2 is "
                     "what overture is written for")
    if state_dict not in _STATE_DICT_TYPES:
        errors.append(f"fsdp_state_dict_type={state_dict}: use FULL_STATE_DICT or "
                      "SHARDED_STATE_DICT")
    elif state_dict == "LOCAL_STATE_DICT":
        errors.append("fsdp_state_dict_type=LOCAL_STATE_DICT: overture's checkpoints need "
                      "FULL_STATE_DICT or SHARDED_STATE_DICT (FSDP2 has no local state "
                      "dict, and it could resume only on the same process count)")
    elif state_dict == "FULL_STATE_DICT":
        notes.append("FULL_STATE_DICT: each checkpoint gathers the whole model and optimizer "
                     "state on rank 0 (CPU memory); final/ is a full transformers folder")
    else:
        notes.append("SHARDED_STATE_DICT: each rank writes its shard of a checkpoint "
                     "(torch.distributed.checkpoint); final/ is still gathered whole into a "
                     "transformers folder")
    wrap = str(fsdp.get("fsdp_auto_wrap_policy") or "").upper()
    if wrap == "TRANSFORMER_BASED_WRAP":
        errors += _check_wrap_classes(fsdp.get("fsdp_transformer_layer_cls_to_wrap"), recipe,
                                      notes)
    return errors


def _check_wrap_classes(names, recipe, notes: list[str]) -> list[str]:
    """The layer classes TRANSFORMER_BASED_WRAP would wrap exist in the recipe's models
    (built on the meta device: no memory, no tokenizer)."""
    import torch

    from .registry import build_objective

    objective = build_objective(recipe)
    with torch.device("meta"):
        models = objective.build_models(recipe.tokenizer.vocab_size)
    errors = []
    for key, model in models.items():
        present = {type(m).__name__ for m in model.modules()}
        if names:
            wanted = [n.strip() for n in str(names).split(",") if n.strip()]
            missing = [n for n in wanted if n not in present]
            if missing:
                errors.append(f"fsdp_transformer_layer_cls_to_wrap: {', '.join(missing)} not in "
                              f"the {recipe.objective.name} model {key!r} (Accelerate would "
                              f"fail); its layer classes include "
                              f"{', '.join(sorted(n for n in present if 'Layer' in n or 'Block' in n))}")
        elif not getattr(model, "_no_split_modules", None):
            inner = sorted({c for m in model.modules()
                            for c in (getattr(m, "_no_split_modules", None) or [])})
            notes.append(f"TRANSFORMER_BASED_WRAP without fsdp_transformer_layer_cls_to_wrap: "
                         f"model {key!r} ({type(model).__name__}) names no _no_split_modules, "
                         "so FSDP shards it as one unit" + (
                             f"; set fsdp_transformer_layer_cls_to_wrap: {','.join(inner)} "
                             "to shard layer by layer" if inner else ""))
    return errors


def configure_accelerator(accelerator, recipe) -> None:
    """Runtime side of the rules above, for the engine to call right after creating its
    ``Accelerator`` (before ``prepare``): refuses accumulation under DeepSpeed and gives
    DeepSpeed the micro-batch size (overture prepares its models before its data
    loaders, so Accelerate cannot infer it)."""
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind != "DEEPSPEED":
        return
    if recipe.train.gradient_accumulation_steps > 1:
        raise ConfigError(f"train.gradient_accumulation_steps="
                          f"{recipe.train.gradient_accumulation_steps}: {DEEPSPEED_ACCUMULATION}")
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if str(ds.get("gradient_accumulation_steps", 1)) not in ("1", "auto"):
        raise ConfigError(f"DeepSpeed gradient_accumulation_steps="
                          f"{ds['gradient_accumulation_steps']}: {DEEPSPEED_ACCUMULATION}")
    ds["gradient_accumulation_steps"] = 1
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = recipe.resolved_phases()[0].batch_size


# ------------------------------------------------------------------------ process exit


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def run_main(main, argv: list[str] | None = None) -> int:
    """``main(argv)``'s exit code; on a multi-process launch (WORLD_SIZE > 1) the process
    ends here instead of returning.

    Measured here: about 1 multi-process run in 6-12 aborts at interpreter exit with a
    C++ "terminate called without an active exception" (exit 134) after all the work is
    done. Ending with the process group destroyed, output flushed and ``os._exit`` is
    clean. Exceptions keep their traceback and exit 1; ``SystemExit`` keeps its code.
    """
    if world_size() <= 1:
        return main(argv)
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported, then the same clean exit
        import traceback

        traceback.print_exc()
        code = 1
    exit_process(0 if code is None else code)


def exit_process(code: int) -> NoReturn:
    """End this process now: process group destroyed, logs and output flushed, then
    ``os._exit`` (no interpreter teardown, where the C++ abort happens)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)
