"""The multi-expert packed-delta kernel against its reference. Without a GPU it runs in Triton's
interpreter (conftest sets TRITON_INTERPRET=1), which cannot load bf16: bf16 is covered by the
gpu-marked test."""

import copy

import pytest
import torch

pytest.importorskip("triton")

from expertswitch.compress.packed import PackedDelta  # noqa: E402
from expertswitch.compress.packing import padded_k  # noqa: E402
from expertswitch.compress.quant import num_groups  # noqa: E402
from expertswitch.kernels.delta_gemm import (  # noqa: E402
    SMS,
    DeltaConfig,
    DeltaTable,
    RowGroups,
    delta_config,
    delta_matmul,
    delta_matmul_auto,
    delta_matmul_reference,
    pick_block_m,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The integer tiles (q − z) are exact in every dtype, so only fp32 summation order differs from
# the reference — except on a GPU, where tl.dot takes fp32 operands as tf32 (~3e-4 relative).
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 2e-3, torch.float16: 1e-5}
SMALL = DeltaConfig(16, 16, 32)


def make_delta(n, k, bits, group_size, symmetric, n_salient, seed, magnitude=1e-3):
    """Random codes / steps / zero points / salient channels packed as the archive stores them;
    `magnitude` moves the tensor's scale_exp."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, padded_k(k)), generator=g)
    codes[:, k:] = 0
    groups = num_groups(k, group_size)
    scales = (torch.rand(n, groups, generator=g) + 0.1) * magnitude
    zeros = None
    if not symmetric:
        zeros = torch.randint(0, 1 << bits, (n, groups), generator=g).to(torch.uint8)
    idx = torch.randperm(k, generator=g)[:n_salient].sort().values
    resid = torch.randn(n, n_salient, generator=g) * magnitude * 4
    d = PackedDelta.build((n, k), codes.to(torch.uint8), scales, zeros, bits, group_size,
                          symmetric, idx, resid)  # fmt: skip
    return to_device(d)


def to_device(d: PackedDelta) -> PackedDelta:
    def mv(t):
        return None if t is None else t.to(DEVICE)

    return PackedDelta(d.shape, d.bits, d.group_size, d.symmetric, d.scale_exp,
                       [p.to(DEVICE) for p in d.planes], d.scales.to(DEVICE), mv(d.zeros),
                       mv(d.salient_idx), mv(d.salient_cols))  # fmt: skip


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def run(x, row_slot, deltas, cfg=SMALL, out=None, triton_align=False):
    table = DeltaTable.build(deltas)
    groups = RowGroups.build(row_slot, len(deltas), cfg.block_m, use_triton=triton_align)
    return delta_matmul(x, table, groups, out, cfg)


def slots(t, n_slots, seed, base_rows=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, n_slots, (t,), generator=g)
    if base_rows:
        s[::4] = -1
    return s.to(DEVICE)


def test_reference_equals_dense_dequantize():
    """Sanity check of the oracle by an independent formula: x · dequantize()ᵀ."""
    deltas = [make_delta(37, 100, b, 32, b == 1, s, seed=b) for b, s in ((2, 5), (1, 0), (4, 9))]
    x = torch.randn(19, 100, device=DEVICE)
    row_slot = slots(19, 3, 0)
    ref = delta_matmul_reference(x, row_slot, deltas)
    for s, d in enumerate(deltas):
        rows = row_slot == s
        assert rel_err(ref[rows], x[rows] @ d.dequantize().T) < 1e-5
    assert torch.count_nonzero(ref[row_slot < 0]) == 0


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("salient", ["none", "mixed"])
def test_matches_reference(bits, symmetric, salient):
    """Odd N and K (37, 100; K_pad 128, groups of 32), 4 slots with different scale_exp and S
    (0, 3, 20 > BLOCK_S, 7); slot 3 has no rows; every 4th row is base only."""
    n, k, t = 37, 100, 23
    sal = (0, 3, 20, 7) if salient == "mixed" else (0, 0, 0, 0)
    deltas = [make_delta(n, k, bits, 32, symmetric, s, seed=10 * bits + i, magnitude=16.0**-i)
              for i, s in enumerate(sal)]  # fmt: skip
    assert len({d.scale_exp for d in deltas}) == 4
    x = torch.randn(t, k, device=DEVICE)
    row_slot = slots(t, 3, bits)
    out = run(x, row_slot, deltas)
    ref = delta_matmul_reference(x, row_slot, deltas)
    for s in range(3):  # per slot: their magnitudes differ by 16x each
        rows = row_slot == s
        assert rel_err(out[rows], ref[rows]) < TOL[torch.float32], f"slot {s}"
    assert torch.count_nonzero(out[row_slot < 0]) == 0


def test_one_row():
    deltas = [make_delta(37, 100, 2, 32, False, 4, seed=s) for s in range(3)]
    x = torch.randn(1, 100, device=DEVICE)
    row_slot = torch.tensor([2], device=DEVICE)
    out = run(x, row_slot, deltas)
    assert rel_err(out, delta_matmul_reference(x, row_slot, deltas)) < TOL[torch.float32]


@pytest.mark.parametrize("triton_align", [False, True])
def test_all_rows_on_one_slot_even_k(triton_align):
    """T = 40 (not a multiple of BLOCK_M), K = 128 in 64-wide tiles (no K masks); the Triton
    alignment pads blocks past the end with slot n_slots, which programs skip."""
    deltas = [make_delta(48, 128, 3, 64, False, 6, seed=s) for s in range(3)]
    x = torch.randn(40, 128, device=DEVICE)
    row_slot = torch.full((40,), 1, device=DEVICE)
    cfg = DeltaConfig(16, 32, 64)
    out = run(x, row_slot, deltas, cfg, triton_align=triton_align)
    assert rel_err(out, delta_matmul_reference(x, row_slot, deltas)) < TOL[torch.float32]


def test_base_only_rows_stay_exactly_as_they_were():
    deltas = [make_delta(37, 100, 4, 32, False, 3, seed=s) for s in range(2)]
    x = torch.randn(30, 100, device=DEVICE)
    row_slot = slots(30, 2, 5)
    before = torch.randn(30, 37, device=DEVICE)
    out = run(x, row_slot, deltas, out=before.clone())
    base = row_slot < 0
    assert torch.equal(out[base], before[base])
    ref = before + delta_matmul_reference(x, row_slot, deltas)
    assert rel_err(out[~base], ref[~base]) < TOL[torch.float32]
    none = torch.full((30,), -1, device=DEVICE)
    assert torch.equal(run(x, none, deltas, out=before.clone()), before)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_fp16_input(out_dtype):
    """fp16 x with fp16 integer tiles: the products are exact, accumulation fp32. An fp16 out
    adds one rounding of the sum (2^-11 relative), hence its looser bound."""
    deltas = [make_delta(37, 100, 2, 32, False, s, seed=s) for s in (0, 5, 18)]
    x = torch.randn(21, 100, device=DEVICE).half()
    row_slot = slots(21, 3, 7)
    out = torch.zeros(21, 37, device=DEVICE, dtype=out_dtype)
    out = run(x, row_slot, deltas, out=out)
    ref = delta_matmul_reference(x, row_slot, deltas)
    assert out.dtype == out_dtype
    for s in range(3):
        rows = row_slot == s
        tol = TOL[torch.float16] if out_dtype == torch.float32 else 1e-3
        assert rel_err(out[rows], ref[rows]) < tol


def test_bitdelta_one_group_per_row():
    """BitDelta: 1 bit, symmetric, group_size = K = 100 (not a multiple of 32): one 128-wide
    tile covers the row and its padding words beyond K_pad are masked."""
    deltas = [make_delta(20, 100, 1, 100, True, 0, seed=s) for s in range(2)]
    x = torch.randn(9, 100, device=DEVICE)
    row_slot = slots(9, 2, 1)
    out = run(x, row_slot, deltas, DeltaConfig(16, 16, 128))
    assert rel_err(out, delta_matmul_reference(x, row_slot, deltas)) < TOL[torch.float32]


def test_table_and_launcher_checks():
    d = make_delta(37, 100, 2, 32, False, 3, seed=0)
    with pytest.raises(ValueError, match="slot 1: .*one table holds one format"):
        DeltaTable.build([d, make_delta(37, 100, 3, 32, False, 3, seed=1)])
    with pytest.raises(ValueError, match="slot 1: delta of shape"):
        DeltaTable.build([d, PackedDelta.stack([d, d])])
    with pytest.raises(ValueError, match="slot 0: no delta"):
        DeltaTable.build([None, d])
    table = DeltaTable.build([d, d])
    assert table.ptrs.shape == (2, 6) and table.ptrs[0, 1] == 0  # 2 bits: one plane
    row_slot = torch.tensor([0, 1, -1], device=DEVICE)
    groups = RowGroups.build(row_slot, 2, 16)
    x = torch.randn(3, 100, device=DEVICE)
    with pytest.raises(ValueError, match="x must be"):
        delta_matmul(x[:, :99], table, groups, config=SMALL)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        delta_matmul(x.double(), table, groups, config=SMALL)
    with pytest.raises(ValueError, match="contiguous"):
        delta_matmul(torch.randn(100, 3, device=DEVICE).T, table, groups, config=SMALL)
    with pytest.raises(ValueError, match="block_m=32"):
        delta_matmul(x, table, groups, config=DeltaConfig(32, 16, 32))
    with pytest.raises(ValueError, match="must divide group_size"):
        delta_matmul(x, table, groups, config=DeltaConfig(16, 16, 64))
    with pytest.raises(ValueError, match="row groups of 3 rows"):
        delta_matmul(x[:2], table, groups, config=SMALL)
    with pytest.raises(ValueError, match="must lie in"):
        RowGroups.build(torch.tensor([0, 2]), 2, 16)
    with pytest.raises(ValueError, match="a power of two"):
        DeltaConfig(16, 16, 16)


def test_auto_reference_path_adds_and_skips_missing_deltas():
    d0, d2 = (make_delta(37, 100, 2, 32, False, 3, seed=s) for s in (0, 2))
    x = torch.randn(6, 100)
    row_slot = torch.tensor([0, 1, 2, -1, 2, 1])
    cpu = [PackedDelta(d.shape, d.bits, d.group_size, d.symmetric, d.scale_exp,
                       [p.cpu() for p in d.planes], d.scales.cpu(), d.zeros.cpu(),
                       d.salient_idx.cpu(), d.salient_cols.cpu()) for d in (d0, d2)]  # fmt: skip
    deltas = [cpu[0], None, cpu[1]]
    out = torch.ones(6, 37)
    delta_matmul_auto(x, row_slot, deltas, out)
    assert torch.equal(out[[1, 3, 5]], torch.ones(3, 37))
    assert rel_err(out[0], 1 + cpu[0].matmul_reference(x[:1])[0]) < 1e-6


def test_config_heuristic():
    """Decode: 16-row blocks and enough N blocks for ~2 programs per SM; prefill: 64 rows."""
    assert pick_block_m(32, 16) == 16 and pick_block_m(2048, 4) == 64 and pick_block_m(1, 8) == 16
    cfg = delta_config(4096, 4096, 128, 16, 18)
    assert cfg.block_m == 16 and 18 * 4096 // cfg.block_n >= 2 * SMS
    assert delta_config(4096, 4096, 128, 16, 1).block_n == 32
    assert delta_config(4096, 4096, 128, 16, 1, sms=32).block_n == 64  # a smaller GPU's SMs
    assert delta_config(4096, 4096, 128, 64, 40).block_m == 64
    assert delta_config(4096, 4096, 4096, 16, 1).block_k == 64  # BitDelta: one group
    assert delta_config(4096, 4096, 96, 16, 1).block_k == 32


@pytest.mark.gpu
@pytest.mark.parametrize("t, n_slots", [(32, 16), (2048, 4)])
@pytest.mark.parametrize("n, k", [(4096, 4096), (1024, 14336)])
def test_bf16_mistral_shapes_on_gpu(t, n_slots, n, k):
    """bf16 x: integer tiles and split salient columns are exact in bf16, so only fp32
    summation order differs from the fp32 reference (with tf32 off, as torch defaults)."""
    sal = [0 if s % 3 == 0 else 41 + s for s in range(n_slots)]
    deltas = [make_delta(n, k, 2, 128, False, s, seed=i, magnitude=2.0**-i)
              for i, s in enumerate(sal)]  # fmt: skip
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    row_slot = slots(t, n_slots, 3)
    ref = delta_matmul_reference(x, row_slot, deltas)
    before = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
    out = delta_matmul_auto(x, row_slot, deltas, before.clone())
    base = row_slot < 0
    assert torch.equal(out[base], before[base])
    fp32 = delta_matmul_auto(x, row_slot, deltas)
    for s in range(n_slots):
        rows = row_slot == s
        if rows.any():
            assert rel_err(fp32[rows], ref[rows]) < 1e-4, f"slot {s}"
            # into a bf16 out: the sum before + delta rounds once to bf16 (2^-8 relative)
            want = (before[rows].float() + ref[rows]).bfloat16().float()
            assert rel_err(out[rows].float(), want) < 1e-2, f"slot {s} (bf16 out)"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(37, 100, 32, 5), (16, 352, 128, 0), (20, 100, 100, 3)])
def test_cpu_packed_matmul_matches_reference(bits, symmetric, shape):
    """The engine's lean CPU path against PackedDelta.matmul_reference: odd N and K, a partial
    last group (352 = 2·128 + 96), one group per row (BitDelta, K = 100), with and without
    salient channels. The same fp32 operations in the same order: equal to float rounding."""
    from expertswitch.kernels.delta_cpu import packed_matmul

    n, k, group, n_sal = shape
    d = make_delta(n, k, bits, group, symmetric, n_sal, seed=bits)
    for rows in (1, 7):
        x = torch.randn(rows, k, device=DEVICE)
        ref = d.matmul_reference(x)
        assert rel_err(packed_matmul(x, d), ref) < 1e-6


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(48, 128, 32, 5), (16, 352, 128, 0), (32, 512, 256, 7),
                                   (64, 200, 64, 2)])  # fmt: skip
def test_cpu_int4_form_matches_reference(bits, symmetric, shape):
    """torch's CPU int4 matmul on the repacked codes (kernels/delta_cpu.to_int4) against
    PackedDelta.matmul_reference: every code width it takes, partial last groups (352, 200),
    salient channels, a large and a tiny scale_exp. bf16 activations and steps: ~2^-8."""
    from expertswitch.kernels.delta_cpu import int4_available, int4_matmul, to_int4

    if DEVICE != "cpu" or not int4_available():
        pytest.skip("torch's CPU int4 matmul")
    n, k, group, n_sal = shape
    for magnitude in (1e-3, 40.0):
        d = make_delta(n, k, bits, group, symmetric, n_sal, seed=bits, magnitude=magnitude)
        form = to_int4(d)
        assert form is not None
        for rows in (1, 9):
            x = torch.randn(rows, k)
            assert rel_err(int4_matmul(x, form), d.matmul_reference(x)) < 1e-2


def test_cpu_int4_form_refuses_what_the_kernel_cannot_take():
    from expertswitch.kernels.delta_cpu import int4_available, to_int4

    if DEVICE != "cpu" or not int4_available():
        pytest.skip("torch's CPU int4 matmul")
    assert to_int4(make_delta(16, 128, 8, 32, False, 0, seed=0)) is None  # 8-bit codes
    assert to_int4(make_delta(40, 128, 2, 32, False, 0, seed=0)) is None  # N not by 16
    assert to_int4(make_delta(16, 1024, 2, 1024, True, 0, seed=0)) is None  # BitDelta's row


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 128])
def test_tensor_parallel_slices_through_the_kernel(bits, group):
    """Experts served under tensor parallelism hand the kernel their slices: a rank's rows
    (column-parallel layers) and whole groups of input channels (row-parallel layers, the
    salient channels inside renumbered, some slices with none; with group 128 = K one group
    per row, cut to 32 channels). The kernel on the slices equals the reference on the same
    slices, and that equals the slice of the whole delta's product (the dense oracle)."""
    whole = [make_delta(40, 128, bits, group, s == 1, 5 * s, seed=s) for s in range(3)]
    x = torch.randn(9, 128, device=DEVICE)
    row_slot = torch.tensor([0, 1, 2, -1, 0, 2, 1, 1, 0], device=DEVICE)
    for lo, hi in [(0, 32), (32, 64), (96, 128)]:
        for fmt in ([0, 2], [1]):  # one table holds one format (symmetric or not)
            parts = [whole[i].cols(lo, hi) for i in fmt]
            rs = torch.tensor([fmt.index(s) if s in fmt else -1 for s in row_slot.tolist()],
                              device=DEVICE)  # fmt: skip
            out = run(x[:, lo:hi].contiguous(), rs, parts)
            ref = delta_matmul_reference(x[:, lo:hi], rs, parts)
            assert rel_err(out, ref) < TOL[torch.float32]
            dense = [whole[i].dequantize()[:, lo:hi] for i in fmt]
            none = torch.zeros(40, device=DEVICE)  # base-only rows
            oracle = torch.stack([x[r, lo:hi] @ dense[s].T if s >= 0 else none
                                  for r, s in enumerate(rs.tolist())])  # fmt: skip
            assert rel_err(ref, oracle) < 1e-5
    for lo, hi in [(0, 20), (20, 40)]:
        parts = [whole[i].rows(lo, hi) for i in (0, 2)]
        rs = torch.tensor([{0: 0, 2: 1}.get(s, -1) for s in row_slot.tolist()], device=DEVICE)
        full = delta_matmul_reference(x, rs, [whole[0], whole[2]])
        assert rel_err(run(x, rs, parts), full[:, lo:hi]) < TOL[torch.float32]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(37, 100, 32), (16, 352, 128), (20, 100, 100)])
