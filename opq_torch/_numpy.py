"""The one conversion of a tensor to a NumPy array in the adapter."""
from __future__ import annotations

import numpy as np
import torch


def to_numpy(t: torch.Tensor, *, half: bool = False, copy: bool = False) -> np.ndarray:
    """``t`` detached, on the CPU, contiguous, as a NumPy array.

    bfloat16 (which NumPy lacks) becomes float32 exactly; so does float16 with ``half``.
    Without ``copy`` the array is a view of the memory of a contiguous CPU tensor (no copy);
    with it, always a fresh array.
    """
    t = t.detach()
    if t.dtype == torch.bfloat16 or (half and t.dtype == torch.float16):
        t = t.float()
    a = t.cpu().contiguous().numpy()
    return a.copy() if copy else a
