"""fusedopt: fused multi-tensor optimizer kernels for PyTorch.

Drop-in optimizers whose whole step (unscale, global-norm clip, non-finite skip, update) runs
in one or two kernel launches per param group, with 32-bit or block-wise 8-bit states::

    import fusedopt
    opt = fusedopt.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, max_grad_norm=1.0)

Backends: ``triton`` and ``cuda`` on GPUs, ``reference`` (torch ops; the specification) on CPU.
"""

from .adagrad import Adagrad, Adagrad8bit
from .adam import Adam, Adam8bit, AdamW, AdamW8bit
from .clip import clip_grad_norm_
from .lamb import LAMB, LAMB8bit
from .lars import LARS, LARS8bit
from .lion import Lion, Lion8bit
from .optimizer import FusedOptimizer
from .rmsprop import RMSprop, RMSprop8bit
from .sgd import SGD, SGD8bit

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AdamW",
    "LAMB",
    "Lion",
    "SGD",
    "Adagrad",
    "RMSprop",
    "LARS",
    "Adam8bit",
    "AdamW8bit",
    "Lion8bit",
    "LAMB8bit",
    "SGD8bit",
    "Adagrad8bit",
    "RMSprop8bit",
    "LARS8bit",
    "clip_grad_norm_",
    "FusedOptimizer",
    "__version__",
]
