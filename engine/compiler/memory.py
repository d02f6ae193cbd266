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
    parts: list[tuple[int, tuple]] = field(default_factory=list)  # (slot, shape) laid end to end, if a group

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
    flat: dict[tuple, np.ndarray] = field(default_factory=dict)  # contiguous group's slots -> its flat array

    @property
    def unplanned_bytes(self) -> int:
        """What the same buffers would take with no reuse."""
        return sum(b.nbytes * (1 if b.parts else len(b.slots)) for b in self.blocks)


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


def plan(
    instructions: Sequence[Instruction],
    buffers: dict[int, tuple[tuple, np.dtype]],
    view_of: dict[int, Sequence[int]],
    keep: Sequence[int],
    contiguous: Sequence[Sequence[int]] = (),
) -> MemoryPlan:
    """`buffers`: slot -> (shape, dtype) for values written into planned memory; `view_of`:
    slot -> the slots it may be a view of (its result may alias their memory); `keep`: slots
    read after the last instruction; `contiguous`: groups of kept slots of one dtype to lay
    end to end in one block (read as one flat array by the flat update kernels)."""

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
    group_of: dict[int, tuple] = {}
    for group in contiguous:
        group = tuple(group)
        if (
            len(set(group)) == len(group)
            and all(s in buffers and s not in group_of for s in group)
            and len({buffers[s][1] for s in group}) == 1
        ):
            size = sum(int(np.prod(buffers[s][0], dtype=np.int64)) for s in group)
            group_of.update((s, group) for s in group)
            block_of[group] = Block(
                (size,), buffers[group[0]][1], len(instructions), end, parts=[(s, buffers[s][0]) for s in group]
            )
    merged = 0
    for t, inst in enumerate(instructions):
        if inst.out not in buffers:
            continue
        if inst.out in group_of:  # the group's block is busy from its first member's write to the end
            block = block_of[group_of[inst.out]]
            block.start = min(block.start, t)
            block.slots.append(inst.out)
            continue
        shape, dtype = buffers[inst.out]
        finish = max(last_use.get(inst.out, t), t)
        for k in inst.inplace:
            source = inst.ins[k]
            block = block_of.get(source)
            if (
                block is not None
                and source not in view_of
                and block.end == t
                and (block.shape, block.dtype) == (shape, dtype)
            ):
                block.end = finish
                block.slots.append(inst.out)
                block_of[inst.out] = block
                merged += 1
                break
        else:
            block_of[inst.out] = Block(shape, dtype, t, finish, [inst.out])

    blocks = list({id(b): b for b in block_of.values() if b.slots}.values())
    size = place(blocks)
    arena = np.empty(max(size, 1), np.uint8)
    arrays: dict[int, np.ndarray] = {}
    flat: dict[tuple, np.ndarray] = {}
    for block in blocks:
        array = arena[block.offset : block.offset + block.nbytes].view(block.dtype).reshape(block.shape)
        if block.parts:
            flat[tuple(s for s, _ in block.parts)] = array
            start = 0
            for s, shape in block.parts:
                n = int(np.prod(shape, dtype=np.int64))
                arrays[s] = array[start : start + n].reshape(shape)
                start += n
            continue
        for s in block.slots:
            arrays[s] = array
    return MemoryPlan(arrays, blocks, size, merged, flat)
