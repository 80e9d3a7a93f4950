"""`EngineConfig`: the engine's capacity knobs (vLLM's names where they exist), validated."""

from __future__ import annotations

from dataclasses import dataclass, fields

from expertswitch.errors import ConfigError


@dataclass
class EngineConfig:
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 4096  # tokens computed in one step (a longer prompt is
    #                                     prefilled in chunks; without chunked prefill it
    #                                     runs alone)
    # the most tokens of one prompt computed in a step (vLLM's long_prefill_token_threshold;
    # None or 0: as many as the budget has left): several long prompts, or short prompts
    # arriving behind a long one, share the steps instead of waiting for it (chunked only)
    long_prefill_token_threshold: int | None = None
    block_size: int = 16  # tokens per KV-cache block
    num_kv_blocks: int | None = None  # default: from kv_cache_bytes
    kv_cache_bytes: int | None = None  # default: CPU 512 MiB at most; GPU what is free
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_active_experts: int | None = None  # distinct experts in one step (vLLM's max_loras)
    max_lora_rank: int | None = None  # LoRA adapters of a higher rank are refused (None: any)
    device_budget_bytes: int | None = None  # experts resident on the device (GPU default: a
    #                                         third of what the base leaves free)
    host_budget_bytes: int | None = None  # experts kept in (pinned) host memory
    # MoE experts spread over this many torchrun ranks (expertswitch_moe checkpoints); every
    # rank runs the same requests in lockstep and holds E / expert_parallel_size experts
    expert_parallel_size: int = 1
    # attention and dense MLP layers sliced over this many torchrun ranks (Megatron-style; any
    # checkpoint whose heads, kv heads and intermediate size it divides), in the same lockstep
    tensor_parallel_size: int = 1
    # decode steps run eagerly, never replayed from CUDA graphs (vLLM's enforce_eager)
    enforce_eager: bool = False
    # a prompt's leading blocks already computed for the same expert are reused, not
    # recomputed (engine/kv_cache.py; vLLM's enable_prefix_caching, on by default as in vLLM)
    enable_prefix_caching: bool = True
    # prompts prefilled in chunks of what a step's token budget has left, beside the running
    # requests' decode tokens (engine/scheduler.py; vLLM's enable_chunked_prefill, on by
    # default as in vLLM); off: all-prefill or all-decode steps, whole prompts
    enable_chunked_prefill: bool = True
    # on CPU, deltas of up to 4 bits also held in torch's int4 layout and computed by its int4
    # matmul: ~7× faster delta terms, rounded to bf16, for about 2.25× more bytes than 2-bit
    # codes take (4.25× for 1-bit). None: on for bf16 and fp16 engines, whose activations are
    # already rounded to 8 or 11 significant bits; off for fp32
    cpu_int4_deltas: bool | None = None
    # vLLM's scheduling_policy: "fcfs" (arrival order) or "priority" (each request's priority,
    # lower first, then arrival; those that come last are preempted first, and a waiting
    # request preempts the fewest running ones that come after it that let it in: beyond
    # vLLM v1, which only preempts for a running request's growth; engine/scheduler.py)
    scheduling_policy: str = "fcfs"

    def __post_init__(self):
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigError(f"scheduling_policy must be 'fcfs' or 'priority', got "
                              f"{self.scheduling_policy!r}")  # fmt: skip
        if self.long_prefill_token_threshold == 0:  # vLLM's "off"
            self.long_prefill_token_threshold = None
        if self.long_prefill_token_threshold is not None and not self.enable_chunked_prefill:
            raise ConfigError("long_prefill_token_threshold caps a prompt's chunks: it needs "
                              "chunked prefill; enable it or drop the threshold")  # fmt: skip
        flags = (
            "enforce_eager",
            "enable_prefix_caching",
            "enable_chunked_prefill",
            "cpu_int4_deltas",
        )
        for name in flags:
            v = getattr(self, name)
            if not isinstance(v, bool) and not (v is None and name == "cpu_int4_deltas"):
                raise ConfigError(f"{name} must be true or false, got {v!r}")
        for f in fields(self):
            if f.name in flags or f.name == "scheduling_policy":
                continue
            v = getattr(self, f.name)
            if v is None and f.default is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{f.name} must be a positive integer, got {v!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("max_model_len must leave room for a prompt and one token (≥ 2)")
        if self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}): a step must hold one token of every "
                "running request; raise it or lower max_num_seqs"
            )
