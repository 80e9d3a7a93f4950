"""Layers whose weights differ per row: the base's tensor for base-only rows, the expert's for
its rows, computed from the expert's packed parts.

    MultiExpertLinear   y = x·W_baseᵀ + Δ_{e(row)}(x) [+ bias of the row's expert]
                        an expert may instead store the whole weight exactly (e.g. an lm_head
                        with a larger vocabulary): its rows use that weight
    RowNorm             RMSNorm with the row's expert's weight when the expert changed it
    RowEmbedding        token embedding: base rows, exact expert tables, or base + quantized
                        delta rows (dequantized for the looked-up rows only) or + LoRA rows

A PEFT LoRA adapter served as an expert (io/lora.py) adds its s·(x·Aᵀ)·Bᵀ to its rows
(`add_lora`), beside the deltas of the compressed experts.

The delta term never comes from a dense Δ̂: on CPU through the lean torch path of
kernels/delta_cpu.py (several experts of one small weight stacked and applied in one batched
matmul, else one expert at a time; torch's int4 matmul with `cpu_int4_deltas`), on a GPU
through one Triton launch for all experts of the batch (kernels/delta_gemm.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertswitch.compress.packed import PackedDelta
from expertswitch.kernels.delta_cpu import (
    STACK_MAX_WEIGHT,
    StackedDeltas,
    dequantized_body,
    int4_matmul,
    packed_matmul,
    stack_key,
)
from expertswitch.models.context import ExpertBatch


def stacked_rows(eb: ExpertBatch, name: str, base: torch.Tensor) -> torch.Tensor | None:
    """[T, ...]: per row, the base's tensor or its expert's exact replacement; None when no
    active expert replaces `name` (every row uses `base`). Cached per step."""
    key = ("rows", name)
    if key in eb.cache:
        return eb.cache[key]
    users = eb.users_of(name, "exact")
    out = None
    if users:
        tkey = ("rows-table", name)
        if tkey not in eb.tables:  # every active expert's, kept while the same ones are active
            table = [base] + [ex.exact.get(name, base).to(base.dtype) for ex in eb.experts]
            eb.tables[tkey] = torch.stack(table)
        if "row-slot+1" not in eb.cache:  # (the table's row of each batch row, per step)
            eb.cache["row-slot+1"] = eb.row_slot + 1
        out = eb.tables[tkey].index_select(0, eb.cache["row-slot+1"])
    eb.cache[key] = out
    return out


# How add_deltas computes the delta term: "auto" = the Triton kernel on CUDA, the lean torch
# path on CPU (kernels/delta_cpu.py: stacked experts where they stack, else per expert);
# "per-expert" forces the latter's per-expert path (tests); "kernel" forces the Triton kernel
# (tests, in Triton's interpreter);
# "reference" = PackedDelta.matmul_reference; "dequantize" is the PEFT-style loop (each
# expert's Δ̂ made dense, then its rows), for benchmarks only.
DELTA_PATH = "auto"


def add_deltas(y: torch.Tensor, x: torch.Tensor, eb: ExpertBatch, name: str) -> None:
    """y [T, N] += each row's expert's delta term for weight `name`, from packed parts."""
    users = eb.users_of(name, "deltas")
    if not users:
        return
    n = users[0][1].shape[0]
    use_kernel = DELTA_PATH == "kernel" or (DELTA_PATH == "auto" and x.is_cuda)
    if use_kernel and y.shape[1] == n and y.is_contiguous():
        _add_deltas_kernel(y, x, eb, name, users)
        return
    if DELTA_PATH == "auto" and len(users) > 1:
        users = _add_stacked(y, x, eb, name, users)
    for s, d in users:
        if eb.ranges is not None:  # this slot's rows are one run: a view, then an add into it
            start, end = eb.ranges[s]
            xs = x[start:end]
        else:
            rows = eb.segments[s]
            xs = x.index_select(0, rows)
        form = eb.experts[s].cpu_int4.get(name)
        if DELTA_PATH == "dequantize":
            part = xs.float() @ d.dequantize(x.device).T
        elif DELTA_PATH == "reference":
            part = d.matmul_reference(xs)
        elif form is not None:
            part = int4_matmul(xs, form)  # fp32 [R, N], the delta term in bf16
        else:
            part = packed_matmul(xs, d)  # fp32 [R, N]
        if eb.ranges is not None:
            _add_rows(y, start, end, part)
        else:
            y[:, : part.shape[1]].index_add_(0, rows, part.to(y.dtype))


def _add_stacked(y, x, eb: ExpertBatch, name: str, users) -> list:
    """CPU: the delta terms of experts whose deltas of `name` stack (kernels/delta_cpu.py), in
    one pass per format: their rows as [E, R, K] — a view of x when they are consecutive
    runs of one length (a decode step with as many sequences per expert), else gathered (R:
    the most rows any of them has; shorter ones repeat row 0, whose results are dropped) —
    one batched matmul, the results added back to their rows. Returns the users left to the
    per-expert path (int4 forms, large weights, a lone expert of its format, or rows too
    unevenly spread). (int4 forms stacked as one [E·N, K] weight, every row times every
    expert, measured slower: 1.8K against 2.0K tokens/s on the tiny family at batch 32.)

    One stack per weight and format holds every active expert of that format, built once
    while the same experts are active (the runner's tables); a batch whose rows use only some
    of them (MoE rows, the logits of some sequences) picks theirs out of it — a stack per
    subset would pile up, one for each set of experts the routing happens to pick."""
    keys = eb.tables.get(("stack-keys", name))
    if keys is None:  # each active expert's format of this weight (fixed while active)
        keys = {s: _stack_key(eb, s, name, ex.deltas[name])
                for s, ex in enumerate(eb.experts) if name in ex.deltas}  # fmt: skip
        eb.tables[("stack-keys", name)] = keys
    rest, groups = [], {}
    for s, d in users:
        if keys[s] is None:
            rest.append((s, d))
        else:
            groups.setdefault(keys[s], []).append((s, d))
    for key, group in groups.items():
        slots = tuple(s for s, _ in group)
        plan = _row_plan(eb, slots) if len(group) > 1 else None
        if plan is None:
            rest += group
        else:
            _add_stack(y, x, plan, _stack(eb, name, key, slots))
    return rest


def _row_plan(eb: ExpertBatch, slots: tuple[int, ...]):
    """How `slots`' rows reach a stack as [E, R, K]: ("run", a, b) when they are one run of
    equal parts (views, no gather), ("rows", gather, keep, targets) when gathered and padded
    (`_padded_rows`), None when padding would more than double the rows computed."""
    run = _even_run(eb, slots)
    if run is not None:
        return ("run", *run)
    rows = _padded_rows(eb, slots)
    return None if rows is None else ("rows", *rows)


def _add_stack(y: torch.Tensor, x: torch.Tensor, plan, stack: StackedDeltas) -> None:
    """y += the delta terms of `stack` (its experts in the plan's slot order) for their rows."""
    e = stack.codes.shape[0]
    if plan[0] == "run":
        _, a, b = plan
        part = stack.bmm(x[a:b].view(e, -1, x.shape[1]))
        _add_rows(y, a, b, part.view(b - a, -1))
        return
    _, gather, keep, targets = plan
    part = stack.bmm(x.index_select(0, gather).view(e, -1, x.shape[1]))
    part = part.view(-1, part.shape[-1]).index_select(0, keep)
    y[:, : part.shape[1]].index_add_(0, targets, part.to(y.dtype))


def _add_rows(y: torch.Tensor, a: int, b: int, part: torch.Tensor) -> None:
    """y[a:b, :N] += part [b − a, N] in place (y may be wider: a larger vocabulary), in as few
    torch ops as it takes: at decode sizes each costs more than its arithmetic."""
    target = y[a:b] if part.shape[1] == y.shape[1] else y[a:b, : part.shape[1]]
    target.add_(part if part.dtype == y.dtype else part.to(y.dtype))


def _even_run(eb: ExpertBatch, slots: tuple[int, ...]) -> tuple[int, int] | None:
    """[a, b) when `slots`' rows are consecutive runs, in slot order, of equal length (a
    decode step of as many sequences per expert), else None. Cached per step."""
    if eb.ranges is None:
        return None
    key = ("run", slots)
    if key not in eb.cache:
        runs = [eb.ranges[s] for s in slots]
        n = runs[0][1] - runs[0][0]
        even = all(hi - lo == n for lo, hi in runs)
        if even and all(p[1] == q[0] for p, q in zip(runs, runs[1:])):
            eb.cache[key] = (runs[0][0], runs[-1][1])
        else:
            eb.cache[key] = None
    return eb.cache[key]


def _stack_key(eb: ExpertBatch, slot: int, name: str, d: PackedDelta) -> tuple | None:
    return None if eb.experts[slot].cpu_int4.get(name) is not None else stack_key(d)


def _stack(eb: ExpertBatch, name: str, key: tuple, slots: tuple[int, ...]) -> StackedDeltas:
    """The stack of `slots`' deltas of `name`: the format's whole stack (every active expert
    storing `name` as `key`), or the part of it these slots hold (cached per step)."""

    def build():
        every = [
            (s, ex.deltas[name])
            for s, ex in enumerate(eb.experts)
            if name in ex.deltas and _stack_key(eb, s, name, ex.deltas[name]) == key
        ]
        return [s for s, _ in every], StackedDeltas.build([d for _, d in every])

    return _stack_part(eb, ("stacked", name, key), slots, build)


def _stack_part(eb: ExpertBatch, key: tuple, slots: tuple[int, ...], build):
    """The stack `build()` makes for every active expert it takes — (slots, stack), or None —
    kept in the runner's tables while the same expert objects are active; or the part of it
    `slots` hold (cached per step); None when `build` made none or `slots` are not all in
    it."""
    if key not in eb.tables:
        eb.tables[key] = build()
    if eb.tables[key] is None:
        return None
    everyone, stack = eb.tables[key]
    if list(slots) == everyone:
        return stack
    if not set(slots) <= set(everyone):
        return None
    pkey = ("stack-part", key, slots)
    if pkey not in eb.cache:
        eb.cache[pkey] = stack.select([everyone.index(s) for s in slots])
    return eb.cache[pkey]


def _padded_rows(eb: ExpertBatch, slots: tuple[int, ...]):
    """(gather [E·R], keep, targets) for stacking `slots`' rows, or None when padding to the
    most rows would more than double the rows computed. Cached per step."""
    key = ("padded", slots)
    if key not in eb.cache:
        segs = [eb.segments[s] for s in slots]
        counts = [len(r) for r in segs]
        most = max(counts)
        if most * len(segs) > 2 * sum(counts):
            eb.cache[key] = None
        else:
            gather = torch.zeros(len(segs), most, dtype=torch.long, device=segs[0].device)
            keep = []
            for e, r in enumerate(segs):
                gather[e, : len(r)] = r
                keep.append(torch.arange(e * most, e * most + len(r)))
            eb.cache[key] = (gather.view(-1), torch.cat(keep).to(gather.device), torch.cat(segs))
    return eb.cache[key]


def _add_deltas_kernel(y, x, eb: ExpertBatch, name: str, users) -> None:
    """One launch per format (bits, group size, symmetry) among the batch's experts — one in
    all for experts compressed alike. The row grouping is built once per step for each set of
    experts that store this tensor in one format (normally one set: all linears), the pointer
    table once per (tensor, set of resident expert objects) in `eb.tables`, which the runner
    keeps across steps while the active experts stay the same objects."""
    from expertswitch.kernels.delta_gemm import DeltaTable, RowGroups, delta_matmul, pick_block_m

    formats: dict[tuple, list] = {}
    for s, d in users:
        formats.setdefault((d.bits, d.group_size, d.symmetric), []).append((s, d))
    for group in formats.values():
        slots = tuple(s for s, _ in group)
        gkey = ("groups", slots)
        if gkey not in eb.cache:
            lkey = ("lut", slots, len(eb.experts))  # kept with the tables: a CUDA graph's
            if lkey not in eb.tables:  # capture cannot copy from the host
                lut = torch.full((len(eb.experts) + 1,), -1, dtype=torch.long, device=x.device)
                lut[list(slots)] = torch.arange(len(slots), device=x.device)
                eb.tables[lkey] = lut
            row = eb.tables[lkey][eb.row_slot]  # −1 (base, or another format): the last, −1
            block_m = pick_block_m(x.shape[0], len(slots))
            eb.cache[gkey] = RowGroups.build(row, len(slots), block_m)
        tkey = (name, slots)
        if tkey not in eb.tables:
            eb.tables[tkey] = DeltaTable.build([d for _, d in group], x.device)
        delta_matmul(x, eb.tables[tkey], eb.cache[gkey], out=y)


def add_lora(y: torch.Tensor, x: torch.Tensor, eb: ExpertBatch, name: str) -> None:
    """y [T, N] += each row's LoRA term s·(x·Aᵀ)·Bᵀ for weight `name`, for the rows of experts
    that are LoRA adapters. Every adapter of the batch at once, as S-LoRA does: the active
    adapters' A stacked into one [Σr, K] matrix and their B into one [N, Σr], each row's
    x·Aᵀ kept on its own adapter's columns only (selected from the row's slot, so that an
    inf in another adapter's columns cannot reach it), then one matmul by B. Two matmuls
    whatever the mix, and nothing read from the host: a decode graph replays it.

    One stack per weight for the runner's whole active set, kept with its kernel tables while
    the set stays (a second copy of the active adapters' factors of this weight; a lone
    adapter's are used as they are); batches whose rows use only some of them (the logits of
    some sequences) mask the others out rather than stacking again. An adapter that grew the
    vocabulary has a longer lm_head B: the others' are padded with zero rows."""
    if not eb.users_of(name, "lora"):
        return
    key = ("lora", name)
    if key not in eb.tables:  # (kept while the same expert objects are active)
        every = [(s, ex.lora[name]) for s, ex in enumerate(eb.experts) if name in ex.lora]
        a = torch.cat([p.a for _, p in every]) if len(every) > 1 else every[0][1].a
        n = max(p.b.shape[0] for _, p in every)
        bs = [F.pad(p.b, (0, 0, 0, n - p.b.shape[0])) for _, p in every]
        b = torch.cat(bs, dim=1) if len(bs) > 1 else bs[0]
        owner = torch.cat([torch.full((p.rank,), s) for s, p in every]).to(a.device)
        eb.tables[key] = (a, b, owner)
    a, b, owner = eb.tables[key]
    h = F.linear(x, a)  # [T, Σr]
    h = torch.where(eb.row_slot.unsqueeze(1) == owner, h, 0.0)  # each row: its adapter's
    n = min(b.shape[0], y.shape[1])  # (y is wider than the base only when a grown expert's
    y[:, :n] += F.linear(h, b[:n])  # rows are in this batch; only they reach past it)


class MultiExpertLinear:
    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 fill: float = 0.0, lora_name: str | None = None):  # fmt: skip
        """name: the weight's checkpoint name (…q_proj.weight); the bias is name[:-6] + "bias".
        fill: value of columns past the base's width in base rows when an active expert's
        exact weight is wider (−inf for logits over a larger vocabulary). lora_name: the name
        LoRA adapters give this layer when it is not `name` (a tied lm_head)."""
        self.name = name
        self.lora_name = lora_name or name
        self.bias_name = name.removesuffix("weight") + "bias"
        self.weight = weight  # [N, K]
        self.bias = bias  # [N] | None
        self.fill = fill

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor, eb: ExpertBatch) -> torch.Tensor:
        y = F.linear(x, self.weight)  # [T, N]
        exact = eb.users_of(self.name, "exact")
        if exact:
            y = self._exact_rows(y, x, eb, exact)
        add_deltas(y, x, eb, self.name)
        add_lora(y, x, eb, self.lora_name)
        if self.bias is not None:
            rows = stacked_rows(eb, self.bias_name, self.bias)
            y = y + (self.bias if rows is None else rows)
        return y

    def _exact_rows(self, y, x, eb, exact) -> torch.Tensor:
        width = max([y.shape[1]] + [w.shape[0] for _, w in exact])
        if width > y.shape[1]:
            wide = y.new_full((y.shape[0], width), self.fill)
            wide[:, : y.shape[1]] = y
            y = wide
        for s, w in exact:
            rows = eb.segments[s]
            out = F.linear(x.index_select(0, rows), w.to(x.dtype))
            if out.shape[1] < width:
                pad = out.new_full((out.shape[0], width - out.shape[1]), self.fill)
                out = torch.cat([out, pad], dim=1)
            y[rows] = out
        return y


