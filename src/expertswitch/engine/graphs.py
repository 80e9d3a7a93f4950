"""Decode steps replayed from CUDA graphs: one host call per step instead of one per kernel.

A decode step of a 7B model launches a few hundred small kernels (per layer: norms, q/k/v/o,
rotary, the KV write, paged attention, the MLP or MoE, each linear's delta launch); at batch 32
each runs for microseconds and the host needs about as long to launch it, so without graphs the
host sets the pace. As vLLM does, the decoder's layers are captured once per batch-size bucket
(1, 2, 4, 8, then multiples of 8) and replayed with the step's values copied into static input
buffers; a batch is padded up to its bucket.

What a graph fixes, and so what its key holds: the bucket, and the active experts in slot order
(the delta kernels' pointer tables and the experts' exact norms and biases are read by address).
Graphs live while that set of expert objects stays the runner's active set (the runner drops its
tables, and these graphs with them, when it changes), and are captured only after the set has
been steady for STEADY_STEPS decode steps, so that a churning mix of experts runs eagerly instead
of capturing graphs it never replays. Each set's graphs get a fresh memory pool (cuBLAS keeps its
workspace in the pool of the capture that made it, so an old pool may never empty), and captures
run on a stream of their own priority, which the expert pool's prefetch stream can never be.

What stays outside the graph: the embedding (an expert's table may be looked up for a few rows
only), RoPE's cos/sin (dynamic scaling reads the lengths on the host), the final norm and
lm_head (a larger vocabulary). Padding rows belong to no expert, write their key and value to a
scratch block the scheduler never hands out, and attend to that one key.

Steps that cannot be captured run eagerly: prefill and mixed steps, batches above the largest
bucket, tensor or expert parallelism (collectives), attention the Triton decode kernel does not
take (head dims that are not powers of two), and experts that replace a whole linear weight or
change a Mixtral MoE block (their rows are gathered by host-side index lists). A capture that
fails is reported once; the engine's graphs are dropped (a failed capture may free what the
others use) and its decode steps run eagerly from then on.

GRAPH_MODE "auto" captures on CUDA; "static" runs the same padded static-buffer path without
capturing (CPU tests compare it with the eager path); "off" never uses it.
"""

from __future__ import annotations

import logging

import torch

from expertswitch.models.attention import PaddedLayout, decode_kernel_takes
from expertswitch.models.context import AttentionBatch, ExpertBatch, StepContext

GRAPH_MODE = "auto"
STEADY_STEPS = 8  # decode steps with one expert set before its graphs are captured

log = logging.getLogger(__name__)


def buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, 8, then every multiple of 8 up to
    max_num_seqs (rounded up to a multiple of 8), as vLLM does."""
    out = [b for b in (1, 2, 4) if b < max_num_seqs]
    out += list(range(8, max_num_seqs + 8, 8))
    return [b for b in out if b < max_num_seqs + 8]


class _Buffers:
    """Static inputs of one bucket (the graph reads these addresses)."""

    def __init__(self, bp: int, model, max_blocks: int, device):
        long = dict(dtype=torch.long, device=device)
        h, d = model.cfg.hidden_size, model.rope.dim  # cos/sin: [T, rotary dim] (Gemma 3's
        lead = () if model.local_rope is None else (2,)  # two RoPEs: [2, T, rotary dim])
        self.x = torch.zeros(bp, h, dtype=model.dtype, device=device)
        self.cos = torch.zeros(*lead, bp, d, dtype=torch.float32, device=device)
        self.sin = torch.zeros(*lead, bp, d, dtype=torch.float32, device=device)
        self.slots = torch.zeros(bp, **long)
        self.tables = torch.zeros(bp, max_blocks, **long)
        self.kv_lens = torch.ones(bp, **long)
        self.row_slot = torch.full((bp,), -1, **long)
        self.positions = torch.zeros(bp, **long)


class _Graph:
    def __init__(self, bufs: _Buffers, eb: ExpertBatch, graph, out: torch.Tensor):
        # eb: what the capture read by address (its tables; tensors its cache made outside
        # the graph's pool) stays alive as long as the graph
        self.bufs, self.eb, self.graph, self.out = bufs, eb, graph, out


class DecodeGraphs:
    def __init__(self, model, kv_cache, scratch_block: int, block_size: int, max_blocks: int,
                 max_num_seqs: int, mode: str | None = None):  # fmt: skip
        """scratch_block: a block of `kv_cache` the scheduler never hands out (padding rows
        write there); max_blocks: the widest block table (max_model_len / block_size)."""
        self.model, self.kv_cache = model, kv_cache
        self.scratch, self.block_size, self.max_blocks = scratch_block, block_size, max_blocks
        self.buckets = buckets(max_num_seqs)
        self.mode = mode or GRAPH_MODE
        self.graphs: dict[int, _Graph] = {}  # bucket → graph, for the current expert set
        self.broken = False  # a capture failed: no more graphs for this engine
        self.stream = None  # the captures' own stream (high priority: not a pooled default)
        self.static: dict[int, _Buffers] = {}  # "static" mode: buffers per bucket
        self.steady = 0  # decode steps in a row with the current expert set
        self.pool = None
        self.captures = 0  # graphs captured (stats, tests)
        self.replays = 0  # decode steps run from a graph (or, "static", its padded path)
        self._eligible: bool | None = None  # the current expert set's eligibility

    @property
    def capturing(self) -> bool:
        return self.mode == "auto" and self.model.device.type == "cuda" and not self.broken

    @property
    def enabled(self) -> bool:
        return self.capturing or self.mode == "static"

    def stats(self) -> dict:
        return {"captured": self.captures, "replayed_steps": self.replays,
                "resident": len(self.graphs)}  # fmt: skip

    def reset(self) -> None:
        """The active expert set changed: graphs and tables of the old one are dropped."""
        self.graphs.clear()
        self.pool = None  # a fresh pool for the next set's graphs
        self.steady = 0
        self._eligible = None

    def _bucket(self, b: int) -> int | None:
        return next((bp for bp in self.buckets if bp >= b), None)

    def _experts_fit(self, experts) -> bool:
        """No expert replaces a whole weight inside the layers or changes a MoE block."""
        from expertswitch.models.moe_rows import RowMixtralMoE

        outside = {self.model.embed.name, self.model.lm_head.name, self.model.norm.name}
        moe = set()
        for layer in self.model.layers:
            if isinstance(layer.moe, RowMixtralMoE):
                moe |= layer.moe.names
        for ex in experts:
            if any(t.dim() > 1 and n not in outside for n, t in ex.exact.items()):
                return False
            if not moe.isdisjoint(ex.deltas.keys() | ex.exact.keys()):
                return False
        return True

    def usable(self, ctx: StepContext) -> bool:
        """Whether this step runs from a graph (or the static path)."""
        ab = ctx.attention
        if not self.enabled or not all(q == 1 for q in ab.q_lens):
            return False
        if self._bucket(len(ab.q_lens)) is None or ab.block_tables.shape[1] > self.max_blocks:
            return False
        if self._eligible is None:
            k = self.kv_cache[0][0]
            self._eligible = (
                getattr(self.model, "tp", None) is None
                and not self.model.parallel_moe
                and decode_kernel_takes(
                    self.model.cfg.head_dim, self.model.dtype, k.dtype, k.is_cuda
                )  # fmt: skip
                and self._experts_fit(ctx.experts.experts)
            )
        self.steady += 1
        return self._eligible and (self.mode == "static" or self.steady > STEADY_STEPS)

    def forward(self, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Final hidden states [B, H] of a decode step (`usable` said yes)."""
        ab, eb = ctx.attention, ctx.experts
        b = len(ab.q_lens)
        bp = self._bucket(b)
        if self.mode == "static":
            if bp not in self.static:
                self.static[bp] = _Buffers(bp, self.model, self.max_blocks, self.model.device)
            bufs = self.static[bp]
            self._fill(bufs, ids, ctx, b)
            sub = ExpertBatch.build(eb.experts, bufs.row_slot)  # this step's segments
            sub.tables = eb.tables
            self.replays += 1
            return self._body(bufs, sub)[:b].clone()
        g = self.graphs.get(bp)
        if g is None:
            g = self._capture(bp, ids, ctx, b)
            if g is None:
                return self.model.forward(ids, ctx, self.kv_cache)
        else:
            self._fill(g.bufs, ids, ctx, b)
        g.graph.replay()
        self.replays += 1
        return g.out[:b].clone()

    def _fill(self, bufs: _Buffers, ids, ctx: StepContext, b: int) -> None:
        ab, eb = ctx.attention, ctx.experts
        with torch.inference_mode():
            bufs.x[:b] = self.model.embed(ids, eb)
            bufs.x[b:] = 0
            bufs.positions[:b] = ab.positions
            bufs.positions[b:] = 0
            cos, sin = self.model.cos_sin(bufs.positions, _padded(ab.seq_lens, bufs, b))
            bufs.cos.copy_(cos)
            bufs.sin.copy_(sin)
            bufs.slots[:b] = ab.slot_mapping
            bufs.slots[b:] = self.scratch * self.block_size  # padding: the scratch block
            w = ab.block_tables.shape[1]
            bufs.tables[:b, :w] = ab.block_tables
            bufs.tables[:b, w:] = 0
            bufs.tables[b:] = self.scratch
            bufs.kv_lens[:b] = ab.seq_lens  # decode: one row per sequence, its length
            bufs.kv_lens[b:] = 1  # the padding row's own key
            bufs.row_slot[:b] = eb.row_slot
            bufs.row_slot[b:] = -1

    def _body(self, bufs: _Buffers, eb: ExpertBatch) -> torch.Tensor:
        """The layers on the static buffers; every index map derived on the device."""
        bp = bufs.x.shape[0]
        dev = bufs.x.device
        layout = PaddedLayout(
            q_rows=torch.arange(bp, device=dev).unsqueeze(1),
            q_valid=torch.ones(bp, 1, dtype=torch.bool, device=dev),
            blocks=bufs.tables,
            q_pos=(bufs.kv_lens - 1).unsqueeze(1),
            # (read by the torch path's masks only; graphs take the decode kernel)
            k_valid=torch.ones(bp, 1, dtype=torch.bool, device=dev),
            kv_lens=bufs.kv_lens,
            decode=True,
            lens=[],  # (read only by the torch path's one-sequence-at-a-time fallback)
        )
        ab = AttentionBatch(bufs.slots, bufs.tables, [1] * bp, [], bufs.positions, bufs.kv_lens,
                            self.block_size)  # fmt: skip
        return self.model.run_layers(bufs.x, StepContext(eb, ab), self.kv_cache, layout,
                                     bufs.cos, bufs.sin)  # fmt: skip

    def _capture(self, bp: int, ids, ctx: StepContext, b: int) -> _Graph | None:
        """Capture the layers for bucket `bp` with this step's values in the buffers (the
        warm-up runs write this step's keys and values, the same ones the replay writes)."""
        dev = self.model.device
        bufs = _Buffers(bp, self.model, self.max_blocks, dev)
        self._fill(bufs, ids, ctx, b)
        eb = ExpertBatch.build(ctx.experts.experts, bufs.row_slot)  # segments: on the host,
        eb.tables = ctx.experts.tables  # before the capture (every slot has rows in each step)
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)
        before = torch.cuda.current_stream(dev)
        try:
            with torch.cuda.device(dev):
                if self.stream is None:
                    self.stream = torch.cuda.Stream(dev, priority=-1)
                self.stream.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(self.stream):  # compiles kernels, builds the tables
                    for _ in range(2):
                        self._body(bufs, eb)
                torch.cuda.current_stream(dev).wait_stream(self.stream)
                eb.cache.clear()  # row groupings and per-row tensors: recomputed every replay
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                clear()  # cuBLAS's workspace: allocated in this capture's pool, not before
                graph = torch.cuda.CUDAGraph()
                # thread_local: the expert pool's prefetch thread may copy on its own stream
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream,
                                      capture_error_mode="thread_local"):  # fmt: skip
                    out = self._body(bufs, eb)
        except Exception as e:  # noqa: BLE001 - a missed speed-up, never a failed request
            log.warning("decode graph capture failed for %d sequences (%s: %s); decode steps "
                        "run eagerly from now on", bp, type(e).__name__, e)  # fmt: skip
            torch.cuda.set_stream(before)  # a capture that failed to begin leaves its own
            self.broken = True
            self.graphs.clear()  # what a failed capture freed may be what they read
            self.pool = None
            torch.cuda.synchronize(dev)
            return None
        self.captures += 1
        g = _Graph(bufs, eb, graph, out)
        self.graphs[bp] = g
        return g


def _padded(seq_lens: torch.Tensor, bufs: _Buffers, b: int) -> torch.Tensor:
    out = torch.ones_like(bufs.positions)
    out[:b] = seq_lens
    return out
