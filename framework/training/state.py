"""Train state: params, optimizer state, step and RNG in one pytree (what a checkpoint holds)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the config: the data position is `step` (batch i = step i)."""

    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpoint friendly)
    nonfinite_steps: jax.Array  # int32: updates skipped because loss or grads were not finite
    first_nonfinite: jax.Array  # int32: first step with a non-finite loss or grad, -1 if none
