"""The memory plan: every value a step computes gets a place in one arena, fixed once per
input shape, so steady-state steps allocate nothing (TFLite's arena planner, MegEngine's
static memory plan).

Liveness: a buffer is busy from the instruction that writes it to the last instruction that
reads it or a view of it (outputs and update values stay busy to the end of the step).
Buffers whose lifetimes do not overlap share bytes; placement is greedy by size, largest
first, each at the lowest offset free for its whole lifetime. In-place candidates (from the
inplace pass) whose input dies at that very instruction take over the input's block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

ALIGN = 64  # bytes; keeps every buffer SIMD- and cache-line aligned


@dataclass
class Instruction:
    ins: Sequence[int]  # slots read
    out: int  # slot written
    inplace: Sequence[int] = ()  # positions in `ins` the output may overwrite


@dataclass
class Block:
    shape: tuple
    dtype: np.dtype
    start: int
    end: int
    slots: list[int] = field(default_factory=list)
    offset: int = -1

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def overlaps(self, other: Block) -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass
class MemoryPlan:
    arrays: dict[int, np.ndarray]  # slot -> its planned buffer (slots sharing a block share the array)
    blocks: list[Block]
    arena_bytes: int
    inplace: int  # outputs that took over an input's buffer

    @property
    def unplanned_bytes(self) -> int:
        """What the same buffers would take with no reuse."""
        return sum(b.nbytes * len(b.slots) for b in self.blocks)


def place(blocks: list[Block]) -> int:
    """Give each block an offset; returns the arena size. Greedy by size, lowest free offset."""
    placed: list[Block] = []
    total = 0
    for block in sorted(blocks, key=lambda b: (-b.nbytes, b.start)):
        busy = sorted((b.offset, b.offset + b.nbytes) for b in placed if b.overlaps(block))
        offset = 0
        for lo, hi in busy:
            if offset + block.nbytes <= lo:
                break
            offset = max(offset, -(-hi // ALIGN) * ALIGN)
        block.offset = offset
        total = max(total, offset + block.nbytes)
        placed.append(block)
    return total


def plan(instructions: Sequence[Instruction], buffers: dict[int, tuple[tuple, np.dtype]],
         view_of: dict[int, Sequence[int]], keep: Sequence[int]) -> MemoryPlan:
    """`buffers`: slot -> (shape, dtype) for values written into planned memory; `view_of`:
    slot -> the slots it may be a view of (its result may alias their memory); `keep`: slots
    read after the last instruction."""

    def roots(slot: int) -> set[int]:
        found, stack = set(), [slot]
        while stack:
            s = stack.pop()
            if s in view_of:
                stack.extend(view_of[s])
            else:
                found.add(s)
        return found

    end = len(instructions)
    last_use: dict[int, int] = {}
    for t, inst in enumerate(instructions):
        for s in inst.ins:
            for r in roots(s):
                last_use[r] = t
    for s in keep:
        for r in roots(s):
            last_use[r] = end

    block_of: dict[int, Block] = {}
    merged = 0
    for t, inst in enumerate(instructions):
        if inst.out not in buffers:
            continue
        shape, dtype = buffers[inst.out]
        finish = max(last_use.get(inst.out, t), t)
        for k in inst.inplace:
            source = inst.ins[k]
            block = block_of.get(source)
            if block is not None and source not in view_of and block.end == t and \
                    (block.shape, block.dtype) == (shape, dtype):
                block.end = finish
                block.slots.append(inst.out)
                block_of[inst.out] = block
                merged += 1
                break
        else:
            block_of[inst.out] = Block(shape, dtype, t, finish, [inst.out])

    blocks = list({id(b): b for b in block_of.values()}.values())
    size = place(blocks)
    arena = np.empty(max(size, 1), np.uint8)
    arrays: dict[int, np.ndarray] = {}
    for block in blocks:
        array = arena[block.offset:block.offset + block.nbytes].view(block.dtype).reshape(block.shape)
        for s in block.slots:
            arrays[s] = array
    return MemoryPlan(arrays, blocks, size, merged)
