"""The control-flow graph of SASS text (``nvdisasm -c``) and its loops, for
:mod:`.compile_check`.

Reading loops as "a label with a later branch back to it" breaks on Hopper's mbarrier code:
ptxas places the slow path of each ``SYNCS.PHASECHK...TRYWAIT`` (a spin loop) after the
kernel's ``EXIT`` and ends it with a branch back into the main loop, so that span covers
the whole epilogue. Here the SASS is cut into basic blocks (a block ends at a branch, an
``EXIT`` / ``RET``, or before a labelled instruction), joined by their branch targets and
fall-throughs (a predicated branch or ``EXIT`` has both), and a loop is the natural loop of
a back edge (its target dominates its source) among the blocks reachable from the entry:
the retry stubs then belong to the loop they serve, the epilogue does not, and code that
nothing reaches (the trap ptxas appends after the last ``EXIT``) is no loop. A subroutine
reached by ``CALL`` is an entry of its own (its loops count; the call does not make one).
A cycle with no dominating header (irreducible; ptxas does not emit one for these kernels)
is read as its strongly connected component.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s*(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^([^\s/][^\s]*):\s*$")
_PRED = re.compile(r"^@(!?U?P[0-9T])\s+")
_TARGET = re.compile(r"`\(([^)]+)\)")
_PRED_OPERAND = re.compile(r"(!?U?P[0-9T])\s*,")


@dataclass
class Instr:
    """One SASS instruction: its line, opcode (with modifiers, no predicate) and guard."""

    line: str
    op: str
    guard: str  # "" (always), "PT", "!P0", "UP1", ...
    target: str = ""  # the label a branch or call names
    operand_predicate: str = ""  # BRA's own condition: "P2" in "BRA P2, `(.L_x_0)"

    @property
    def conditional(self) -> bool:
        return self.guard not in ("", "PT") or self.operand_predicate not in ("", "PT")


@dataclass
class Cfg:
    """Basic blocks (instruction index ranges), their successors, and the entry blocks (the
    kernel's first, and each subroutine a ``CALL`` names)."""

    instrs: list
    blocks: list = field(default_factory=list)  # (first, last) instruction index, inclusive
    succ: list = field(default_factory=list)
    entries: list = field(default_factory=list)


def parse(sass: str) -> tuple[list, dict]:
    """Instructions in address order and ``label -> index of the instruction it names``."""
    instrs, labels, pending = [], {}, []
    for line in sass.splitlines():
        if m := _LABEL.match(line):
            pending.append(m.group(1))
            continue
        if not (m := _INSTR.match(line)):
            continue
        text = m.group(2)
        guard = ""
        if g := _PRED.match(text):
            guard, text = g.group(1), text[g.end():]
        t = _TARGET.search(text)
        op, _, operands = text.partition(" ")
        p = _PRED_OPERAND.match(operands.strip()) if op.startswith(("BRA", "JMP")) else None
        instrs.append(Instr(line, op, guard, t.group(1) if t else "", p.group(1) if p else ""))
        for name in pending:
            labels[name] = len(instrs) - 1
        pending = []
    return instrs, labels


def _kind(ins: Instr) -> str:
    """``branch`` (a label target), ``indirect`` (BRX / JMX), ``end`` (EXIT / RET / trap),
    ``call`` or ``plain``."""
    base = ins.op.split(".")[0]
    if base in ("BRA", "JMP") and ins.target:
        return "branch"
    if base in ("BRX", "JMX"):
        return "indirect"
    if base in ("EXIT", "RET", "KILL") or ins.op.startswith("BPT.TRAP"):
        return "end"
    if base == "CALL":
        return "call"
    return "plain"


def build(sass: str) -> Cfg:
    """The control-flow graph of ``sass`` (see the module docstring)."""
    instrs, labels = parse(sass)
    cfg = Cfg(instrs)
    if not instrs:
        return cfg
    leaders = {0} | set(labels.values())
    leaders |= {i + 1 for i, ins in enumerate(instrs) if _kind(ins) not in ("plain", "call")}
    starts = sorted(s for s in leaders if s < len(instrs))
    cfg.blocks = [(s, e - 1) for s, e in zip(starts, starts[1:] + [len(instrs)])]
    block_of = {s: b for b, (s, _) in enumerate(cfg.blocks)}
    labelled = sorted({block_of[i] for i in labels.values()})
    entries = [0]
    for b, (_, last) in enumerate(cfg.blocks):
        ins, nxt = instrs[last], (b + 1 if b + 1 < len(cfg.blocks) else None)
        kind, out = _kind(ins), []
        if kind == "branch" and ins.target in labels:
            out.append(block_of[labels[ins.target]])
        elif kind == "branch" or kind == "indirect":
            # NOTE: a target we cannot resolve could be any labelled block: assume all.
            out += labelled
        if nxt is not None and (kind in ("plain", "call") or ins.conditional
                                or ins.op.startswith("BRA.DIV")):
            out.append(nxt)
        cfg.succ.append(sorted(set(out)))
        for i in range(cfg.blocks[b][0], last + 1):  # a callee is an entry of its own
            if _kind(instrs[i]) == "call" and instrs[i].target in labels:
                entries.append(block_of[labels[instrs[i].target]])
    cfg.entries = list(dict.fromkeys(entries))
    return cfg


def _postorder(succ: list, roots: list) -> list:
    seen, order = set(), []
    for root in roots:
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(succ[root]))]
        while stack:
            node, it = stack[-1]
            child = next((c for c in it if c not in seen), None)
            if child is None:
                order.append(node)
                stack.pop()
            else:
                seen.add(child)
                stack.append((child, iter(succ[child])))
    return order


