"""Replay a GPU function from a CUDA graph: one launch from the host instead of one per kernel.

At decode sizes an MoE layer's kernels each run for microseconds, and each costs the host about
as much to launch (Python dispatch plus the driver), so the host, not the GPU, sets the pace.
A graph captured once per input shape replays all of them with one call.

    layer = MoE.stacked(..., drop_tokens=False).cuda().eval()
    step = CapturedCall(layer.infer, torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16))
    out = step(x)   # x: same shape and dtype; out is overwritten by the next call

Only functions with no host synchronisation can be captured (MoE.infer, MixtralSparseMoE under
no_grad and fused_moe are; MoE.forward is not: its capacity is a host integer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CapturedCall:
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor,
                 warmup: int = 3):  # fmt: skip
        if not example.is_cuda:
            raise ValueError("CUDA graphs capture GPU work: pass a CUDA example input")
        self.fn = fn
        self.static_in = example.clone()
        side = torch.cuda.Stream(example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(warmup):  # compiles Triton kernels and settles allocator pools
                fn(self.static_in)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.static_out = fn(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_in.shape or x.dtype != self.static_in.dtype:
            raise ValueError(f"captured for {tuple(self.static_in.shape)} {self.static_in.dtype}, "
                             f"got {tuple(x.shape)} {x.dtype}: capture one per shape")  # fmt: skip
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out
