"""Input checks shared by every public entry point.

Every function raises a ``ValueError``/``TypeError`` whose message names the offending argument, so
that bad input is refused before any file is touched.
"""
from __future__ import annotations

from typing import Any

import numpy as np

try:  # openmm.unit is optional at this level: plain arrays are taken to be in nm already
    from openmm import unit as _unit
except ImportError:  # pragma: no cover
    _unit = None


def strip_unit(value: Any, target_unit: Any) -> Any:
    """Return ``value`` in ``target_unit`` if it is an OpenMM Quantity, else unchanged."""
    if _unit is not None and isinstance(value, _unit.Quantity):
        return value.value_in_unit(target_unit)
    return value


def as_coordinates(
    value: Any,
    n_atoms: int | None = None,
    *,
    name: str = "positions",
    allow_batch: bool = True,
    dtype: Any = np.float64,
) -> np.ndarray:
    """Convert coordinates to a float array of shape ``(n, 3)`` or ``(n_frames, n, 3)``.

    Parameters
    ----------
    value
        Array-like or OpenMM ``Quantity`` (converted to nm; plain arrays are taken to be in nm).
    n_atoms
        Expected number of particles; a mismatch is an error.
    name
        Argument name used in error messages.
    allow_batch
        Accept a leading frame axis.
    """
    if _unit is not None:
        value = strip_unit(value, _unit.nanometer)
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a numeric array of shape (n, 3); got {type(value).__name__}") from exc
    ok_ndim = (2, 3) if allow_batch else (2,)
    if arr.ndim not in ok_ndim or arr.shape[-1] != 3:
        want = "(n, 3) or (n_frames, n, 3)" if allow_batch else "(n, 3)"
        raise ValueError(f"{name} must have shape {want}; got shape {arr.shape}")
    if n_atoms is not None and arr.shape[-2] != n_atoms:
        raise ValueError(f"{name} has {arr.shape[-2]} particles but {n_atoms} were expected")
    check_finite(arr, name=name)
    return arr


def check_finite(arr: np.ndarray, *, name: str) -> None:
    """Raise ``ValueError`` naming the first frame/particle that is NaN or infinite."""
    finite = np.isfinite(arr)
    if finite.all():
        return
    bad = np.argwhere(~finite)[0]
    where = ", ".join(str(int(i)) for i in bad[:-1])
    raise ValueError(f"{name} contains NaN or infinite values (first at index [{where}])")


def as_box_vectors(value: Any, *, name: str = "box_vectors", allow_batch: bool = True) -> np.ndarray:
    """Convert box vectors (nm) to an array of shape ``(3, 3)`` or ``(n_frames, 3, 3)`` (rows = a, b, c)."""
    if _unit is not None:
        if isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[0], _unit.Quantity):
            value = [strip_unit(v, _unit.nanometer) for v in value]
        value = strip_unit(value, _unit.nanometer)
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape[-2:] != (3, 3) or arr.ndim not in ((2, 3) if allow_batch else (2,)):
        raise ValueError(f"{name} must have shape (3, 3) or (n_frames, 3, 3); got {arr.shape}")
    check_finite(arr, name=name)
    return arr
