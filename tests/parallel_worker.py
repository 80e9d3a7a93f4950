"""Run under torchrun by tests/test_parallel.py (gloo, CPU): each scenario checks expert
parallelism against a single-process oracle built on every rank from the same seed, and rank 0
writes what it found to $PARALLEL_OUT (JSON) — the test asserts on it.

    torchrun --nproc-per-node 2 tests/parallel_worker.py layer OUT.json
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from expertswitch.moe import MoE
from expertswitch.parallel import allreduce_gradients, expert_groups

H, F = 12, 20


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def grad(p: torch.Tensor) -> torch.Tensor:
    """The gradient, zeros when nothing reached the parameter (an expert without tokens)."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


def expert_module():
    return nn.Sequential(nn.Linear(H, F), nn.GELU(), nn.Linear(F, H))


def build(num_experts, ep_size, stacked, k, seed=0, **kw):
    torch.manual_seed(seed)
    if stacked:
        return MoE.stacked(H, F, num_experts, k=k, activation="gelu", bias=True,
                           ep_size=ep_size, **kw)  # fmt: skip
    return MoE(H, expert_module(), num_experts, ep_size=ep_size, k=k, **kw)


def copy_from_full(ep_layer: MoE, full: MoE) -> None:
    """The EP layer's weights: the full layer's gate (and residual), and its own experts."""
    lo, n = ep_layer.first_local_expert, ep_layer.num_local_experts
    own = {}
    for key, value in full.state_dict().items():
        if key.startswith("experts.experts."):  # module experts: experts.experts.{g}.…
            g = int(key.split(".")[2])
            if lo <= g < lo + n:
                own["experts.experts." + str(g - lo) + key[len(f"experts.experts.{g}") :]] = value
        elif key.startswith("experts."):  # stacked: [E, …] → this rank's rows
            own[key] = value[lo : lo + n]
        else:
            own[key] = value
    ep_layer.load_state_dict(own)


def randomize(layer: MoE, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)


def batches(world: int, empty_rank: int | None = None) -> list[torch.Tensor]:
    """Each rank's tokens: different sizes, one rank possibly with none."""
    sizes = [0 if r == empty_rank else 5 + 3 * r for r in range(world)]
    return [torch.randn(n, H, generator=torch.Generator().manual_seed(100 + r))
            for r, n in enumerate(sizes)]  # fmt: skip


def check_layer(world, rank, ep_size, stacked, k, empty_rank=None, one_expert=False,
                **kw) -> dict:  # fmt: skip
    """EP forward/backward of one layer vs the full layer, one process, on every rank's batch
    (each gated as its rank gates it: capacity and aux loss are per rank). one_expert: a zero
    gate (all logits tie) sends every token to the first experts, so other ranks get no rows."""
    e = 8
    kw.setdefault("top2_2nd_expert_sampling", False)  # random: the oracle draws differently
    full = build(e, 1, stacked, k, **kw)
    randomize(full, 1)
    if one_expert:
        with torch.no_grad():
            full.gate.wg.weight.zero_()
    layer = build(e, ep_size, stacked, k, **kw)
    copy_from_full(layer, full)
    layer.train()
    full.train()
    parts = [t.clone().requires_grad_() for t in batches(world, empty_rank)]
    x = parts[rank].detach().clone().requires_grad_()
    out, aux, _ = layer(x)
    (out.square().sum() + aux).backward()
    allreduce_gradients(layer)  # → gradients of the mean of the ranks' losses
    results = [full(p) for p in parts]
    sum(o.square().sum() + a for o, a, _ in results).backward()
    lo, n = layer.first_local_expert, layer.num_local_experts
    errs = {"gate_grad": rel(grad(layer.gate.wg.weight), grad(full.gate.wg.weight) / world)}
    if x.shape[0]:
        errs["out"] = rel(out.detach(), results[rank][0].detach())
        errs["x_grad"] = rel(x.grad, parts[rank].grad)
    if stacked:
        errs["expert_grad"] = rel(grad(layer.experts.w_in),
                                  grad(full.experts.w_in)[lo : lo + n] / world)  # fmt: skip
    else:
        errs["expert_grad"] = max(
            rel(grad(layer.experts.experts[i][0].weight),
                grad(full.experts.experts[lo + i][0].weight) / world)
            for i in range(n)
        )  # fmt: skip
    return errs


