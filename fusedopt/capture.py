"""Whether a CUDA graph is being captured: the one question every layer that caches device
tensors asks (a leaf module: it imports nothing of fusedopt, so the base class, the backends and
the kernels can all read it without importing each other)."""

from __future__ import annotations

import torch


def capturing(device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of a CUDA ``device``.

    What a step makes on the device then (a launch table copied from the host, a zeroed
    buffer) is only written when the graph replays: a backend must not keep such a tensor in
    a cache that an eager step could read before a replay (it builds it again instead)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()
