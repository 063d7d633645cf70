"""Reading a kernel's SASS (the GPU's own instructions, as ``cuobjdump -sass`` prints them):
its main loop and the path one full, aligned iteration of it executes.

A kernel of this library spends its time in one loop: the loop over a chunk's segments (CUDA)
or tiles (Triton), whose full, aligned iterations move every stream with 128-bit accesses. The
loop is found as the innermost natural loop (of a back edge of the control-flow graph) that
holds 128-bit global loads and, where the kernel has any, 128-bit global stores. Its *executed path* is the path from the loop's header to its back
edge that a full iteration takes: among the paths through the loop body (inner back edges
removed), those whose global accesses move ``want`` bytes when given (the family's roofline
row for this configuration: a runtime switch, as the CUDA kernels' grad dtype, has a path per
case), the one with the most 128-bit accesses (the full, aligned segment, not the scalar tail),
and of those the one with the fewest instructions (slow paths, as the IEEE division's, are the longer alternatives and so are not
taken). What the path holds is the cost of one iteration: instructions, global loads and stores
by width, shared-memory and other loads.

Nothing here runs a GPU; the text comes from a compiled library or cubin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"(?:^|[\s,])(0x[0-9a-f]+)\s*$")


@dataclass(frozen=True)
class Instr:
    addr: int
    pred: str | None  # "@P0", "@!P1", or None
    op: str  # the full mnemonic, "LDG.E.128"
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    @property
    def width(self) -> int:
        """Bytes moved per thread by a load or store (its width modifier; 4 without one)."""
        mods = self.op.split(".")[1:]
        for m, w in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
            if m in mods:
                return w
        return 4


def parse(text: str) -> list[Instr]:
    """The instructions of one function's SASS, in address order."""
    out = []
    for m in _LINE.finditer(text):
        pred = m.group(2).strip() if m.group(2) else None
        out.append(Instr(int(m.group(1), 16), pred, m.group(3), m.group(4).strip()))
    return out


def _is_branch(i: Instr) -> bool:
    return i.base in ("BRA", "BRX", "JMP", "JMX")


def _target(i: Instr) -> int | None:
    m = _TARGET.search(i.args)
    return int(m.group(1), 16) if m else None


def _ends_block(i: Instr) -> bool:
    return _is_branch(i) or i.base in ("EXIT", "RET", "BPT", "KILL")


def _unconditional(i: Instr) -> bool:
    # "@PT BRA" and "BRA" always go; "BRA P2, target" (a predicate operand) may fall through
    return (i.pred is None or i.pred == "@PT") and not re.match(r"!?U?P\d", i.args)


@dataclass
class Graph:
    instrs: list[Instr]
    starts: list[int]  # index of each block's first instruction
    succ: dict[int, list[int]]  # block -> successor blocks

    def block(self, b: int) -> list[Instr]:
        end = self.starts[b + 1] if b + 1 < len(self.starts) else len(self.instrs)
        return self.instrs[self.starts[b]:end]


def graph(instrs: list[Instr]) -> Graph:
    """Basic blocks and their edges (a call is taken as returning: its body is another path)."""
    index = {i.addr: k for k, i in enumerate(instrs)}
    leaders = {0}
    for k, i in enumerate(instrs):
        if _ends_block(i):
            if k + 1 < len(instrs):
                leaders.add(k + 1)
            t = _target(i) if _is_branch(i) else None
            if t is not None and t in index:
                leaders.add(index[t])
    starts = sorted(leaders)
    block_of = {}
    for b, s in enumerate(starts):
        end = starts[b + 1] if b + 1 < len(starts) else len(instrs)
        for k in range(s, end):
            block_of[k] = b
    succ: dict[int, list[int]] = {}
    for b, s in enumerate(starts):
        end = starts[b + 1] if b + 1 < len(starts) else len(instrs)
        last = instrs[end - 1]
        out = []
        if _is_branch(last):
            t = _target(last)
            if t is not None and t in index:
                out.append(block_of[index[t]])
            if not _unconditional(last) and end < len(instrs):
                out.append(b + 1)
        elif last.base in ("EXIT", "RET", "KILL"):
            if not _unconditional(last) and end < len(instrs):
                out.append(b + 1)
        elif end < len(instrs):
            out.append(b + 1)
        succ[b] = list(dict.fromkeys(out))
    return Graph(instrs, starts, succ)