def _dominators(succ: list, roots: list, rpo: list) -> dict:
    """Immediate dominators (Cooper, Harvey and Kennedy's iteration) under a virtual root
    ``-1`` that precedes every entry."""
    index = {b: i for i, b in enumerate(rpo)}
    preds: dict = {b: [] for b in rpo}
    for b in rpo:
        for s in succ[b]:
            preds[s].append(b)
    for r in roots:
        preds[r].append(-1)
    idom, index[-1] = {-1: -1}, -1

    def meet(a, b):
        while a != b:
            while index[a] > index[b]:
                a = idom[a]
            while index[b] > index[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for b in rpo:
            done = [p for p in preds[b] if p in idom]
            new = done[0]
            for p in done[1:]:
                new = meet(p, new)
            if idom.get(b) != new:
                idom[b], changed = new, True
    return idom


def _dominates(idom: dict, a: int, b: int) -> bool:
    while b != -1:
        if b == a:
            return True
        b = idom[b]
    return False


def _reaching(succ: list, nodes: list, target: int, stop: int) -> set:
    """Nodes (of ``nodes``) from which ``target`` is reached without passing ``stop``."""
    preds: dict = {}
    for b in nodes:
        for s in succ[b]:
            preds.setdefault(s, []).append(b)
    body, todo = {stop, target}, ([target] if target != stop else [])
    while todo:
        for p in preds.get(todo.pop(), []):
            if p not in body:
                body.add(p)
                todo.append(p)
    return body


def loops(sass: str) -> list[list[str]]:
    """The SASS lines of each loop reachable from the entry: one natural loop per header (the
    union over its back edges), an irreducible cycle as its strongly connected component;
    in address order, inner loops listed on their own as well as inside their outer loop."""
    cfg = build(sass)
    if not cfg.blocks:
        return []
    post = _postorder(cfg.succ, cfg.entries)
    rpo = post[::-1]
    reach, index = set(rpo), {b: i for i, b in enumerate(rpo)}
    idom = _dominators(cfg.succ, cfg.entries, rpo)
    bodies: dict = {}
    for b in rpo:
        for s in cfg.succ[b]:
            if index[s] > index[b]:
                continue  # not a retreating edge
            if _dominates(idom, s, b):  # a back edge: s heads a natural loop
                bodies.setdefault(s, set()).update(_reaching(cfg.succ, rpo, b, s))
            else:  # irreducible: the cycle through b and s, both ways
                both = _reaching(cfg.succ, rpo, b, -2) & _forward(cfg.succ, s)
                bodies.setdefault(("scc", s), set()).update(both | {b, s})
    spans = sorted(sorted(i for blk in body & reach
                          for i in range(cfg.blocks[blk][0], cfg.blocks[blk][1] + 1))
                   for body in bodies.values())
    return [[cfg.instrs[i].line for i in idx] for idx in spans]


def _forward(succ: list, start: int) -> set:
    seen, todo = {start}, [start]
    while todo:
        for s in succ[todo.pop()]:
            if s not in seen:
                seen.add(s)
                todo.append(s)
    return seen