def scenario_layer(world, rank) -> dict:
    found = {}
    for ep in sorted({2, world}):
        for stacked in (False, True):
            for k in (1, 2):
                name = f"ep{ep} {'stacked' if stacked else 'modules'} k{k}"
                found[name] = check_layer(world, rank, ep, stacked, k, drop_tokens=False)
    found["ep2 dropping k2"] = check_layer(world, rank, 2, False, 2, capacity_factor=0.5,
                                           min_capacity=1, use_rts=False,
                                           top2_2nd_expert_sampling=False)  # fmt: skip
    found["ep2 residual k1"] = check_layer(world, rank, 2, True, 1, drop_tokens=False,
                                           use_residual=True)  # fmt: skip
    found["rank without tokens"] = check_layer(world, rank, world, True, 2, empty_rank=world - 1,
                                               drop_tokens=False)  # fmt: skip
    found["ep2 padded dropping k2"] = check_layer(world, rank, 2, True, 2, capacity_factor=0.5,
                                                  min_capacity=1, use_rts=False,
                                                  padded_all_to_all=True)  # fmt: skip
    found[f"ep{world} padded dropless k1"] = check_layer(world, rank, world, False, 1,
                                                        empty_rank=0, drop_tokens=False,
                                                        padded_all_to_all=True)  # fmt: skip
    for hier in (False, True) if world >= 4 else (False,):
        name = f"ep{world} stacked, other ranks get no rows" + (" hierarchical" if hier else "")
        found[name] = check_layer(world, rank, world, True, 1, one_expert=True,
                                  drop_tokens=False, hierarchical_all_to_all=hier,
                                  ranks_per_node=2 if hier else None)  # fmt: skip
    if world >= 4:  # two "nodes" of world/2 ranks, and one rank per "node"
        for ppn in (world // 2, 1):
            for stacked in (False, True):
                name = f"ep{world} hierarchical ranks_per_node={ppn} {stacked=}"
                found[name] = check_layer(world, rank, world, stacked, 2, empty_rank=1,
                                          drop_tokens=False, hierarchical_all_to_all=True,
                                          ranks_per_node=ppn)  # fmt: skip
    return found


def scenario_deepspeed(world, rank) -> dict:
    """DeepSpeed's MoE(ep_size=2) on the same weights, with its defaults (RTS, second-expert
    sampling), in training, from the same seed on both: same outputs, aux loss, counts and
    input gradients on every rank."""
    import deepspeed
    from deepspeed.moe.layer import MoE as DSMoE

    from expertswitch.moe import convert_deepspeed_state_dict

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    found = {}
    for k, kw in ((1, {"capacity_factor": 0.7}), (2, {"capacity_factor": 0.6}),
                  (1, {"drop_tokens": False})):  # fmt: skip
        e = 8
        full = build(e, 1, False, k, min_capacity=1, **kw)
        randomize(full, 3)
        ours = build(e, 2, False, k, min_capacity=1, **kw)
        copy_from_full(ours, full)
        torch.manual_seed(0)
        ds = DSMoE(H, expert_module(), e, ep_size=2, k=k, min_capacity=1, **kw)
        ds.set_deepspeed_parallelism()
        ds.load_state_dict({key.replace("experts.experts.", "deepspeed_moe.experts.deepspeed_"
                                        "experts.").replace("gate.wg.", "deepspeed_moe.gate.wg."):
                            v for key, v in ours.state_dict().items()})  # fmt: skip
        assert convert_deepspeed_state_dict(ds.state_dict()).keys() == ours.state_dict().keys()
        ds.train()
        ours.train()
        # DeepSpeed's capacity-padded all-to-all needs the same token count on every rank
        x = torch.randn(12, H, generator=torch.Generator().manual_seed(200 + rank))
        xs = [x.clone().requires_grad_() for _ in range(2)]
        torch.manual_seed(10 + rank)
        out_ds, aux_ds, counts_ds = ds(xs[0])
        torch.manual_seed(10 + rank)
        out, aux, counts = ours(xs[1])
        (out_ds.square().sum() + aux_ds).backward()
        (out.square().sum() + aux).backward()
        ds_expert = ds.deepspeed_moe.experts.deepspeed_experts[0][0].weight
        found[f"k{k} {kw}"] = {
            "gate_grad": rel(grad(ours.gate.wg.weight), grad(ds.deepspeed_moe.gate.wg.weight)),
            "expert_grad": rel(grad(ours.experts.experts[0][0].weight), grad(ds_expert)),
            "out": rel(out.detach(), out_ds.detach()),
            "aux": rel(aux.detach(), aux_ds.detach()),
            "counts_equal": float(torch.equal(counts, counts_ds)),
            "x_grad": rel(xs[1].grad, xs[0].grad),
        }
    return found


class TinyPRMoE(nn.Module):
    """A small PR-MoE: dense, MoE of 4 Residual experts, dense, MoE of 8 (more experts later,
    as Pyramid-MoE has it), each MoE layer at its own ep size on one world."""

    def __init__(self, ep_small: int, ep_big: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(H, H)
        self.moe1 = MoE(H, expert_module(), 4, ep_size=ep_small, k=1, use_residual=True,
                        drop_tokens=False)  # fmt: skip
        self.mid = nn.Linear(H, H)
        self.moe2 = MoE.stacked(H, F, 8, k=2, activation="gelu", use_residual=True,
                                ep_size=ep_big, drop_tokens=False,
                                top2_2nd_expert_sampling=False)  # fmt: skip

    def forward(self, x):
        h, aux1, _ = self.moe1(torch.relu(self.inp(x)))
        h, aux2, _ = self.moe2(torch.relu(self.mid(h)))
        return h, aux1 + aux2


def pr_moe_full(seed: int = 5) -> TinyPRMoE:
    full = TinyPRMoE(1, 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return full


def pr_moe_sharded(world: int, full: TinyPRMoE) -> TinyPRMoE:
    model = TinyPRMoE(max(1, world // 2), world)
    state = {}
    for name in ("moe1", "moe2"):
        shard = getattr(model, name)
        copy_from_full(shard, getattr(full, name))
        state |= {f"{name}.{k}": v for k, v in shard.state_dict().items()}
    state |= {k: v for k, v in full.state_dict().items() if not k.startswith("moe")}
    model.load_state_dict(state)
    return model


def scenario_pyramid(world, rank) -> dict:
    """The PR-MoE model at ep (world/2, world) against one process: outputs, gradients."""
    full = pr_moe_full()
    model = pr_moe_sharded(world, full)
    parts = [t.clone().requires_grad_() for t in batches(world)]
    x = parts[rank].detach().clone().requires_grad_()
    out, aux = model(x)
    (out.square().sum() + aux).backward()
    allreduce_gradients(model)
    results = [full(p) for p in parts]
    sum(o.square().sum() + a for o, a in results).backward()
    errs = {"out": rel(out.detach(), results[rank][0].detach()),
            "x_grad": rel(x.grad, parts[rank].grad),
            "dense_grad": rel(grad(model.inp.weight), grad(full.inp.weight) / world),
            "residual_grad": rel(grad(model.moe2.mlp.up.weight),
                                 grad(full.moe2.mlp.up.weight) / world)}  # fmt: skip
    for name in ("moe1", "moe2"):
        layer, whole = getattr(model, name), getattr(full, name)
        lo, n = layer.first_local_expert, layer.num_local_experts
        if name == "moe1":
            mine = torch.cat([grad(layer.experts.experts[i][0].weight) for i in range(n)])
            ref = torch.cat([grad(whole.experts.experts[lo + i][0].weight) for i in range(n)])
        else:
            mine, ref = grad(layer.experts.w_in), grad(whole.experts.w_in)[lo : lo + n]
        errs[f"{name}_expert_grad"] = rel(mine, ref / world)
    return {"pyramid": errs}


def scenario_save(world, rank) -> dict:
    """Save the PR-MoE model at this world's ep sizes (checkpoint dir: $PARALLEL_CKPT)."""
    from expertswitch.parallel import save_sharded

    model = pr_moe_sharded(world, pr_moe_full())
    save_sharded(model, os.environ["PARALLEL_CKPT"])
    with torch.no_grad():
        out, _ = model(batches(world)[rank])
    return {"out": out.tolist(), "ep": [model.moe1.ep_size, model.moe2.ep_size]}


def scenario_save_twice(world, rank) -> dict:
    """A second save without overwrite: the same CheckpointError on every rank (none left
    waiting in a collective); a model with tied weights saves and loads."""
    from expertswitch.errors import CheckpointError
    from expertswitch.parallel import load_sharded, save_sharded

    model = pr_moe_sharded(world, pr_moe_full())
    model.head = nn.Linear(H, H, bias=False)
    model.head.weight = model.inp.weight  # tied, as an LM's embedding and head
    path = os.environ["PARALLEL_CKPT"]
    save_sharded(model, path)
    try:
        save_sharded(model, path)
        second = "saved again"
    except CheckpointError as e:
        second = str(e)
    other = TinyPRMoE(max(1, world // 2), world, seed=3)
    other.head = nn.Linear(H, H, bias=False)
    other.head.weight = other.inp.weight
    load_sharded(other, path)
    x = batches(world)[rank]
    with torch.no_grad():
        same = rel(other(x)[0], model(x)[0])
    return {"second": second, "same": same, "tied": other.head.weight is other.inp.weight}


def scenario_load(world, rank) -> dict:
    """Load it at this world's ep sizes into a model with other weights: outputs on the
    batches the saving world used (the saving world's rank r batch: batches(save_world)[r])."""
    from expertswitch.parallel import load_sharded

    model = TinyPRMoE(max(1, world // 2), world, seed=99)
    load_sharded(model, os.environ["PARALLEL_CKPT"])
    save_world = int(os.environ["PARALLEL_SAVE_WORLD"])
    with torch.no_grad():
        outs = [model(b)[0].tolist() for b in batches(save_world)]
    return {"outs": outs, "ep": [model.moe1.ep_size, model.moe2.ep_size]}


def scenario_tensor(world, rank) -> dict:
    """Tensor-sliced MLPs (tp = 2; data parallel over the tp groups beyond) feeding a MoE layer
    at ep = world; the ranks of a tp group share their tokens. Both forms: column output kept
    split into a row layer taking split input, and gathered into one that slices its input.
    After allreduce_gradients over the whole model: outputs and every gradient equal one
    process on all the tp groups' batches (the mean of their losses)."""
    from expertswitch.parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        tensor_parallel_group,
    )

    tp, found = 2, {}
    group = tensor_parallel_group(tp)
    n_dp = world // tp
    for gather in (False, True):
        torch.manual_seed(7)
        fc1, fc2 = nn.Linear(H, 4 * H), nn.Linear(4 * H, H)
        full_moe = build(8, 1, True, 2, drop_tokens=False, top2_2nd_expert_sampling=False)
        randomize(full_moe, 8)
        model = nn.ModuleDict({
            "col": ColumnParallelLinear.from_linear(fc1, group, gather_output=gather),
            "row": RowParallelLinear.from_linear(fc2, group, input_is_parallel=not gather),
            "moe": build(8, world, True, 2, drop_tokens=False, top2_2nd_expert_sampling=False),
        })  # fmt: skip
        copy_from_full(model["moe"], full_moe)
        xs_all = [torch.randn(10, H, generator=torch.Generator().manual_seed(9 + b))
                  for b in range(n_dp)]  # fmt: skip
        x = xs_all[rank // tp].clone().requires_grad_()
        out, _, _ = model["moe"](model["row"](torch.relu(model["col"](x))))
        out.square().sum().backward()
        allreduce_gradients(model)
        refs = [t.clone().requires_grad_() for t in xs_all]
        outs = [full_moe(fc2(torch.relu(fc1(t))))[0] for t in refs]
        (sum(o.square().sum() for o in outs) / n_dp).backward()
        tr = dist.get_rank(group)
        rows = slice(tr * 4 * H // tp, (tr + 1) * 4 * H // tp)
        moe = model["moe"]
        lo, n = moe.first_local_expert, moe.num_local_experts
        found[f"tp2 gather_output={gather}"] = {
            "out": rel(out.detach(), outs[rank // tp].detach()),
            "x_grad": rel(x.grad, refs[rank // tp].grad * n_dp),
            "col_grad": rel(model["col"].linear.weight.grad, fc1.weight.grad[rows]),
            "row_grad": rel(model["row"].linear.weight.grad, fc2.weight.grad[:, rows]),
            "row_bias_grad": rel(model["row"].bias.grad, fc2.bias.grad),
            "gate_grad": rel(grad(moe.gate.wg.weight), grad(full_moe.gate.wg.weight)),
            "expert_grad": rel(grad(moe.experts.w_in), grad(full_moe.experts.w_in)[lo : lo + n]),
        }
    return found


def scenario_die(world, rank) -> dict:
    """The last rank dies before the layer's all-to-all: the others get a clear error, fast."""
    import time

    layer = build(8, world, True, 2, drop_tokens=False)
    at = os.environ.get("PARALLEL_DIE_AT", "forward")
    x = batches(world)[rank].requires_grad_()
    if at == "backward":
        out = layer(x)[0]
    if rank == world - 1:
        os._exit(3)
    start = time.monotonic()
    try:
        if at == "backward":
            out.sum().backward()
        else:
            layer(x)
        return {"error": None}
    except Exception as e:  # noqa: BLE001 - the point is to report what the user sees
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - start}


def scenario_agree(world, rank) -> dict:
    """The engine's per-step check: equal payloads pass; one rank's different tokens stop
    every rank with a ParallelError naming the step (no rank goes on alone)."""
    from expertswitch.engine.mirror import agree

    agree("the tokens", 3, [("req-0", [5, 6], False, None, None)])
    try:
        agree("the tokens", 4, [("req-0", [5, 7 if rank == world - 1 else 6], True, "stop", None)])
    except Exception as e:  # noqa: BLE001 - the point is to report what each rank sees
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


def scenario_agree_engine(world, rank) -> dict:
    """The check inside the engine: one rank's sampler draws a different token (a divergence
    the batch alone would not show). Mid-generation: caught by the next step's agreement,
    before its forward pass; on the last step: by generate's own check. Both on every rank."""
    import expertswitch.engine.engine as engine_mod
    from expertswitch.engine import Engine, SamplingParams

    path = os.path.join(os.environ["PARALLEL_TMP"], "moe")
    if rank == 0:
        _checkpoint("moe", path)
    dist.barrier()
    real, found = engine_mod.sample, {}
    for label, max_tokens, at in (("mid", 6, 3), ("last", 1, 1)):
        eng = Engine(path, tokenizer=False, num_kv_blocks=32, tensor_parallel_size=world)

        def shifted(logits, reqs, *eos, eng=eng, at=at):
            tokens = real(logits, reqs, *eos)
            if rank == world - 1 and eng.steps == at:
                tokens = [(t + 1) % 120 for t in tokens]
            return tokens

        engine_mod.sample = shifted
        try:
            eng.generate([[5, 6, 7], [8, 9]], sampling=SamplingParams(temperature=0.0,
                         max_tokens=max_tokens))  # fmt: skip
            found[label] = None
        except Exception as e:  # noqa: BLE001 - the point is to report what each rank sees
            found[label] = f"{type(e).__name__}: {e}"
        finally:
            engine_mod.sample = real
    return found


def _checkpoint(kind: str, path: str) -> None:
    """Real checkpoints: transformers' Llama (GQA), Qwen2 (q/k/v biases, tied embeddings),
    Qwen3 (q/k norms over heads of 64) and Qwen2-MoE (Mixtral's block beside a shared expert
    and its sigmoid gate: whole on every rank while the attention is sliced), and an
    `expertswitch train` MoE model (a dense layer, Residual-MoE top-2, top-1)."""
    torch.manual_seed(11)
    small = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "vocab_size": 120, "max_position_embeddings": 128, "eos_token_id": 119}  # fmt: skip
    if kind == "moe":
        from expertswitch.models.causal_lm import CausalLM

        layer = {"num_experts": 4, "k": 2, "use_residual": True, "drop_tokens": False}
        CausalLM.from_config({**small, "model_type": "expertswitch_moe", "num_hidden_layers": 3,
                              "num_attention_heads": 4, "num_key_value_heads": 2,
                              "hidden_act": "silu", "moe_layers": [None, layer, {**layer, "k": 1,
                              "use_residual": False}]}).save_pretrained(path)  # fmt: skip
        return
    import transformers

    if kind == "llama":
        # every linear with a bias: o_proj's and down_proj's are added once after the reduce
        cfg = transformers.LlamaConfig(**{**small, "hidden_size": 128, "intermediate_size": 256},
                                       num_attention_heads=8, num_key_value_heads=4,
                                       attention_bias=True, mlp_bias=True)  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**{**small, "hidden_size": 128},
                                          num_attention_heads=4, num_key_value_heads=2,
                                          num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=64,
                                          shared_expert_intermediate_size=96)  # fmt: skip
        model = transformers.Qwen2MoeForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**{**small, "hidden_size": 128, "intermediate_size": 128},
                                       num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=64)  # fmt: skip
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**{**small, "hidden_size": 128, "intermediate_size": 128},
                                       num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True)  # fmt: skip
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # biases and q/k norms that matter (initialised to zero, one)
        for name, t in model.named_parameters():
            if name.endswith("bias"):
                t.normal_(0, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                t.normal_(1, 0.5)
    model.save_pretrained(path)
    _experts(model, path, lora=kind != "qwen2_moe")  # (LoRA on MoE experts: not served)


EXPERTS = {"a": dict(bits=4, group_size=32), "b": dict(bits=2, group_size=64, symmetric=True)}


def _experts(model, path: str, lora: bool = True) -> None:
    """Compressed experts of a base (every weight and bias tuned): `a` in 4-bit groups of 32,
    which every slice here keeps whole; `b` in 2-bit groups of 64, which tp 4 cuts through;
    and with `lora` a PEFT adapter."""
    from expertswitch.compress import CompressOptions, compress_expert, make_method

    for name, method in EXPERTS.items():
        g = torch.Generator().manual_seed(len(name) + method["bits"])
        with torch.no_grad():
            tuned = {n: t + torch.randn(t.shape, generator=g) * (0.3 if n.endswith("bias")
                     else 0.04) for n, t in model.state_dict().items()}  # fmt: skip
        saved = {n: t.clone() for n, t in model.state_dict().items()}
        model.load_state_dict(tuned)
        model.save_pretrained(f"{path}-{name}-full")
        model.load_state_dict(saved)
        compress_expert(path, f"{path}-{name}-full", f"{path}-{name}.delta",
                        make_method("rtn", **method), CompressOptions(progress=False))  # fmt: skip
    try:  # a PEFT LoRA adapter on every linear, the embedding and lm_head, biases tuned
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return
    if not lora:
        return
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "embed_tokens", "lm_head"]  # fmt: skip
    torch.manual_seed(5)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                            init_lora_weights=False, bias="all"))  # fmt: skip
    with torch.no_grad():
        for name, t in lora.named_parameters():
            if name.endswith("bias"):
                t.add_(0.3)
    lora.save_pretrained(f"{path}-lora")  # (the model is PEFT's now: nothing uses it after)


def scenario_engine_split(world, rank) -> dict:
    """The serving engine split over the ranks (all running every step on the same batch):
    tensor slicing of attention and MLPs, experts spread with each rank routing its share of
    the tokens, and both. Against the same engine in one process on every rank: equal greedy
    and seeded tokens, logprobs (prompt and generated) within fp32 rounding, this rank's kv
    heads only in its KV cache."""
    from expertswitch.engine import Engine, SamplingParams
    from expertswitch.parallel.dispatch import TRAFFIC, reset_traffic

    found = {}
    # the layer: each rank routes its share of tokens all ranks hold (T < world included)
    full = build(8, 1, True, 2, drop_tokens=False, use_residual=True,
                 top2_2nd_expert_sampling=False).eval()  # fmt: skip
    randomize(full, 4)
    layer = build(8, world, True, 2, drop_tokens=False, use_residual=True,
                  top2_2nd_expert_sampling=False).eval()  # fmt: skip
    copy_from_full(layer, full)
    for t in (1, 3, 17):
        x = torch.randn(t, H, generator=torch.Generator().manual_seed(t))  # same on every rank
        with torch.no_grad():
            ref = full.infer(x)
            reset_traffic()
            every = layer.infer(x)
            sent_every = TRAFFIC["bytes"]
            reset_traffic()
            share = layer.infer(x, replicated=True)
            found[f"layer share T={t}"] = {"err": rel(share, ref), "err_every": rel(every, ref),
                                           "bytes": [TRAFFIC["bytes"], sent_every]}  # fmt: skip
    tmp = os.environ["PARALLEL_TMP"]
    cases = [("llama", 2, 1), ("qwen2", 2, 1), ("qwen3", 2, 1), ("qwen2_moe", 2, 1),
             ("moe", 1, 2), ("moe", 2, 2), ("moe", 2, 1)]  # fmt: skip
    if world == 4:
        cases = [("llama", 4, 1), ("qwen2", 4, 1), ("moe", 2, 4), ("moe", 1, 4)]  # qwen2:
        # 2 kv heads over 4 ranks, each replicated on 2
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3, prompt_logprobs=2)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, seed=5)
    for kind, tp, ep in cases:
        path = os.path.join(tmp, kind)
        if rank == 0 and not os.path.exists(path):
            _checkpoint(kind, path)
        dist.barrier()
        experts = {} if kind == "moe" else {n: f"{path}-{n}.delta" for n in EXPERTS}
        if os.path.exists(f"{path}-lora"):
            experts["lora"] = f"{path}-lora"
        one = Engine(path, experts, tokenizer=False, num_kv_blocks=64)
        split = Engine(path, experts, tokenizer=False, num_kv_blocks=64, tensor_parallel_size=tp,
                       expert_parallel_size=ep)  # fmt: skip
        res = {"kv_heads": [split.kv_cache[0][0].shape[2], one.kv_cache[0][0].shape[2]]}
        runs = [("greedy", greedy, prompts, None), ("seeded", seeded, prompts, None),
                ("alone", greedy, prompts[1:2], None)]  # fmt: skip
        if experts:  # a batch mixing both experts and the base
            runs.append(("experts", greedy, prompts + prompts[:1], [None, "a", "b", "a"]))
        if "lora" in experts:  # the adapter's factors sliced like the layers they change
            runs.append(("lora", greedy, prompts + prompts[:1], [None, "lora", "a", "lora"]))
        for label, sampling, ps, use in runs:
            a = one.generate(ps, use, sampling=sampling)
            b = split.generate(ps, use, sampling=sampling)
            if label == "lora":
                base = one.generate(ps[1:2], sampling=sampling)[0].token_ids
                res["lora changes tokens"] = a[1].token_ids != base
                res["lora errors"] = [o.error for o in a + b]
            if label == "experts":  # each expert changes the answer; b's slices may not fit
                base = one.generate(ps[1:2], sampling=sampling)[0].token_ids
                res["expert changes tokens"] = a[1].token_ids != base
                res["expert errors"] = [o.error for o in b]
                if tp == 4:  # `b`'s groups of 64 do not fit the 32-channel o_proj slices
                    a, b = [a[i] for i in (0, 1, 3)], [b[i] for i in (0, 1, 3)]
            res[label + " tokens equal"] = [o.token_ids for o in a] == [o.token_ids for o in b]
            if sampling.logprobs is not None:
                diffs = [abs(x.logprob - y.logprob) for oa, ob in zip(a, b)
                         for x, y in zip(oa.logprobs, ob.logprobs)]  # fmt: skip
                diffs += [
                    abs(x.logprob - y.logprob)
                    for oa, ob in zip(a, b)
                    for x, y in zip(oa.prompt_logprobs[1:], ob.prompt_logprobs[1:])
                ]
                res[label + " logprob diff"] = max(diffs)
        found[f"{kind} tp{tp} ep{ep}"] = res
        split.close()
        one.close()
    return found


def main() -> int:
    scenario, out_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ.get(
        "PARALLEL_TIMEOUT_S", "120"))))  # fmt: skip
    world, rank = dist.get_world_size(), dist.get_rank()
    try:
        scenarios = {"layer": scenario_layer, "deepspeed": scenario_deepspeed,
                     "die": scenario_die, "pyramid": scenario_pyramid, "save": scenario_save,
                     "load": scenario_load, "tensor": scenario_tensor,
                     "save_twice": scenario_save_twice, "agree": scenario_agree,
                     "agree_engine": scenario_agree_engine,
                     "engine_split": scenario_engine_split}  # fmt: skip
        found = scenarios[scenario](world, rank)
        if scenario == "die":  # no collective is possible any more: each rank writes its own
            with open(f"{out_path}.{rank}", "w") as f:
                json.dump(found, f)
            os._exit(0)
        gathered = [None] * world
        dist.all_gather_object(gathered, found)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"world": world, "ranks": gathered}, f, indent=1)
        # Teardown aborts now and then on gloo ("terminate called without an active
        # exception": first with DeepSpeed's CPU comm op, then once in CI after the engine
        # scenario had written its results). Once every rank is past the gather there is
        # nothing left to tear down that a test reads: leave without it.
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    assert expert_groups  # imported for the side effect-free check that the package loads
    faulthandler.enable()  # an abort in C++ (gloo) prints where each Python thread was
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
