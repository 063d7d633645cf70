"""Triton's interpreter with the programs of each launch run in another order.

The interpreter (``TRITON_INTERPRET=1``) runs a launch's programs one at a time in grid order
(``GridExecutor.__call__`` loops ``for x in range(grid[0]) ... set_grid_idx(x, y, z);
fn(**args)``), so a kernel in which one program reads what another program of the same launch
writes (a race on a GPU, where programs run in any order and at once) passes every
interpreted test. :func:`program_order` remaps the program ids instead: the ``k``-th program
the interpreter runs gets the ``k``-th grid index of a permutation (reversed, or shuffled by a
seed). A kernel whose programs are independent gives the same bits in any order.

It works on the interpreter's internals (Triton 3.x): it wraps ``set_grid_dim`` and
``set_grid_idx`` of the module's ``interpreter_builder`` and ``GridExecutor.__call__``. If those
are not what it expects, or if a launch does not visit the grid the way it assumes, or if no
launch ran inside it at all, it raises :class:`ProgramOrderError`: it can fail, but never
quietly reorder nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import random
from dataclasses import dataclass

MODES = ("sequential", "reversed", "shuffled")

# What GridExecutor.__call__ must contain for the remapping to be the whole story: the grid
# dimension is set once per launch, then every index is set, x outermost, before each program.
_NEEDLES = (
    "interpreter_builder.set_grid_dim(",
    "for x in range(grid[0]):",
    "for y in range(grid[1]):",
    "for z in range(grid[2]):",
    "interpreter_builder.set_grid_idx(x, y, z)",
)


class ProgramOrderError(RuntimeError):
    """The interpreter is not what :func:`program_order` can reorder, or it reordered nothing."""


def permutation(total: int, mode: str, seed: int = 0) -> list[int]:
    """The order (flat grid indices, x outermost) in which ``mode`` runs ``total`` programs."""
    order = list(range(total))
    if mode == "reversed":
        order.reverse()
    elif mode == "shuffled":
        random.Random(seed).shuffle(order)
    elif mode != "sequential":
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    return order


def _unravel(k: int, dims: tuple[int, int, int]) -> tuple[int, int, int]:
    _, ny, nz = dims
    return k // (ny * nz), (k // nz) % ny, k % nz


def check_source(source: str) -> None:
    """Raise unless ``source`` (``GridExecutor.__call__``'s) runs the grid as assumed."""
    missing = [n for n in _NEEDLES if n not in source]
    if missing:
        raise ProgramOrderError(
            "triton.runtime.interpreter.GridExecutor.__call__ no longer runs the grid the way "
            f"tests/program_order.py assumes (missing {missing}); update the harness for this Triton"
        )


def _interpreter():
    try:
        from triton.runtime import interpreter
    except ImportError as e:  # pragma: no cover - depends on the installed triton
        raise ProgramOrderError(f"cannot import triton.runtime.interpreter: {e}") from e
    builder = getattr(interpreter, "interpreter_builder", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if executor is None or not callable(getattr(executor, "__call__", None)):
        raise ProgramOrderError("triton.runtime.interpreter has no GridExecutor")
    for name in ("set_grid_dim", "set_grid_idx"):
        if not callable(getattr(builder, name, None)):
            raise ProgramOrderError(f"triton.runtime.interpreter.interpreter_builder has no {name}")
    for name in ("set_grid_dim", "set_grid_idx"):
        if name in vars(builder):
            raise ProgramOrderError(f"interpreter_builder.{name} is already wrapped (nested program_order?)")
    check_source(inspect.getsource(executor.__call__))
    return interpreter, builder, executor


@dataclass
class Stats:
    """What happened inside one :func:`program_order`."""

    mode: str
    seed: int
    launches: int = 0  # launches that ran to the end
    programs: int = 0  # programs those launches ran
    reordered: int = 0  # of those launches, the ones whose order differed from the grid's


@contextlib.contextmanager
def program_order(mode: str, seed: int = 0, require_launch: bool = True):
    """Inside, every interpreted Triton launch runs its programs in ``mode`` order
    (``"reversed"``, ``"shuffled"`` by ``seed``, or ``"sequential"``, the interpreter's own).
    Yields a :class:`Stats`. Raises :class:`ProgramOrderError` when the interpreter's internals
    differ from what the remapping needs, when a launch visits its grid otherwise than
    assumed, and (with ``require_launch``) when no launch ran inside."""
    permutation(0, mode)  # validates the mode
    _, builder, executor = _interpreter()
    stats = Stats(mode, seed)
    original_dim = builder.set_grid_dim
    original_idx = builder.set_grid_idx
    original_call = executor.__call__
    launch: dict = {}  # the current launch: dims, order, next

    def set_grid_dim(nx, ny, nz):
        dims = (int(nx), int(ny), int(nz))
        launch.clear()
        launch.update(dims=dims, order=permutation(dims[0] * dims[1] * dims[2], mode, seed + stats.launches), next=0)
        original_dim(nx, ny, nz)

    def set_grid_idx(x, y, z):
        if not launch:
            raise ProgramOrderError("set_grid_idx called before set_grid_dim: the interpreter changed")
        k, dims, order = launch["next"], launch["dims"], launch["order"]
        if k >= len(order) or (int(x), int(y), int(z)) != _unravel(k, dims):
            raise ProgramOrderError(
                f"program {k} of a {dims} grid came as index {(x, y, z)}; tests/program_order.py assumes "
                "the interpreter visits the grid x-outermost, once each"
            )
        launch["next"] = k + 1
        original_idx(*_unravel(order[k], dims))

    def call(self, *args, **kwargs):
        launch.clear()
        result = original_call(self, *args, **kwargs)
        if not launch:
            raise ProgramOrderError("a launch ran without set_grid_dim: the interpreter changed")
        if launch["next"] != len(launch["order"]):
            raise ProgramOrderError(
                f"a launch of {len(launch['order'])} programs ran {launch['next']} through set_grid_idx"
            )
        stats.launches += 1
        stats.programs += launch["next"]
        stats.reordered += launch["order"] != sorted(launch["order"])
        launch.clear()
        return result

    builder.set_grid_dim = set_grid_dim
    builder.set_grid_idx = set_grid_idx
    executor.__call__ = call
    try:
        yield stats
    finally:
        executor.__call__ = original_call
        del builder.set_grid_dim
        del builder.set_grid_idx
    if require_launch and stats.launches == 0:
        raise ProgramOrderError(
            "no Triton launch ran in the interpreter inside program_order(): nothing was reordered "
            "(is TRITON_INTERPRET=1 set before the kernels are imported?)"
        )