def _natural_loop(g: Graph, header: int, latch: int) -> set[int]:
    pred: dict[int, list[int]] = {}
    for b, outs in g.succ.items():
        for c in outs:
            pred.setdefault(c, []).append(b)
    body, stack = {header, latch}, [latch]
    while stack:
        b = stack.pop()
        for p in pred.get(b, ()):
            if p not in body:
                body.add(p)
                stack.append(p)
    return body


def _global(i: Instr) -> str | None:
    """"load" / "store" for a global access, else None."""
    if i.base in ("LDG", "LD") and not i.op.startswith("LDGSTS"):
        return "load"
    if i.base in ("STG", "ST", "RED", "ATOMG"):
        return "store"
    return None


@dataclass
class Path:
    """One iteration of a loop as executed: what its instructions do, per thread."""

    instructions: int = 0
    load_bytes: int = 0  # global loads, by their widths
    store_bytes: int = 0
    loads: dict[str, int] = field(default_factory=dict)  # global loads by mnemonic
    stores: dict[str, int] = field(default_factory=dict)
    shared_loads: int = 0  # LDS
    other: dict[str, int] = field(default_factory=dict)  # instructions by base mnemonic

    @property
    def vector_loads(self) -> int:
        return sum(n for op, n in self.loads.items() if ".128" in op)

    @property
    def vector_stores(self) -> int:
        return sum(n for op, n in self.stores.items() if ".128" in op)

    @property
    def scalar_loads(self) -> int:
        """Global loads narrower than 128 bits (codebook gathers, absmaxes, tails)."""
        return sum(n for op, n in self.loads.items() if ".128" not in op)


def _predicate(i: Instr) -> tuple[str, bool] | None:
    """``(register, sense)`` of a guarded instruction (``@!P1`` -> ``("P1", False)``)."""
    if i.pred is None or i.pred == "@PT":
        return None
    return i.pred.lstrip("@!"), not i.pred.startswith("@!")


def _variants(instrs: list[Instr]) -> list[Path]:
    """A block's costs, one per assignment of the predicates that guard its 128-bit global
    accesses (``@P1 LDG.E.128`` and ``@!P1 LDG.E.128`` are the two sides of a runtime switch,
    as the CUDA kernels' grad dtype: one moves its bytes, the other does not). Every
    instruction is issued either way, so each variant counts them all."""
    regs = sorted({_predicate(i)[0] for i in instrs if _global(i) and ".128" in i.op and _predicate(i)})
    out = []
    for values in range(2 ** len(regs)):
        truth = {r: bool(values >> k & 1) for k, r in enumerate(regs)}

        def moves(i: Instr) -> bool:
            guard = _predicate(i)
            return guard is None or guard[0] not in truth or truth[guard[0]] == guard[1]

        out.append(_cost(instrs, moves))
    return out


def _cost(instrs: list[Instr], moves=lambda i: True) -> Path:
    p = Path()
    for i in instrs:
        p.instructions += 1
        kind = _global(i) if moves(i) else None
        if kind == "load":
            p.load_bytes += i.width
            p.loads[i.op] = p.loads.get(i.op, 0) + 1
        elif kind == "store":
            p.store_bytes += i.width
            p.stores[i.op] = p.stores.get(i.op, 0) + 1
        elif i.base == "LDS":
            p.shared_loads += 1
        p.other[i.base] = p.other.get(i.base, 0) + 1
    return p


def _add(a: Path, b: Path) -> Path:
    def merge(x, y):
        out = dict(x)
        for k, v in y.items():
            out[k] = out.get(k, 0) + v
        return out

    return Path(a.instructions + b.instructions, a.load_bytes + b.load_bytes, a.store_bytes + b.store_bytes,
                merge(a.loads, b.loads), merge(a.stores, b.stores), a.shared_loads + b.shared_loads,
                merge(a.other, b.other))


@dataclass
class Loop:
    header: int  # address of the loop's first instruction
    latch: int  # address of its back-edge branch
    body_instructions: int  # every instruction of the loop body (all paths)
    path: Path  # the executed path of one full iteration


def _paths(g: Graph, header: int, latch: int, body: set[int]) -> list[Path]:
    """Every distinct way (by the bytes it moves) through the loop from header to latch, inner
    back edges removed (a DAG in address order), each with its fewest instructions."""
    order = sorted(body, key=lambda b: g.starts[b])
    rank = {b: k for k, b in enumerate(order)}
    costs = {b: _variants(g.block(b)) for b in order}

    def key(p: Path) -> tuple:
        return p.vector_loads, p.vector_stores, p.load_bytes, p.store_bytes

    table: dict[int, dict[tuple, Path]] = {header: {key(v): v for v in costs[header]}}
    for b in order:
        here = table.get(b)
        if not here or b == latch:
            continue
        for c in g.succ.get(b, ()):
            if c not in body or rank[c] <= rank[b]:
                continue
            dest = table.setdefault(c, {})
            for path in here.values():
                for variant in costs[c]:
                    new = _add(path, variant)
                    k = key(new)
                    if k not in dest or new.instructions < dest[k].instructions:
                        dest[k] = new
    return list(table.get(latch, {}).values())


