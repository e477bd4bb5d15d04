"""The device's peak dense-matmul TFLOP/s, the denominator of every run's ``mfu``.

On a known GPU, for a bf16 / fp16 run, the peak is its datasheet's dense figure (as MFU
is usually quoted). Otherwise (a CPU, an unknown GPU, an fp32 run) it is measured: the best of a few large square GEMMs in
the training dtype, with the threads this process uses, once per machine; the value is
kept in ``cache_file()``. Every benchmark run measures again and keeps the higher value;
a run's log names the file, to delete when a first measurement was taken on a busy
machine (a low peak inflates MFU).
``train.peak_tflops`` wins over both.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from .atomic import write_text_atomic

log = logging.getLogger(__name__)

# Dense bf16/fp16 peak TFLOP/s of known accelerators (datasheets, without sparsity).
DATASHEET_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                    "A10G": 125.0, "L4": 121.0, "V100": 125.0, "RTX 4090": 165.0,
                    "A6000": 155.0, "T4": 65.0}


def cache_file() -> Path:
    """Where measured peaks are kept: env OVERTURE_PEAK_FILE, else
    ``$XDG_CACHE_HOME/overture/peak.json`` (``~/.cache``)."""
    if os.environ.get("OVERTURE_PEAK_FILE"):
        return Path(os.environ["OVERTURE_PEAK_FILE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "overture" / "peak.json"


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a measured peak depends on: the processor, the threads, torch and the dtype."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
        if dtype == torch.float32:  # TF32 matmuls are another peak
            where += f" tf32={torch.backends.cuda.matmul.allow_tf32}"
    else:
        where = f"{platform.processor() or platform.machine()} {cpu_model()}"
        where += f" x{torch.get_num_threads()} threads"
    # "warm": measured after measure_gemm_tflops' timed warm-up; a value cached before it
    # (one warm-up product: a third of an AMX CPU's bf16 peak) is not reused
    return (f"{device.type}|{where}|torch {torch.__version__}|"
            f"{str(dtype).removeprefix('torch.')}|warm")


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), or ""."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def measure_gemm_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None,
                        repeats: int = 5, warmup_s: float = 0.5) -> float:
    """The best TFLOP/s of ``repeats`` square ``size`` x ``size`` matmuls (2·n³ FLOPs
    each) after ``warmup_s`` seconds of them (two at least). A CPU's bf16 matrix units
    (AMX) ran their first 2048² products at 0.7-0.9 TFLOP/s and then at 2.3-2.7 on this
    project's 2-core Xeon: one warm-up product measured a third of the peak."""
    size = size or (8192 if device.type == "cuda" else 2048)
    # its own generator: the run's global one drives dropout, which must not depend on
    # whether the peak was cached already
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)

    def timed() -> float:
        _sync(device)
        started = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        return time.perf_counter() - started

    warmed, calls = 0.0, 0
    while calls < 2 or warmed < warmup_s:
        warmed, calls = warmed + timed(), calls + 1
    best = min(timed() for _ in range(repeats))
    return 2 * size ** 3 / best / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_peak(device: torch.device, dtype: torch.dtype | None = None,
                  remeasure: bool = False) -> tuple[float, str]:
    """(TFLOP/s, where it comes from) for ``device``: the datasheet's for a known GPU,
    else the cached measurement, else a new one (``remeasure``: measure again and keep
    the higher)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in DATASHEET_TFLOPS.items():
            if key in name and dtype in (torch.bfloat16, torch.float16):
                return value, f"datasheet dense bf16 of {name}"
    key = machine_key(device, dtype)
    path = cache_file()
    cached = _read(path)
    if key in cached and not remeasure:
        return cached[key], f"measured {str(dtype).removeprefix('torch.')} GEMM, cached"
    value = measure_gemm_tflops(device, dtype)  # RuntimeError: the caller's to handle
    cached[key] = max(value, cached.get(key, 0.0))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(cached, indent=1) + "\n")
    except OSError as err:  # a read-only home: the value still serves this run
        log.debug("could not cache the peak in %s: %s", path, err)
    return cached[key], f"measured {str(dtype).removeprefix('torch.')} GEMM"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items()  # a hand-edited 0, -1 or Infinity: measured
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and 0 < v < float("inf")}


def run_peak(configured: float | None, device: torch.device,
             mixed_precision: str) -> tuple[float | None, str]:
    """The peak a run's ``mfu`` is measured against: ``train.peak_tflops`` when given,
    else ``measured_peak`` in the run's matmul dtype; (None, why) when it cannot be
    measured (the run goes on without ``mfu``)."""
    if configured is not None:
        return configured, "train.peak_tflops"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    try:
        value, source = measured_peak(device, dtype)
    except RuntimeError as err:  # out of memory beside the models, a dtype without a GEMM
        return None, f"no mfu: the matmul peak could not be measured ({str(err).splitlines()[0]})"
    if source.startswith("measured"):
        source += f"; delete {cache_file()} to measure it again"
    return value, source
