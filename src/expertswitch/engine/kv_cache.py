"""Paged KV cache bookkeeping: fixed-size blocks handed to sequences as they grow, returned when
they finish or are preempted. The tensors themselves are the model's (Decoder.new_kv_cache).

Prefix caching (vLLM's automatic prefix caching, nano-vllm's block manager): a full block of
block_size tokens is registered under a hash of those tokens, the hash of the block before it
and the expert that computes it (an expert's keys and values differ from the base's for the
same tokens). A new request takes every leading block of its prompt already registered, with a
reference count, and computes only the rest. Blocks are registered when they are handed out
for tokens the step computes, so requests admitted in the same step share them too (a burst
behind one system prompt, n > 1): every layer writes the step's keys and values before any
attention reads them. A request released before its step ran (its expert failed to load or was
deferred, and with it every request that could share its blocks) unregisters the blocks it did
not compute. A freed block keeps its hash until it is handed out again: free blocks are reused
least recently freed first, blocks without a hash before them. Shared blocks are full, so
nobody writes into them; a request always computes its last token itself (it needs that
token's logits), so a prompt matches at most (len − 1) // block_size blocks. Requests that ask
for prompt logprobs compute their whole prompt (they need every position's hidden state) and
match nothing."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from expertswitch.engine.request import Request
from expertswitch.errors import ConfigError


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The hash of a full block from its tokens and the previous block's hash (sha256: the same
    on every rank, unlike Python's salted str hashes; no practical collisions)."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def root_hash(expert: str | None, salt: str | None = None) -> bytes:
    """The parent of a sequence's first block: which model computed the keys and values, and
    the request's cache salt (vLLM's cache_salt: only requests with the same salt share
    cached blocks)."""

    def field(name: bytes, text: str) -> bytes:  # length-prefixed: no two (expert, salt) alike
        data = text.encode("utf-8", "surrogatepass")  # (any str, lone surrogates included)
        return name + len(data).to_bytes(8, "little") + data

    tag = b"base" if expert is None else field(b"expert", expert)
    if salt is not None:
        tag += field(b"salt", salt)
    return hashlib.sha256(tag).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        # free blocks in the order they are handed out (an ordered set: a cached block leaves
        # it from the middle when a request takes it back)
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.refs = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash → block holding those keys and values
        self.hash_of: dict[int, tuple[bytes, str | None]] = {}  # block → (hash, expert)
        self.queries = 0  # prompt tokens looked up (prefix caching), as vLLM counts them
        self.hits = 0  # of those, tokens found in the cache

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # prefix lookup -----------------------------------------------------------------------

    def _hashes(self, req: Request, n_blocks: int) -> list[bytes]:
        """The hashes of the request's first n_blocks full blocks (kept on the request: its
        tokens only grow)."""
        hs, bs = req.block_hashes, self.block_size
        toks = req.all_token_ids if len(hs) < n_blocks else None
        while len(hs) < n_blocks:
            parent = hs[-1] if hs else root_hash(req.expert, req.cache_salt)
            i = len(hs)
            hs.append(block_hash(parent, toks[i * bs : (i + 1) * bs]))
        return hs[:n_blocks]

    def match(self, req: Request) -> list[int]:
        """The cached blocks that hold the request's leading tokens (none once it has
        blocks, or when it wants prompt logprobs)."""
        if not self.prefix_caching or req.blocks or req.sampling.prompt_logprobs is not None:
            return []
        hits = []
        for h in self._hashes(req, (req.num_tokens - 1) // self.block_size):
            b = self.cached.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def can_allocate(self, tokens: int, hits: list[int] = ()) -> bool:
        """Whether `tokens` tokens fit when the first len(hits) blocks are the cached `hits`
        (a free one among them leaves the free list too)."""
        revived = sum(1 for b in hits if not self.refs[b])
        return self.blocks_for(tokens) - len(hits) + revived <= len(self.free)

    def allocate(self, req: Request, tokens: int, hits: list[int] = (),
                 computing: int | None = None) -> None:  # fmt: skip
        """Give `req` blocks for its first `tokens` tokens (it holds none): the cached `hits`
        (from match) first, its keys and values already computed, then fresh blocks.
        computing: how many tokens after the hits its step computes (default: all; a chunk of
        a prompt: the blocks of later chunks are registered when those run)."""
        assert not req.blocks, "allocate: request already holds blocks"
        if not self.can_allocate(tokens, hits):
            raise RuntimeError("allocate without can_allocate")
        for b in hits:
            if not self.refs[b]:
                del self.free[b]
            self.refs[b] += 1
        req.blocks = list(hits)
        req.blocks += [self._take() for _ in range(self.blocks_for(tokens) - len(hits))]
        req.num_cached = len(hits) * self.block_size
        req.num_registered = len(hits)
        end = tokens if computing is None else req.num_cached + computing
        self._register(req, end // self.block_size)  # full once this step has run
        # counted once its step has run (register): a request deferred with its expert and
        # admitted again step after step must not inflate the counts
        looked_up = self.prefix_caching and req.sampling.prompt_logprobs is None
        req.lookup = (tokens, req.num_cached) if looked_up else (0, 0)

    def _take(self) -> int:
        """A free block for new keys and values; one that kept a hash loses it now."""
        b, _ = self.free.popitem(last=False)
        self.refs[b] = 1
        self._forget(b)
        return b

    def _forget(self, b: int) -> None:
        entry = self.hash_of.pop(b, None)
        if entry is not None:
            del self.cached[entry[0]]

    def register(self, req: Request) -> None:
        """After a forward pass: register the request's blocks that decoding has filled; after
        its prefill, count its prompt lookup."""
        if req.lookup is not None:
            (tokens, hit), req.lookup = req.lookup, None
            self.queries += tokens
            self.hits += hit
            if req.num_cached_tokens is None:  # its first admission (not a recompute)
                req.num_cached_tokens = hit
        self._register(req, req.num_cached // self.block_size)

    def _register(self, req: Request, full: int) -> None:
        """Register the request's first `full` blocks (a block already cached elsewhere under
        the same hash stays private)."""
        if not self.prefix_caching or req.num_registered >= full:
            return
        hs = self._hashes(req, full)
        for i in range(req.num_registered, full):
            b = req.blocks[i]
            if hs[i] not in self.cached and b not in self.hash_of:
                self.cached[hs[i]] = b
                self.hash_of[b] = (hs[i], req.expert)
        req.num_registered = full

    # growth and release ------------------------------------------------------------------

    def needs_block(self, req: Request) -> bool:
        """True when the request's next token starts a new block."""
        return req.num_cached >= len(req.blocks) * self.block_size

    def append_block(self, req: Request) -> None:
        req.blocks.append(self._take())

    def release(self, req: Request) -> None:
        """Return the request's blocks: shared ones lose a reference; the last reference puts
        a block on the free list, last block first (a prompt's tail is evicted before its head,
        which more requests share), and a block without a hash at the front (reused before
        any cached one is evicted). Blocks registered for tokens not yet computed (released
        before its step ran) lose their hashes."""
        self.forget_uncomputed(req)
        for b in reversed(req.blocks):
            self.refs[b] -= 1
            if not self.refs[b]:
                self.free[b] = None
                if b not in self.hash_of:
                    self.free.move_to_end(b, last=False)
        req.blocks = []
        req.num_cached = 0
        req.num_registered = 0
        req.lookup = None

    def forget_expert(self, expert: str) -> None:
        """Drop the cached blocks an expert computed (it is being removed: a new archive under
        its name must not hit them). Its requests are gone, so none of them is in use."""
        self._drop([b for b, (_, e) in self.hash_of.items() if e == expert])

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks in use keep their contents; vLLM's
        /reset_prefix_cache)."""
        self._drop(list(self.hash_of))

    def forget_uncomputed(self, req: Request) -> None:
        """The step that would have computed the request's scheduled tokens did not run (an
        exception in the forward pass): the blocks registered for them hold no keys yet."""
        bs = self.block_size
        self._drop([b for b in req.blocks[req.num_cached // bs : req.num_registered]
                    if b in self.hash_of])  # fmt: skip
        req.num_registered = min(req.num_registered, req.num_cached // bs)

    def _drop(self, blocks: list[int]) -> None:
        """Unregister blocks; free ones among them go to the front of the free list, reused
        before any block that still holds a hash."""
        for b in blocks:
            self._forget(b)
            if b in self.free:
                self.free.move_to_end(b, last=False)

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