# Whether linears that read the same input (q, k, v; gate, up) run as one on CPU (FusedLinears);
# False: each alone (tests compare the two)
FUSE_LINEARS = True


class FusedLinears:
    """Linears that read the same input — q, k and v; gate and up — as one product on CPU, as
    vLLM's QKVParallelLinear and MergedColumnParallelLinear are: one matmul by the base weights
    stacked along the output channels, and one batched matmul for the active experts' deltas,
    their stacks concatenated along the output channels too (StackedDeltas.concat). At decode
    sizes each torch op costs more than its arithmetic, and this turns 7 linears a layer into 4.

    The members keep their own names (the archives' and adapters' tensor names) and their
    weights become views of the fused one (no second copy); an expert's own biases are added
    to its rows. A step runs member by member (`__call__` returns None) when an active expert
    with rows replaces a member's weight or is a LoRA adapter of it, when the members' deltas
    do not stack alike (another format, int4 forms, a member an expert leaves out), or when
    the rows are too unevenly spread to stack. Only small CPU weights are fused (`of`): a GPU
    applies each linear's deltas in one kernel launch (and replays graphs)."""

    def __init__(self, members: list[MultiExpertLinear]):
        self.members = members
        self.names = tuple(m.name for m in members)
        self.sizes = [m.out_features for m in members]
        self.weight = torch.cat([m.weight for m in members])
        with_bias = [m.bias is not None for m in members]
        self.bias = torch.cat([m.bias for m in members]) if all(with_bias) else None
        self.usable = all(with_bias) or not any(with_bias)
        start = 0
        for m, n in zip(members, self.sizes):
            m.weight = self.weight[start : start + n]
            if self.bias is not None:
                m.bias = self.bias[start : start + n]
            start += n

    @classmethod
    def of(cls, members: list) -> FusedLinears | None:
        """The members fused, or None unless each is a MultiExpertLinear of one input size, on
        CPU, no larger than the weights whose deltas stack (STACK_MAX_WEIGHT): larger ones
        run member by member anyway once an expert's rows are in the step, and their fused
        copy would cost memory (a GPU's, or a CPU's memory-mapped checkpoint's pages)."""
        if not all(type(m) is MultiExpertLinear for m in members):
            return None
        w = members[0].weight
        if len({m.weight.shape[1:] for m in members}) != 1 or w.device.type != "cpu":
            return None
        if any(m.weight.shape[0] * m.weight.shape[1] > STACK_MAX_WEIGHT for m in members):
            return None
        return cls(members)

    def __call__(self, x: torch.Tensor, eb: ExpertBatch) -> torch.Tensor | None:
        """The members' outputs side by side [T, ΣN_i] (member i's: columns from the sum of
        the sizes before it), or None: this step runs member by member."""
        if not (FUSE_LINEARS and self.usable and DELTA_PATH == "auto") or x.is_cuda:
            return None
        for m in self.members:
            if eb.users_of(m.name, "exact") or eb.users_of(m.lora_name, "lora"):
                return None
        slots = tuple(s for s, _ in eb.users_of(self.names[0], "deltas"))
        if any(tuple(s for s, _ in eb.users_of(n, "deltas")) != slots for n in self.names[1:]):
            return None  # (an expert with rows here stores only some of them)
        plan = stack = None
        if slots:
            stack = _stack_part(eb, ("fused", self.names), slots,
                                lambda: _build_fused(eb, self.names))  # fmt: skip
            plan = None if stack is None else _row_plan(eb, slots)
            if plan is None:
                return None
        y = F.linear(x, self.weight)
        if stack is not None:
            _add_stack(y, x, plan, stack)
        if self.bias is not None:  # (after the deltas: the members' order of additions)
            rows = [stacked_rows(eb, m.bias_name, m.bias) for m in self.members]
            if all(r is None for r in rows):
                y += self.bias
            else:  # an expert's own biases for its rows (Qwen2's fine-tunes change them)
                y += torch.cat([m.bias.expand(y.shape[0], -1) if r is None else r
                                for m, r in zip(self.members, rows)], dim=1)  # fmt: skip
        return y


