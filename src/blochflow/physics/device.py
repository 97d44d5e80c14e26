"""Where the Bloch solves run: the CPU, or a CUDA device when one is asked for.

Only the physics layer's heavy work (structure matrices, eigendecompositions, propagation) moves;
parameters, objective and optimiser stay on the CPU, so results, checkpoints and files do not depend
on the device. ``blochflow --device`` sets the process default that forward models take.
"""

from __future__ import annotations

import os

import torch

DEVICE_CHOICES = ("cpu", "cuda", "auto")
_default: list[torch.device] = [torch.device("cpu")]


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto``: the first CUDA device if torch sees one and a batched eigensolver is usable there
    (jax or cupy: without one a GPU is no faster than the CPU), else the CPU. A CUDA device that
    torch does not see is an error (ValueError with the reason)."""
    if isinstance(name, torch.device):
        device = name
    elif str(name).strip().lower() == "auto":
        from .bloch import fast_cuda_eigh_available

        device = torch.device("cuda" if torch.cuda.is_available() and fast_cuda_eigh_available() else "cpu")
    else:
        try:
            device = torch.device(str(name).strip().lower())
        except RuntimeError:
            raise ValueError(f"unknown device '{name}' (choose {', '.join(DEVICE_CHOICES)}, or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available to this torch build or on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"no CUDA device {device.index} ({torch.cuda.device_count()} found)")
    elif device.type != "cpu":
        raise ValueError(f"device '{name}' is not supported (choose {', '.join(DEVICE_CHOICES)}, or cuda:N)")
    return device


def set_default_device(name: str | torch.device) -> torch.device:
    """Make ``name`` the device of forward models built from now on; returns it."""
    _default[0] = resolve_device(name)
    return _default[0]


def default_device() -> torch.device:
    return _default[0]


def work_scale(device: torch.device) -> float:
    """How many times larger than on a CPU one batched call should be on ``device``: a GPU needs big
    batches to pay for its launches, and its memory bounds them (x1 per 2 GiB, between 4 and 64)."""
    if device.type != "cuda":
        return 1.0
    total = torch.cuda.get_device_properties(device).total_memory
    return float(min(64.0, max(4.0, total / 2 ** 31)))


def device_memory(device: torch.device) -> float:
    """Bytes of memory of the device (a GPU's own, else the machine's)."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 16 GB
        return 16e9