def test_cpu_stacked_experts_match_the_reference_row_by_row(bits, symmetric, shape):
    """The CPU path that stacks several experts' deltas of a weight (one dequantization pass,
    one batched matmul; models/layers._add_stacked) against each row's own expert's
    PackedDelta.matmul_reference: experts with different salient counts (none included) and
    scale_exps, base-only rows left exactly as they were, rows in any order, an output wider
    than the weight (a larger vocabulary), an expert of another format or without the weight
    beside them, and rows spread too unevenly to stack (the per-expert path)."""
    from expertswitch.models import layers
    from expertswitch.models.context import ExpertBatch
    from expertswitch.models.expert_weights import ExpertWeights

    if DEVICE != "cpu":
        pytest.skip("the CPU path")
    n, k, group = shape
    deltas = [make_delta(n, k, bits, group, symmetric, sal, seed=10 * bits + i,
                         magnitude=2.0**-i) for i, sal in enumerate((3, 0, 5, 1))]  # fmt: skip
    other = make_delta(n, k, 1 if bits != 1 else 2, group, symmetric, 2, seed=99)
    experts = [ExpertWeights(f"e{i}", None, {"w": d}) for i, d in enumerate(deltas)]
    experts += [ExpertWeights("other", None, {"w": other}), ExpertWeights("none", None, {})]
    owner = [*deltas, other, None]
    g = torch.Generator().manual_seed(bits)
    cases = (
        (23, None),
        (9, [0, 1, 2, 3, 4, 5, -1, 2, 0]),
        (13, [0] * 10 + [1, 2, -1]),
        (6, [2, 0, 2, 0, -1, 4]),
        (5, [3, 1, 1, 3, 5]),
    )  # (only some of the format's)
    tables: dict = {}  # the runner's, kept across steps while the same experts are active
    for t, spread in cases:
        row_slot = torch.randint(-1, len(experts), (t,), generator=g) if spread is None \
            else torch.tensor(spread)  # fmt: skip
        x = torch.randn(t, k, generator=g)
        eb = ExpertBatch.build(experts, row_slot)
        eb.tables = tables
        calls = []
        real = layers.StackedDeltas.bmm
        layers.StackedDeltas.bmm = lambda self, xg, calls=calls, real=real: (
            calls.append(xg.shape) or real(self, xg))  # fmt: skip
        before = torch.randn(t, n + 3, generator=g)
        try:  # into zeros (the delta term alone, to fp32 rounding), then added into y
            zero, y = torch.zeros(t, n + 3), before.clone()
            layers.add_deltas(zero, x, eb, "w")
            layers.add_deltas(y, x, eb, "w")
        finally:
            layers.StackedDeltas.bmm = real
        # (the third case: 10 rows beside 1 and 1 would pad 12 to 30: per expert instead)
        assert calls if spread != cases[2][1] else not calls
        # one stack for the format, whichever experts each batch's rows use (beside it, the
        # formats of each set of experts whose rows a batch had)
        assert [key[0] for key in tables if key[0] != "stack-keys"] == ["stacked"]
        assert torch.equal(y, before + zero)
        for r in range(t):
            s = int(row_slot[r])
            d = owner[s] if s >= 0 else None
            if d is None:  # base only, or an expert without this weight: untouched
                assert not zero[r].any(), (t, r, s)
                continue
            assert not zero[r, n:].any()
            assert rel_err(zero[r, :n], d.matmul_reference(x[r : r + 1])[0]) < 1e-5, (t, r, s)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(37, 100, 32), (50, 64, 64)])
