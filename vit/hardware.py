"""Whether a device multiplies bfloat16 matrices fast: where bf16 pays and where it costs."""

from __future__ import annotations

import functools

import torch


@functools.cache
def has_bf16_units(device: torch.device) -> bool:
    """True on GPUs with bf16 tensor cores (NVIDIA Ampere and later) and on CPUs with bf16
    instructions (Intel AMX or AVX512-BF16), where bfloat16 matrix products run several times
    faster than float32 ones; False on older GPUs and other CPUs, which emulate bfloat16 (on
    CPUs several times slower, benchmarks/RESULTS.md). Probed once per device, as the optimiser
    asks on every step."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
