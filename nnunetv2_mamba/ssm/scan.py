"""``selective_scan``: one entry point, dispatched to a registry of backends.

Backends are tried in preference order (fastest first); the first one that is available and supports the
tensors wins. ``backend=`` or the environment variable ``NNUNETV2_MAMBA_BACKEND`` forces one by name
("auto" restores automatic choice). Adding a backend means writing one module in ``backends/`` and one
``register_backend`` line below.
"""
from __future__ import annotations

import difflib
import logging
import os
from typing import Dict, List, Optional

import torch

from nnunetv2_mamba.ssm.backends.base import ScanBackend
from nnunetv2_mamba.ssm.backends.mamba_ssm_backend import MambaSsmBackend
from nnunetv2_mamba.ssm.backends.torch_backend import TorchBackend
from nnunetv2_mamba.ssm.backends.triton_backend import TritonBackend

logger = logging.getLogger(__name__)

BACKEND_ENV_VAR = "NNUNETV2_MAMBA_BACKEND"

_REGISTRY: Dict[str, ScanBackend] = {}
_PREFERENCE: List[str] = []


class BackendError(RuntimeError):
    """A requested scan backend is unknown, not installed, or cannot run the given tensors."""


def register_backend(backend: ScanBackend, preference: Optional[int] = None) -> None:
    """Add a backend to the registry; ``preference`` is its position in the automatic order (0 = first)."""
    _REGISTRY[backend.name] = backend
    if backend.name in _PREFERENCE:
        _PREFERENCE.remove(backend.name)
    _PREFERENCE.insert(len(_PREFERENCE) if preference is None else preference, backend.name)


def backend_names() -> List[str]:
    """Return the registered backend names in automatic preference order."""
    return list(_PREFERENCE)


def get_backend(name: str) -> ScanBackend:
    """Return the backend registered under ``name``, or raise BackendError listing the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name).replace("-", "_"), _PREFERENCE + ["auto"], n=1, cutoff=0.5)
        suggestion = f"Did you mean {close[0]!r}? " if close else ""
        raise BackendError(f"Unknown selective-scan backend {name!r}. {suggestion}Known backends: "
                           f"{', '.join(_PREFERENCE)} (or 'auto').") from None


def requested_backend_name(backend: Optional[str] = None) -> str:
    """Return the backend asked for by the keyword, else by $NNUNETV2_MAMBA_BACKEND, else 'auto'."""
    name = backend if backend is not None else os.environ.get(BACKEND_ENV_VAR, "auto")
    name = (name or "auto").strip().lower()
    if name != "auto":
        get_backend(name)  # raises a clear error for unknown names
    return name


def select_backend(u: torch.Tensor, A: torch.Tensor, backend: Optional[str] = None) -> ScanBackend:
    """Return the backend that will run a scan of ``u`` (B, D, L) with state matrix ``A`` (D, N)."""
    name = requested_backend_name(backend)
    if name != "auto":
        chosen = get_backend(name)
        reason = chosen.unavailable_reason() or chosen.unsupported_reason(u, A)
        if reason is not None:
            source = "backend=" if backend is not None else f"${BACKEND_ENV_VAR}="
            raise BackendError(f"Selective-scan backend {name!r} was requested ({source}{name}) but cannot "
                               f"be used: {reason} Choose another backend or unset {BACKEND_ENV_VAR} "
                               f"for automatic selection.")
        return chosen
    usable = [_REGISTRY[candidate] for candidate in _PREFERENCE
              if _REGISTRY[candidate].available() and _REGISTRY[candidate].supports(u, A)]
    for chosen in usable:  # a backend measured faster for this shape goes first (triton on long sequences)
        if chosen.preferred_for(u, A):
            return chosen
    if usable:
        return usable[0]
    raise BackendError("No selective-scan backend supports these tensors "
                       f"(device {u.device}, dtype {u.dtype}, d_state {A.shape[1]}).")


def select_backend_for(length: int, d_state: int, device, dtype: torch.dtype = torch.float32,
                       backend: Optional[str] = None) -> ScanBackend:
    """Return the backend a scan of ``length`` tokens with ``d_state`` states would get on ``device`` (what doctor
    and the trainers report); the probe is a view, nothing of that length is allocated."""
    probe = torch.zeros(1, 1, 1, device=device, dtype=dtype).expand(1, 1, max(length, 1))
    return select_backend(probe, torch.zeros(1, d_state, device=device), backend)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Raise ValueError naming the offending argument if the shapes do not fit together."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, channels, length); got shape {tuple(u.shape)}.")
    batch, channels, length = u.shape
    if length < 1:
        raise ValueError("selective_scan: the sequence is empty (length 0).")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}; got {tuple(delta.shape)}.")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"selective_scan: A must be (channels={channels}, d_state); got {tuple(A.shape)}.")
    d_state = A.shape[1]
    for name, mat in (("B", B), ("C", C)):
        if mat.dim() == 2:
            ok = tuple(mat.shape) == (channels, d_state)
            expected = f"({channels}, {d_state})"
        elif mat.dim() == 3:
            ok = tuple(mat.shape) == (batch, d_state, length)
            expected = f"({batch}, {d_state}, {length})"
        elif mat.dim() == 4:
            ok = (mat.shape[0], mat.shape[2], mat.shape[3]) == (batch, d_state, length) and \
                mat.shape[1] >= 1 and channels % mat.shape[1] == 0
            expected = f"({batch}, groups dividing {channels}, {d_state}, {length})"
        else:
            ok, expected = False, f"(channels, d_state), (batch, d_state, length) or (batch, groups, d_state, length)"
        if not ok:
            raise ValueError(f"selective_scan: {name} must be {expected}; got {tuple(mat.shape)}.")
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and tuple(vec.shape) != (channels,):
            raise ValueError(f"selective_scan: {name} must be ({channels},); got {tuple(vec.shape)}.")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}; got {tuple(z.shape)}.")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend: Optional[str] = None):
    """Return ``out`` (B, D, L) of the selective scan, or ``(out, last_state)``; mamba_ssm semantics.

    u, delta, z: (batch, channels, L). A: (channels, d_state). B, C: (channels, d_state) time-invariant,
    (batch, d_state, L) shared by all channels, or (batch, groups, d_state, L) per channel group.
    The state accumulates in fp32 (fp64 for fp64 inputs) on every backend, also under autocast.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    chosen = select_backend(u, A, backend)
    return chosen.scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                       return_last_state=return_last_state)


def describe_backends() -> List[dict]:
    """Return, per backend in preference order, whether it is available here and why not."""
    rows = []
    for name in _PREFERENCE:
        chosen = _REGISTRY[name]
        rows.append({"name": name, "description": chosen.description,
                     "available": chosen.available(), "reason": chosen.unavailable_reason()})
    return rows


register_backend(MambaSsmBackend())
# The sequence-parallel Triton kernels: after mamba_ssm until the benchmark shows them faster at the shapes
# the networks use (benchmarks/TRITON_NOTES.md), ahead of the pure-torch scan where mamba_ssm is missing.
register_backend(TritonBackend())
register_backend(TorchBackend())
