"""Weights are checked before they are written: a diverged run must not publish a model."""

from __future__ import annotations

import torch

from ..errors import NonFiniteError


def require_finite_weights(state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write weights with NaN/inf in them."""
    bad = [name for name, t in state_dict.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(f"{what}: refusing to save non-finite weights ({shown}); the run diverged "
                             "(lower the learning rate and rerun)")
