"""Paged KV cache bookkeeping: fixed-size blocks handed to sequences as they grow, returned when
they finish or are preempted. The tensors themselves are the model's (Decoder.new_kv_cache)."""

from __future__ import annotations

from collections import deque

from expertswitch.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_allocate(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= len(self.free)

    def allocate(self, req: Request, tokens: int) -> None:
        """Give `req` blocks for its first `tokens` tokens (it holds none)."""
        assert not req.blocks, "allocate: request already holds blocks"
        n = self.blocks_for(tokens)
        if n > len(self.free):
            raise RuntimeError("allocate without can_allocate")
        req.blocks = [self.free.popleft() for _ in range(n)]

    def needs_block(self, req: Request) -> bool:
        """True when the request's next token starts a new block."""
        return req.num_cached >= len(req.blocks) * self.block_size

    def append_block(self, req: Request) -> None:
        req.blocks.append(self.free.popleft())

    def release(self, req: Request) -> None:
        self.free.extend(req.blocks)
        req.blocks = []
        req.num_cached = 0

    def slot(self, req: Request, position: int) -> int:
        return (
            req.blocks[position // self.block_size] * self.block_size + position % self.block_size
        )
