"""One validation at the boundary: torch tensors or NumPy arrays in, checked NumPy float arrays out.

Everything after this module trusts its inputs (scikit-learn's ``_check_reg_targets`` pattern).
"""
from __future__ import annotations

import sys
from typing import Any, Literal

import numpy as np

from oocmetrics.kernels import count_nonfinite, is_all_finite

NonFinite = Literal["raise", "skip"]
_FLOATS = (np.float16, np.float32, np.float64)


def check_epoch_number(epoch: Any) -> int:
    """An epoch number: an int >= 0 (a ValueError naming the value otherwise)."""
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch={epoch!r}; expected an int >= 0.")
    return int(epoch)


def store_dtype(dtype: np.dtype) -> np.dtype:
    """How a batch dtype is stored: float64 stays float64, every narrower float becomes float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _torch_to_numpy(x: Any, name: str) -> np.ndarray:
    import torch

    if not (x.is_floating_point()):
        raise TypeError(
            f"{name} has dtype {x.dtype}; expected a floating dtype (float16, bfloat16, float32, "
            f"float64). Cast it first, e.g. {name}.float()."
        )
    if x.device.type == "meta":
        raise TypeError(
            f"{name} is a tensor on the 'meta' device: it has a shape but no values to record. "
            f"Pass the real outputs (e.g. run the model on a CPU or CUDA device)."
        )
    x = x.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        # NumPy has no bfloat16: widen on the device, which is exact, then copy to host once.
        x = x.to(dtype=torch.float32)
    if x.device.type != "cpu":
        x = x.to("cpu")  # note: a device-to-host copy and a sync point
    return x.numpy()


def as_float_array(x: Any, name: str) -> np.ndarray:
    """``x`` as a NumPy float array without copying when it already is one (CPU tensors share memory)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return _torch_to_numpy(x, name)
    if not isinstance(x, np.ndarray):
        if isinstance(x, (list, tuple)) or np.isscalar(x):
            raise TypeError(
                f"{name} is a {type(x).__name__}; expected a NumPy array or torch tensor. "
                f"Wrap it with np.asarray({name}, dtype=np.float32)."
            )
        if not hasattr(x, "__array__"):
            raise TypeError(
                f"{name} is a {type(x).__name__}; expected a NumPy array or torch tensor."
            )
        x = np.asarray(x)
    if x.dtype.kind == "f" and not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))  # big-endian data (e.g. read from a file): convert once
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"{name} has dtype {x.dtype}; expected a floating dtype (float16, float32, float64). "
            f"Cast it first, e.g. {name}.astype(np.float32)."
        )
    return x


def check_batch(
    y_true: Any,
    y_pred: Any,
    *,
    trailing: tuple[int, ...] | None,
    batch_index: int,
    row_offset: int,
    nonfinite: NonFinite,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one (y_true, y_pred) batch; raise TypeError/ValueError naming the value and the fix."""
    t = as_float_array(y_true, "y_true")
    p = as_float_array(y_pred, "y_pred")
    if t.ndim == 0:
        raise ValueError(
            "y_true is a scalar; expected an array whose first axis is the batch (rows), "
            "e.g. shape (16, 500, 20) or (16,)."
        )
    if p.shape != t.shape:
        raise ValueError(
            f"Expected y_pred to have the shape of y_true {tuple(t.shape)}, but got {tuple(p.shape)} "
            f"(batch {batch_index}). Pass (y_true, y_pred) in that order, with matching shapes."
        )
    if trailing is not None and tuple(t.shape[1:]) != trailing:
        raise ValueError(
            f"Batch {batch_index} has trailing shape {tuple(t.shape[1:])}, but this epoch's batches "
            f"have {trailing}. Axis 0 is the batch and may vary; the other axes are fixed within an "
            f"epoch. Call reset() to start a new epoch with another shape."
        )
    if nonfinite == "raise":
        for name, arr in (("y_true", t), ("y_pred", p)):
            if not is_all_finite(arr):
                n_bad = count_nonfinite(arr)
                rows = f"rows {row_offset}-{row_offset + arr.shape[0] - 1}"
                raise ValueError(
                    f"{name} in batch {batch_index} ({rows} of this epoch) has {n_bad} non-finite "
                    f"value(s) (NaN/Inf); the batch was not recorded and earlier batches are kept. "
                    f"Fix the data or model, or pass nonfinite='skip' to the Recorder to store them "
                    f"and leave those values out of the metrics (counted in n_skipped)."
                )
    return t, p


def check_labels(x: Any, name: str, n: int, batch_index: int) -> np.ndarray:
    """Per-row integer labels (``ids`` or ``groups``) of a batch of ``n`` rows, as an int64 array.

    Torch tensors (any device) and NumPy arrays of any integer dtype are accepted; floats and bools
    are refused (an id that went through float32 may have been rounded: 16777217 -> 16777216).
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(
                f"{name} in batch {batch_index} is a {x.dtype} tensor; expected integers (e.g. dataset "
                f"indices as torch.int64)."
            )
        x = x.to("cpu").numpy()
    elif isinstance(x, (list, tuple, range)):
        x = np.asarray(x)
        if x.size == 0:
            x = x.astype(np.int64)
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{name} is a {type(x).__name__}; expected a NumPy array or torch tensor of integers.")
    if x.dtype.kind not in "iu":
        raise TypeError(
            f"{name} in batch {batch_index} has dtype {x.dtype}; expected integers, e.g. "
            f"np.arange(start, start + {n}) or the dataset indices of the batch's samples."
        )
    if x.shape != (n,):
        raise ValueError(
            f"{name} in batch {batch_index} has shape {tuple(x.shape)}; expected ({n},): one label per row "
            f"of y_true."
        )
    if x.dtype == np.uint64 and x.size and int(x.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} in batch {batch_index} holds values above 2**63 - 1; int64 cannot store them.")
    return x.astype(np.int64, copy=False)
