"""Layout of the per-step device scalars every backend receives.

The base optimizer computes, on the device and without a host sync, one small fp32 tensor per
device for each step; kernels read it instead of taking these values as arguments, so a skipped
step, a new grad scale or a new clip coefficient never recompiles or syncs anything.

- ``GRAD_MULT``: what every gradient element is multiplied by before the update:
  ``min(1, max_grad_norm / (N + 1e-6)) / grad_scale`` (each factor 1 when not in use).
- ``SKIP``: 1.0 when the step must change nothing (GradScaler's ``found_inf``, or a non-finite
  global norm when clipping), else 0.0.
- ``NORM``: the global gradient norm of the unscaled gradients (0 when not computed).
"""

GRAD_MULT = 0
SKIP = 1
NORM = 2
SIZE = 3