def _build_fused(eb: ExpertBatch, names: tuple[str, ...]):
    """(slots, stack) of every active expert storing each of `names` as a delta, when all of
    those deltas stack (stack_key), each name's alike, and all names' with one input layout
    (input size, group size, groups: a stack's int8 codes and steps are the same form
    whatever the bits and symmetry); else None (while this set of experts is active, its
    steps run member by member). An expert storing only some of them is left out: a step
    with its rows runs member by member."""
    every = [s for s, ex in enumerate(eb.experts) if all(n in ex.deltas for n in names)]
    if not every:
        return None
    layouts = set()
    for n in names:
        keys = {_stack_key(eb, s, n, eb.experts[s].deltas[n]) for s in every}
        if None in keys or len(keys) > 1:
            return None
        ((shape, _, gs, _, scales, _, dev),) = keys
        layouts.add((shape[1], gs, scales[1:], dev))
    if len(layouts) > 1:
        return None
    stacks = [StackedDeltas.build([eb.experts[s].deltas[n] for s in every]) for n in names]
    return every, StackedDeltas.concat(stacks)


class RowNorm:
    """RMSNorm as Llama computes it: fp32 variance, then weight · normalised (input dtype); with
    `offset` as Gemma does: (offset + weight) · normalised in fp32, then the input dtype."""

    def __init__(self, name: str, weight: torch.Tensor, eps: float, offset: float = 0.0):
        self.name, self.weight, self.eps, self.offset = name, weight, eps, offset

    def __call__(self, x: torch.Tensor, eb: ExpertBatch) -> torch.Tensor:
        h = x if x.dtype == torch.float32 else x.to(torch.float32)  # (no no-op op: decode)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        rows = stacked_rows(eb, self.name, self.weight)  # [T, D]
        w = self.weight if rows is None else rows.view(rows.shape[0], *[1] * (x.dim() - 2), -1)
        if self.offset:
            return (h * (self.offset + w.float())).to(x.dtype)
        # (x [T, D], or [T, heads, D]: Qwen3's q and k norms)
        return w * (h if h.dtype == x.dtype else h.to(x.dtype))


