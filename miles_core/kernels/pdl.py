"""Programmatic dependent launch (PDL, sm_90+) for the decode step's Triton kernels.

A decode step in a CUDA graph is ~120 launches, most of them a few microseconds of latency-bound work,
and each starts only when the one before it has finished: its programs are placed, set up and issue their
first loads while the GPU drains. With PDL (`kernels.PDL`, MILES_PDL=1) a kernel is launched while its
predecessor still runs: its programs become resident where the predecessor leaves room, and wait
(`griddepcontrol.wait`) until the predecessor has finished and its writes are visible before they read
anything. The predecessor lets its dependents launch (`griddepcontrol.launch_dependents`) either at once
(small one-wave kernels) or after its main loop (the multi-wave GEMMs, so that waiting dependents never take
the room their own later programs need).

Every PDL kernel keeps two rules: it waits before any global memory access, and it lets dependents launch
only after its own wait, so a kernel two launches back has always finished before a dependent starts.
Kernels launched without PDL (cuBLAS, torch ops) keep the stream's full ordering on both sides. The bits
never change: the same kernels compute the same values, only their start times move.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no triton
    triton = None

__all__ = ["enabled", "launch"]


def enabled(t: torch.Tensor) -> bool:
    """PDL applies to a launch on t's device: switched on (`kernels.PDL`), CUDA sm_90+, compiled (not the
    Triton interpreter)."""
    from miles_core import kernels

    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return kernels.PDL and t.is_cuda and not interpreted and _sm90(t.device.index)


@functools.cache
def _sm90(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def launch(t: torch.Tensor) -> dict:
    """Extra keyword arguments of a Triton launch on t's device: the kernel's `PDL` constexpr and Triton's
    `launch_pdl` option, or nothing."""
    return {"PDL": True, "launch_pdl": True} if enabled(t) else {}


if triton is not None:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """First statement of a PDL kernel: wait until the previous kernel has finished."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def pdl_release(PDL: tl.constexpr):
        """Let the next kernel launch (after `pdl_wait`; repeated calls do nothing)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def pdl_enter(PDL: tl.constexpr):
        """Wait, then let the next kernel launch at once (small one-wave kernels)."""
        pdl_wait(PDL)
        pdl_release(PDL)