def straight_path(text_or_instrs, want: tuple[int, int] | None = None) -> Loop | None:
    """For a kernel whose main loop the compiler unrolled completely (a loop with constant
    bounds: a Triton chunk of ``CHUNK // BLOCK`` iterations): its executed path from the entry
    to an exit, back edges removed (the tail loop's), chosen as :func:`main_loop` chooses; one
    "iteration" is then the whole work item."""
    instrs = parse(text_or_instrs) if isinstance(text_or_instrs, str) else text_or_instrs
    if not instrs:
        return None
    g = graph(instrs)
    exits = [b for b in range(len(g.starts)) if g.block(b)[-1].base in ("EXIT", "RET")]
    body = set(range(len(g.starts)))
    best = None
    for end in exits:
        paths = _paths(g, 0, end, body)
        matching = [p for p in paths if want is not None and (16 * p.vector_loads, 16 * p.vector_stores) == tuple(want)]
        for p in matching or paths:
            key = (bool(matching), p.vector_loads + p.vector_stores, -p.instructions)
            if best is None or key > best[0]:
                best = (key, end, p)
    if best is None or best[2].vector_loads + best[2].vector_stores == 0:
        return None
    _, end, path = best
    return Loop(g.instrs[0].addr, g.block(end)[-1].addr, len(instrs), path)


def main_loop(text_or_instrs, want: tuple[int, int] | None = None) -> Loop | None:
    """The main loop of a function's SASS and its executed path (see the module doc).

    ``want``: ``(load bytes, store bytes)`` of 128-bit accesses per thread that a full
    iteration moves (the roofline row times the elements per thread per iteration). A loop and
    path that move exactly these are taken when there is one (a kernel may have a loop per case
    of a runtime switch, as the norm's per dtype); else the innermost loop's path with the most
    128-bit accesses."""
    instrs = parse(text_or_instrs) if isinstance(text_or_instrs, str) else text_or_instrs
    if not instrs:
        return None
    g = graph(instrs)
    back = [(b, c) for b, outs in g.succ.items() for c in outs if g.starts[c] <= g.starts[b]]
    loops = []
    for latch, header in back:
        body = _natural_loop(g, header, latch)
        accesses = [_global(i) for b in body for i in g.block(b) if _global(i) and ".128" in i.op]
        loops.append((("load" in accesses, "store" in accesses), -len(body), header, latch, body))
    # Innermost first among the loops with the kinds of 128-bit access any loop has (an outer
    # loop, over work items, holds the inner one and its set-up; a loop with only loads is a
    # norm's).
    loops = [x for x in loops if any(x[0])]
    if not loops:
        return None
    kinds = max(x[0] for x in loops)
    loops = sorted((x for x in loops if x[0] == kinds), key=lambda x: x[1], reverse=True)
    chosen = None
    for _, _, header, latch, body in loops:
        paths = _paths(g, header, latch, body)
        matching = [p for p in paths if want is not None and (16 * p.vector_loads, 16 * p.vector_stores) == tuple(want)]
        if matching or chosen is None:
            best = max(matching or paths, key=lambda p: (p.vector_loads + p.vector_stores, -p.instructions), default=None)
            if best is not None:
                chosen = (header, latch, body, best)
        if matching or want is None:
            break
    if chosen is None:
        return None
    header, latch, body, path = chosen
    return Loop(g.instrs[g.starts[header]].addr, g.block(latch)[-1].addr, sum(len(g.block(b)) for b in body), path)


def functions(dump: str) -> dict[tuple[str, str], str]:
    """``cuobjdump -sass`` output of a library (``arch = sm_90``) or a cubin (``code for sm_90``):
    ``(function, arch) -> its SASS``."""
    out = {}
    for block in re.split(r"\n(?=\s*(?:arch = |code for sm_))", dump):
        arch = re.search(r"(?:arch = |code for )(sm_\d+)", block)
        if not arch:
            continue
        parts = re.split(r"\n\s*Function : (\S+)\n", "\n" + block)
        for name, body in zip(parts[1::2], parts[2::2]):
            out[(name, arch.group(1))] = body
    return out
