"""Paged KV cache bookkeeping: fixed-size blocks handed to sequences as they grow, returned when
they finish or are preempted. The tensors themselves are the model's (Decoder.new_kv_cache)."""

from __future__ import annotations

from collections import deque

import torch

from expertswitch.engine.request import Request
from expertswitch.errors import ConfigError


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


_CPU_KV_BYTES = 512 * 2**20  # the most a CPU engine's KV cache takes by default


def auto_num_blocks(model, cfg, device: torch.device, expert_budget: int | None) -> int:
    """KV blocks for `cfg.kv_cache_bytes`, or by default: on a GPU, 90% of the memory the base
    left free (vLLM's gpu_memory_utilization) less the experts' budget; on CPU, room for every
    sequence at full length, at most 512 MiB."""
    per_block = model.kv_bytes_per_token() * cfg.block_size
    kv_bytes = cfg.kv_cache_bytes
    if kv_bytes is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        kv_bytes = int(free * 0.9) - (expert_budget or 0)
        if kv_bytes < per_block:
            raise ConfigError(
                f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free after the "
                f"base, {(expert_budget or 0) / 2**30:.1f} GiB kept for experts; lower "
                "device_budget_bytes or pass kv_cache_bytes"
            )
    elif kv_bytes is None:
        need = cfg.max_num_seqs * min(model.cfg.max_position_embeddings, 4096)
        kv_bytes = min(_CPU_KV_BYTES, need * model.kv_bytes_per_token())
    return max(1, kv_bytes // per_block)
