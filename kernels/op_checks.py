"""The checks of the capo:: ops' fake kernels: shapes, dtypes and devices, with `torch._check`.

The fake kernels (kernels/policy_loss.py, kernels/linear_policy_loss.py) state the checks the C++ ops make
(csrc/policy_loss.cpp), so a wrong call fails while torch.compile traces, with a message naming the
argument, not deep in a kernel (as pytorch/extension-cpp's ops.py does). This module imports nothing of
the package: the op records and their layout stay with the ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def rows_contiguous(t: torch.Tensor) -> bool:
    """Rows the kernels can read as `row_ptr + j`: unit column stride, or nothing that the stride could reach."""
    return t.shape[0] == 0 or t.shape[1] <= 1 or t.stride(1) == 1


def check_matrix(name: str, t: torch.Tensor) -> None:
    """`t` is 2-D and floating point."""
    torch._check(t.dim() == 2, lambda: f"capo: {name} must be 2-D, got shape {tuple(t.shape)}")
    torch._check(t.dtype.is_floating_point, lambda: f"capo: {name} must be floating point, got {t.dtype}")


def check_rows(name: str, t: torch.Tensor) -> None:
    """`t` is [N, K], floating point, with rows the kernels can read (`rows_contiguous`)."""
    check_matrix(name, t)
    torch._check(rows_contiguous(t), lambda: f"capo: {name} rows must be contiguous (stride(1) == 1), got {t.stride()}")


def check_per_token(rows: str, n, device: torch.device, **per_token: torch.Tensor | None) -> None:
    """Each given tensor is [n] on `device`, one value per row of the tensor named `rows` (the logits or the
    hidden states); `labels` of an integer type, the others floating point."""
    for name, t in per_token.items():
        if t is not None:
            _check_vector(name, t, rows, n, device)


def _check_vector(name: str, t: torch.Tensor, rows: str, n, device: torch.device) -> None:
    torch._check(
        t.dim() == 1 and t.shape[0] == n,
        lambda: f"capo: {name} must have shape [{n}] (one value per row of the {rows}), got {tuple(t.shape)}",
    )
    torch._check(t.device == device, lambda: f"capo: {name} is on {t.device}, the {rows} on {device}")
    if name == "labels":
        torch._check(is_integer(t.dtype), lambda: f"capo: labels must be integers, got {t.dtype}")
    else:
        torch._check(t.dtype.is_floating_point, lambda: f"capo: {name} must be floating point, got {t.dtype}")


def check_options(options: Sequence[float], names: Sequence[str]) -> None:
    """An op's `float[] options` holds one value per name of `names` (PolicyLossOptions' fields), temperature > 0."""
    torch._check(
        len(options) == len(names), lambda: f"capo: options must hold {len(names)} values {names}, got {len(options)}"
    )
    check_temperature(options[names.index("temperature")])


def check_temperature(temperature: float) -> None:
    torch._check(temperature > 0, lambda: f"capo: temperature must be > 0, got {temperature}")