class RowEmbedding:
    def __init__(self, name: str, weight: torch.Tensor, scale: float = 1.0):
        """scale: every row multiplied by it, rounded to the weight's dtype (Gemma's √H)."""
        self.name, self.weight = name, weight  # [V, H]
        self.scale = float(torch.tensor(scale, dtype=weight.dtype))  # (as transformers rounds it)

    def __call__(self, ids: torch.Tensor, eb: ExpertBatch) -> torch.Tensor:
        out = F.embedding(ids.clamp_max(self.weight.shape[0] - 1), self.weight)  # [T, H]
        for s, table in eb.users_of(self.name, "exact"):
            rows = eb.segments[s]
            out[rows] = F.embedding(ids.index_select(0, rows), table.to(out.dtype))
        for s, d in eb.users_of(self.name, "deltas"):
            rows = eb.segments[s]
            out[rows] += delta_rows(d, ids.index_select(0, rows)).to(out.dtype)
        for s, p in eb.users_of(self.name, "lora_embedding"):  # + s·(B·A)ᵀ[id]
            rows = eb.segments[s]
            out[rows] += F.linear(F.embedding(ids.index_select(0, rows), p.a), p.b)
        return out * self.scale if self.scale != 1.0 else out


def delta_rows(d: PackedDelta, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of Δ̂ (fp32 [R, K]) from the packed parts of those rows only (the lean
    path of kernels/delta_cpu.py: `PackedDelta.dequantize` of the rows, in fewer ops)."""

    def rows(t):
        return None if t is None else t.index_select(0, idx)

    body = dequantized_body([rows(p) for p in d.planes], rows(d.scales), rows(d.zeros), d.bits,
                            d.group_size, d.k)  # fmt: skip
    if d.salient_idx is not None:
        body.index_add_(1, d.salient_idx.long(), rows(d.salient_cols).float())
    return body * 2.0**d.scale_exp