def test_embedding_delta_rows_equal_the_dense_delta_rows(bits, symmetric, shape):
    """models/layers.delta_rows (a quantized embedding's rows for the looked-up ids, from
    those rows' packed parts only) against rows of PackedDelta.dequantize: repeated ids, ids
    in any order, with salient channels and without."""
    from expertswitch.models.layers import delta_rows

    n, k, group = shape
    for n_salient in (0, 4):
        d = make_delta(n, k, bits, group, symmetric, n_salient, seed=bits + n_salient)
        dense = d.dequantize()
        idx = torch.tensor([3, 0, n - 1, 3, 17, 17, 5], device=d.scales.device)
        got = delta_rows(d, idx)
        assert got.shape == (len(idx), k) and got.dtype == torch.float32
        assert torch.allclose(got, dense.index_select(0, idx), rtol=1e-6, atol=0), n_salient


@pytest.mark.parametrize("bits", [2, 8])
def test_cpu_stacked_experts_on_even_runs_take_views(bits, monkeypatch):
    """A decode step with as many sequences per expert, rows sorted by slot (the runner's
    order): the stacked path reads the experts' rows as one view and adds into one slice,
    with no gather (forced: the gathering helper raises). Each row equals its own expert's
    PackedDelta.matmul_reference, base rows and rows of an expert of another format stay as
    they were; uneven runs, or runs with another format's rows between them, still take
    the gather."""
    from expertswitch.models import layers
    from expertswitch.models.context import ExpertBatch
    from expertswitch.models.expert_weights import ExpertWeights

    if DEVICE != "cpu":
        pytest.skip("the CPU path")
    n, k = 48, 100
    deltas = [make_delta(n, k, bits, 32, False, sal, seed=bits + i, magnitude=2.0**-i)
              for i, sal in enumerate((3, 0, 5))]  # fmt: skip
    other = make_delta(n, k, 1, 32, True, 2, seed=7)
    owner = [deltas[0], other, deltas[1], deltas[2]]  # slot 1: another format
    experts = [ExpertWeights(f"e{i}", None, {"w": d}) for i, d in enumerate(owner)]
    g = torch.Generator().manual_seed(0)
    real = layers._padded_rows
    for slots, gathered in (([-1, -1, 0, 0, 2, 2, 3, 3], False),
                            ([-1, 0, 0, 0, 1, 2, 2, 2, 3, 3, 3], True),  # runs apart
                            ([0, 0, 0, 2, 2, 2, 3, 3, 3], False),
                            ([0, 0, 2, 3, 3], True)):  # fmt: skip
        used = []
        monkeypatch.setattr(layers, "_padded_rows", lambda eb, s, real=real, used=used: (
            used.append(s) or real(eb, s)))  # fmt: skip
        eb = ExpertBatch.from_host(experts, slots, "cpu")
        assert eb.ranges is not None
        x = torch.randn(len(slots), k, generator=g)
        before = torch.randn(len(slots), n + 2, generator=g)
        y = before.clone()
        layers.add_deltas(y, x, eb, "w")
        assert bool(used) == gathered, slots
        for r, s in enumerate(slots):
            if s < 0:
                assert torch.equal(y[r], before[r])
                continue
            want = owner[s].matmul_reference(x[r : r + 1])[0]
            assert rel_err(y[r, :n] - before[r, :n], want) < 1e-5, (slots, r)
            assert torch.equal(y[r, n:], before[r, n:])


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_cpu_stack_stores_code_minus_zero_below_8_bits(bits, symmetric):
    """Below 8 bits a stack holds each code minus its zero point (twice it, symmetric) and
    needs no offset term; 8-bit codes, and zero points past the code range (a damaged
    archive's), are centred with a per-group offset instead. Each way, every expert's rows
    equal its PackedDelta.matmul_reference (one group per row, and several with a partial
    last one)."""
    from expertswitch.kernels.delta_cpu import StackedDeltas

    if DEVICE != "cpu":
        pytest.skip("the CPU path")
    g = torch.Generator().manual_seed(bits)
    for n, k, group in ((24, 64, 64), (24, 100, 32)):
        deltas = [make_delta(n, k, bits, group, symmetric, sal, seed=bits + i, magnitude=2.0**-i)
                  for i, sal in enumerate((2, 0, 3))]  # fmt: skip
        stacks = [(StackedDeltas.build(deltas), deltas, bits == 8)]
        if not symmetric and bits < 8:  # zero points past the codes: the offset form again
            damaged = [copy.copy(d) for d in deltas]
            damaged[1].zeros = torch.full_like(deltas[1].zeros, 200)
            stacks.append((StackedDeltas.build(damaged), damaged, True))
        for stack, ds, offsets in stacks:
            assert stack.codes.dtype == torch.int8
            assert (stack.offsets is not None) == offsets
            x = torch.randn(len(ds), 5, k, generator=g)
            y = stack.bmm(x)
            for e, d in enumerate(ds):
                assert rel_err(y[e], d.matmul_reference(x[e])) < 1e-5, (n, k, e, offsets)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_cpu_concatenated_stack_equals_each_weight_alone(bits, symmetric):
    """StackedDeltas.concat (q, k and v of the same experts as one stack, models/layers
    .FusedLinears): each expert's output columns are, weight by weight, that weight's
    PackedDelta.matmul_reference — salient channels in some weights only (each weight's own
    columns, zeros in the others'), a stack with offsets (a damaged zero point) beside ones
    without, one group per row and several with a partial last one. Stacks of another input
    size are refused."""
    from expertswitch.kernels.delta_cpu import StackedDeltas

    if DEVICE != "cpu":
        pytest.skip("the CPU path")
    g = torch.Generator().manual_seed(bits)
    for k, group in ((64, 64), (100, 32)):
        weights = []
        for w, (n, sal) in enumerate(((24, (2, 0, 3)), (12, (0, 0, 0)), (12, (1, 4, 0)))):
            weights.append(
                [
                    make_delta(
                        n, k, bits, group, symmetric, s, seed=100 * w + i, magnitude=2.0 ** -(i + w)
                    )
                    for i, s in enumerate(sal)
                ]
            )
        if not symmetric and bits < 8:  # the middle weight's stack with offsets
            weights[1] = [copy.copy(d) for d in weights[1]]
            weights[1][2].zeros = torch.full_like(weights[1][2].zeros, 200)
        stacks = [StackedDeltas.build(ds) for ds in weights]
        fused = StackedDeltas.concat(stacks)
        assert fused.codes.shape[-1] == 48
        x = torch.randn(3, 5, k, generator=g)
        y = fused.bmm(x)
        for e in range(3):
            want = torch.cat([ds[e].matmul_reference(x[e]) for ds in weights], dim=1)
            assert rel_err(y[e], want) < 1e-5, (k, e)
    other = StackedDeltas.build([make_delta(8, 32, bits, 32, symmetric, 0, seed=i)
                                 for i in range(3)])  # fmt: skip
    with pytest.raises(ValueError, match="output channels"):
        StackedDeltas.concat([stacks[0], other])


def _fused_fixture(bias: bool, bits: int = 2):
    """q, k, v MultiExpertLinears of one input size, fused, and experts storing all three as
    deltas (beside them: one leaves v out, one q, one stores k in another format, one
    replaces k exactly)."""
    from expertswitch.models.expert_weights import ExpertWeights
    from expertswitch.models.layers import FusedLinears, MultiExpertLinear

    g = torch.Generator().manual_seed(bits)
    k = 40
    sizes = {"q.weight": 16, "k.weight": 8, "v.weight": 8}
    members = [MultiExpertLinear(name, torch.randn(n, k, generator=g),
                                 torch.randn(n, generator=g) if bias else None)
               for name, n in sizes.items()]  # fmt: skip

    def deltas(seed, fmt=bits):
        return {name: make_delta(n, k, fmt, 32, False, 2 * i, seed=seed + i, magnitude=2.0**-i)
                for i, (name, n) in enumerate(sizes.items())}  # fmt: skip

    alike = [ExpertWeights(f"e{i}", None, deltas(10 * i)) for i in range(3)]
    partial, no_q = deltas(40), deltas(45)
    del partial["v.weight"], no_q["q.weight"]
    odd = deltas(50)
    odd["k.weight"] = make_delta(8, k, 4 if bits != 4 else 2, 32, False, 1, seed=55)
    exact = ExpertWeights("exact", None, deltas(60), {"k.weight": torch.randn(8, k, generator=g)})
    # an expert with its own k bias (Qwen2's fine-tunes change them): fused, its bias per row
    own = ExpertWeights("own bias", None, deltas(80), {"k.bias": torch.randn(8, generator=g)})
    others = {"partial": ExpertWeights("partial", None, partial),
              "no q": ExpertWeights("no q", None, no_q),
              "format": ExpertWeights("format", None, odd), "exact": exact}  # fmt: skip
    originals = [m.weight.clone() for m in members]
    return FusedLinears(members), members, originals, alike + [own], others, k


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("bits", [2, 8])
def test_fused_linears_equal_each_linear_alone(bias, bits, monkeypatch):
    """models/layers.FusedLinears (q, k, v as one matmul and one concatenated delta stack)
    against each row computed from the member's base weight, its bias and its expert's
    PackedDelta.matmul_reference: rows sorted by expert (the runner's order: views), in any
    order (gathered), base-only rows, some of the experts only, an expert's own bias on its
    rows. Member weights become views
    of the fused weight (no second copy). Steps it cannot fuse run member by member (None):
    an expert leaving a member out, storing one in another format, or replacing one exactly;
    FUSE_LINEARS off. An active set with deltas of another format among its experts runs
    member by member."""
    from expertswitch.models import layers
    from expertswitch.models.context import ExpertBatch
    from expertswitch.models.expert_weights import ExpertWeights

    if DEVICE != "cpu":
        pytest.skip("the CPU path")
    fused, members, originals, experts, others, k = _fused_fixture(bias, bits)
    for m, w in zip(members, originals):
        assert torch.equal(m.weight, w)
        assert fused.weight.untyped_storage().data_ptr() == m.weight.untyped_storage().data_ptr()
    g = torch.Generator().manual_seed(1)
    tables: dict = {}
    for slots, sorted_rows in (([-1, 0, 0, 1, 1, 2, 2], True), ([2, -1, 0, 2, 1, 0], False),
                               ([0, 0, 2, 2], True), ([1, -1, 1], False),
                               ([-1, 0, 0, 3, 3], True), ([3, 1, -1], False)):  # fmt: skip
        if sorted_rows:
            eb = ExpertBatch.from_host(experts, slots, "cpu")
        else:
            eb = ExpertBatch.build(experts, torch.tensor(slots))
        eb.tables = tables
        x = torch.randn(len(slots), k, generator=g)
        out = fused(x, eb)
        assert out is not None, slots
        outs = out.split(fused.sizes, dim=1)
        for m, w, y in zip(members, originals, outs):
            for r, s in enumerate(slots):
                bias = m.bias
                if s >= 0 and m.bias is not None and m.bias_name in experts[s].exact:
                    bias = experts[s].exact[m.bias_name]  # (its own)
                want = x[r] @ w.T + (0 if bias is None else bias)
                if s >= 0:
                    want = want + experts[s].deltas[m.name].matmul_reference(x[r : r + 1])[0]
                assert rel_err(y[r], want) < 1e-5, (slots, m.name, r)
    for name, ex in others.items():
        eb = ExpertBatch.from_host([experts[0], ex], [0, 1, 1], "cpu")
        assert fused(torch.randn(3, k, generator=g), eb) is None, name
        # its rows absent: the others fuse, unless a format differs (the set runs unfused)
        alone = ExpertBatch.from_host([experts[0], ex], [0, 0, -1], "cpu")
        assert (fused(torch.randn(3, k, generator=g), alone) is None) == (name == "format")
        only = ExpertBatch.from_host([ex], [-1, 0], "cpu")  # its rows beside base rows only
        assert (fused(torch.randn(2, k, generator=g), only) is None) == (name != "format")
    # every expert storing k in other bits and symmetry than q and v: one stack still
    other = 4 if bits != 4 else 2
    mixed = [ExpertWeights(e.name, None, {**e.deltas, "k.weight": make_delta(
        8, k, other, 32, True, 1, seed=70 + i)}) for i, e in enumerate(experts)]  # fmt: skip
    x = torch.randn(4, k, generator=g)
    out = fused(x, ExpertBatch.from_host(mixed, [0, 1, 2, 2], "cpu"))
    assert out is not None
    kw = out.split(fused.sizes, dim=1)[1]
    for r, s in enumerate([0, 1, 2, 2]):
        want = x[r] @ originals[1].T + (0 if members[1].bias is None else members[1].bias)
        want = want + mixed[s].deltas["k.weight"].matmul_reference(x[r : r + 1])[0]
        assert rel_err(kw[r], want) < 1e-5, r
    monkeypatch.setattr(layers, "FUSE_LINEARS", False)
    assert fused(torch.randn(2, k), ExpertBatch.from_host(experts, [0, 1], "cpu")) is None
    # weights larger than those whose deltas stack are not fused (their copy costs memory)
    big = [layers.MultiExpertLinear(f"{n}.weight", torch.zeros(600, 512)) for n in "ab"]
    assert layers.FusedLinears.of(big) is None
    assert layers.FusedLinears.of([m for m in members[:2]]) is not None
