"""The paged decode kernel against its reference and against dense SDPA over gathered keys.
Without a GPU it runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), which cannot
load bf16: bf16 is covered by the gpu-marked test."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from expertswitch.kernels.moe_config import SMS  # noqa: E402
from expertswitch.kernels.paged_attention import (  # noqa: E402
    DecodeConfig,
    _combine_splits_kernel,
    _paged_decode_kernel,
    combine_launch,
    decode_config,
    decode_launch,
    paged_decode,
    paged_decode_auto,
    paged_decode_reference,
)
from expertswitch.models.attention import PaddedLayout, paged_attention  # noqa: E402
from expertswitch.models.context import AttentionBatch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 in the interpreter is exact fp32 math (only the online softmax's order differs); on a
# GPU tl.dot takes fp32 operands as tf32 only if torch allows it (it does not by default).
# fp16: P is rounded to fp16 before P·V (2^-11 relative per weight) and the output once more.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def make_paged(lens, block_size, kv_heads, d, dtype, seed, pad=-1):
    """Caches whose blocks are handed out in shuffled order, with spare blocks and pad columns
    in the table (value `pad`: None = stale but valid ids). Every slot no sequence owns — past
    a length inside its last block, spare blocks — holds NaN: a read of it shows."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    n_blocks = sum(need) + 3
    order = torch.randperm(n_blocks, generator=g)
    width = max(need) + 2
    if pad is None:
        table = torch.randint(0, n_blocks, (len(lens), width), generator=g)
    else:
        table = torch.full((len(lens), width), pad)
    shape = (n_blocks, block_size, kv_heads, d)
    k = torch.full(shape, float("nan"))
    v = torch.full(shape, float("nan"))
    start = 0
    for b, (n, m) in enumerate(zip(lens, need)):
        table[b, :m] = order[start : start + m]
        start += m
        i = torch.arange(n)
        flat = table[b, i // block_size] * block_size + i % block_size  # slots of its keys
        k.view(-1, kv_heads, d)[flat] = torch.randn(n, kv_heads, d, generator=g)
        v.view(-1, kv_heads, d)[flat] = torch.randn(n, kv_heads, d, generator=g)
    to = dict(device=DEVICE, dtype=dtype)
    return k.to(**to), v.to(**to), table.to(DEVICE), torch.tensor(lens, device=DEVICE)


def dense_oracle(q, k_cache, v_cache, table, lens, scale, window, softcap=None):
    """Independent of the reference: gather each sequence's keys token by token through its
    slot (block·block_size + offset) into a contiguous [H, n, D] in fp64, one SDPA call per
    sequence with an explicit boolean mask (causal, and the window)."""
    b, h, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    flat_k = k_cache.reshape(-1, kvh, d).double()
    flat_v = v_cache.reshape(-1, kvh, d).double()
    out = []
    for i, n in enumerate(lens.tolist()):
        j = torch.arange(n, device=q.device)
        slots = table[i, j // bs].long() * bs + j % bs
        keys = flat_k[slots].transpose(0, 1).repeat_interleave(h // kvh, 0)  # [H, n, D]
        vals = flat_v[slots].transpose(0, 1).repeat_interleave(h // kvh, 0)
        mask = j <= n - 1
        if window is not None:
            mask &= j > n - 1 - window
        if softcap is None:
            o = F.scaled_dot_product_attention(
                q[i].double()[:, None], keys, vals, attn_mask=mask[None, None], scale=scale
            )[:, 0]
        else:  # written out: cap·tanh(s / cap), then the mask and the softmax
            s = torch.einsum("hd,hnd->hn", q[i].double(), keys) * scale
            s = (torch.tanh(s / softcap) * softcap).masked_fill(~mask, float("-inf"))
            o = torch.einsum("hn,hnd->hd", torch.softmax(s, -1), vals)
        out.append(o)
    return torch.stack(out)


def check(lens, h, kvh, d, bs, dtype, window=None, configs=(None,), seed=0, pad=-1,
          softcap=None, qscale=1.0):  # fmt: skip
    k, v, table, kv_lens = make_paged(lens, bs, kvh, d, dtype, seed, pad)
    q = torch.randn(len(lens), h, d, generator=torch.Generator().manual_seed(seed + 1))
    q = (q * qscale).to(DEVICE, dtype)
    scale = d**-0.5
    ref = paged_decode_reference(q, k, v, table, kv_lens, scale, window, softcap)
    dense = dense_oracle(q, k, v, table, kv_lens, scale, window, softcap)
    tol = TOL[dtype]
    # the oracle in fp32 inputs agrees with the fp64 dense path to fp32 rounding
    torch.testing.assert_close(ref.double(), dense, atol=tol, rtol=tol)
    for cfg in configs:
        out = paged_decode(q, k, v, table, kv_lens, scale, window, config=cfg, softcap=softcap)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol, msg=str(cfg))
        torch.testing.assert_close(out.double(), dense, atol=tol, rtol=tol, msg=str(cfg))


NO_SPLIT, SPLIT = DecodeConfig(tile=16, splits=1), DecodeConfig(tile=16, splits=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h, kvh", [(2, 2), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("d, bs", [(16, 4), (32, 8), (64, 16)])
def test_matches_reference_and_dense(dtype, h, kvh, d, bs):
    """Batch 5: one key, exactly a block, a block + 1, and two long sequences (several 16-key
    tiles; with blocks of 4 and 8 a tile spans several blocks); split-K off and on (3 splits:
    the one-key sequence leaves two of them empty)."""
    lens = [1, bs, bs + 1, 3 * 16 + 5, 5 * bs + 3]
    check(lens, h, kvh, d, bs, dtype, configs=(NO_SPLIT, SPLIT), seed=h + d + bs)


@pytest.mark.parametrize("window", [1, 7, 16, 37, 38, 200])
@pytest.mark.parametrize("splits", [1, 4])
def test_sliding_window(window, splits):
    """Windows smaller than, equal to (37) and larger than the longest length, some starting
    mid-tile and mid-block; tiles left of the window are skipped."""
    lens = [1, 16, 17, 37, 30]
    cfg = DecodeConfig(tile=16, splits=splits)
    check(lens, 4, 2, 32, 8, torch.float32, window, configs=(cfg,), seed=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batch_one_long(dtype):
    """One sequence of 300 keys: the heuristic splits it (1·kv programs ≪ SMS); the default
    tile (32 keys, 8 blocks of 4) and forced single / many splits."""
    cfgs = (None, DecodeConfig(tile=32, splits=1), DecodeConfig(tile=16, splits=7))
    assert decode_config(1, 2, 300 // 4 + 2, 4).splits > 1
    check([300], 8, 2, 64, 4, dtype, configs=cfgs, seed=3)


@pytest.mark.parametrize("d", [12, 48, 80, 96, 100])
@pytest.mark.parametrize("splits", [1, 3])
def test_head_dims_not_powers_of_two(d, splits):
    """Phi-3-mini's 96, Phi-2's 80, OpenLLaMA's 100, and dims below 16: padded to a power of
    two inside the kernel (masked loads, zeros that add nothing, never stored), split or not."""
    lens = [1, 9, 40]
    cfg = DecodeConfig(tile=16, splits=splits)
    check(lens, 4, 2, d, 8, torch.float32, window=30, configs=(cfg,), seed=d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_soft_capped_scores(dtype):
    """Gemma 2's cap·tanh(s / cap) on the scores: queries scaled up so that scores reach
    tens, past a cap of 5 (tanh saturates: e^{2x} overflows to inf), with a window and
    split-K; without the cap the outputs differ."""
    lens = [1, 9, 40, 77]
    cfgs = (NO_SPLIT, SPLIT)
    check(lens, 8, 2, 32, 8, dtype, window=30, configs=cfgs, seed=4, softcap=5.0, qscale=30.0)
    k, v, table, kv_lens = make_paged(lens, 8, 2, 32, torch.float32, 4)
    q = torch.randn(4, 8, 32, device=DEVICE) * 30
    capped = paged_decode(q, k, v, table, kv_lens, 32**-0.5, config=SPLIT, softcap=5.0)
    plain = paged_decode(q, k, v, table, kv_lens, 32**-0.5, config=SPLIT)
    assert (capped - plain).abs().max() > 0.1
    with pytest.raises(ValueError, match="softcap=0"):
        paged_decode(q, k, v, table, kv_lens, 0.25, softcap=0)


def test_more_splits_than_tiles_and_window():
    """Splits past a sequence's tiles write empty partials (max −inf, sum 0) that the combine
    launch must weigh by zero."""
    check([1, 5, 40], 4, 4, 16, 16, torch.float32, window=6,
          configs=(DecodeConfig(tile=16, splits=8),), seed=9)  # fmt: skip


def test_stale_padding_int32_tables_and_out():
    """Pad columns hold stale but valid block ids; int32 tables and lengths; `out` is filled
    in place (a strided view whose last dim is contiguous)."""
    lens = [9, 1, 24]
    k, v, table, kv_lens = make_paged(lens, 8, 2, 32, torch.float32, 5, pad=None)
    q = torch.randn(3, 4, 32, device=DEVICE)
    ref = paged_decode_reference(q, k, v, table, kv_lens, 0.3)
    buf = torch.full((3, 6, 32), 7.0, device=DEVICE)
    out = buf[:, 1:5]
    got = paged_decode(q, k, v, table.int(), kv_lens.int(), 0.3, out=out, config=SPLIT)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(buf[:, 1:5], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(buf[:, [0, 5]], torch.full((3, 2, 32), 7.0, device=DEVICE))


def test_agrees_with_torch_paged_attention():
    """The engine's torch path (PaddedLayout + SDPA, q_len 1 per sequence) on the same cache."""
    lens, bs, window = [3, 16, 21], 8, 10
    k, v, table, kv_lens = make_paged(lens, bs, 2, 32, torch.float32, 2, pad=None)
    q = torch.randn(3, 4, 32, device=DEVICE)
    slots = torch.stack([table[b, (n - 1) // bs] * bs + (n - 1) % bs for b, n in enumerate(lens)])
    pos = torch.tensor(lens, device=DEVICE) - 1
    ab = AttentionBatch(slots, table, [1, 1, 1], lens, pos, pos + 1, bs)
    want = paged_attention(q, k.nan_to_num(), v.nan_to_num(), PaddedLayout.build(ab), window,
                           0.25).view(3, 4, 32)  # fmt: skip
    got = paged_decode(q, k, v, table, kv_lens, 0.25, window, config=NO_SPLIT)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_is_the_reference():
    k, v, table, kv_lens = make_paged([5, 12], 4, 1, 16, torch.float32, 1)
    q = torch.randn(2, 2, 16)
    if DEVICE == "cpu":
        ref = paged_decode_reference(q, k, v, table, kv_lens, 0.25, 4)
        assert torch.equal(paged_decode_auto(q, k, v, table, kv_lens, 0.25, 4), ref)


def test_split_heuristic():
    # Mistral decode at 32 sequences: 256 programs fill the SMs, no split
    assert decode_config(32, 8, 128, 16).splits == 1
    # one sequence: ~SMS programs, capped by 4 tiles per split
    cfg = decode_config(1, 8, 128, 16)
    assert cfg.tile == 32 and cfg.splits == min(-(-SMS // 8), 2048 // 32 // 4)
    assert decode_config(1, 8, 128, 16, sms=114).splits == -(-114 // 8)  # an H100 PCIe
    assert decode_config(1, 8, 8, 16).splits == 1  # 128 keys = 4 tiles: not worth a split
    assert decode_config(1, 8, 128, 16, window=64).splits == 1  # the window caps the work
    assert decode_config(2, 1, 4096, 16).splits == 32  # MAX_SPLITS
    assert decode_config(1, 8, 4, 128).tile == 128  # a tile is at least one block


def _inputs(b=2, h=4, kvh=2, d=16, bs=4, m=3, dtype=torch.float32):
    q = torch.randn(b, h, d, dtype=dtype)
    k = torch.randn(8, bs, kvh, d, dtype=dtype)
    return q, k, k.clone(), torch.zeros(b, m, dtype=torch.int64), torch.ones(b, dtype=torch.int64)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda a: (a[0].repeat(1, 1, 17), a[1].repeat(1, 1, 1, 17), a[2].repeat(1, 1, 1, 17)),
            "takes 1 to 256",
        ),  # D = 272
        (
            lambda a: (None, a[1].repeat(1, 3, 1, 1)[:, :12], a[2].repeat(1, 3, 1, 1)[:, :12]),
            "block_size=12",
        ),
        (lambda a: (a[0].half(),), "one dtype"),
        (lambda a: (a[0].int(), a[1].int(), a[2].int()), "one dtype"),
        (lambda a: (a[0][:, :3],), "divide the query heads"),
        (lambda a: (None, None, a[2][:7]), "caches must match"),
        (lambda a: (None, None, None, a[3].float()), "int32 or int64"),
        (lambda a: (None, None, None, a[3][:1]), r"block_tables must be \[2, M\]"),
        (lambda a: (None, None, None, None, a[4] * 0), r"kv_lens must lie in \[1, 12\]"),
        (lambda a: (None, None, None, None, a[4] * 13), r"kv_lens must lie in \[1, 12\]"),
        (lambda a: (None, None, None, a[3] - 1), "outside"),
        (lambda a: (None, None, None, None, a[4].to("meta")), "several devices"),
        (lambda a: (None, a[1].transpose(0, 1).contiguous().transpose(0, 1)), "contiguous"),
    ],
)
def test_launcher_rejects(change, match):
    args = list(_inputs())
    for i, new in enumerate(change(args)):
        if new is not None:
            args[i] = new
    with pytest.raises(ValueError, match=match):
        paged_decode(*args, 0.25)


def test_config_and_window_rejected():
    with pytest.raises(ValueError, match="tile=8"):
        DecodeConfig(tile=8)
    with pytest.raises(ValueError, match="splits=0"):
        DecodeConfig(splits=0)
    with pytest.raises(ValueError, match="window=0"):
        paged_decode(*_inputs(), 0.25, window=0)
    with pytest.raises(ValueError, match="out must be"):
        paged_decode(*_inputs(), 0.25, out=torch.empty(2, 4, 8))


@pytest.mark.parametrize("splits", [1, 3])
def test_unchecked_lengths_stay_inside_the_table(splits):
    """On a GPU the launcher cannot read kv_lens (no host sync): launched directly, a length of
    0 gives zeros and a length past the table reads only the table's blocks."""
    k, v, table, _ = make_paged([8, 8], 4, 1, 16, torch.float32, 4)
    table = table[:, :2].contiguous()  # exactly the 8 keys' blocks
    q = torch.randn(2, 2, 16, device=DEVICE)
    out = torch.full_like(q, 5.0)
    cfg = DecodeConfig(tile=16, splits=splits)
    parts = [torch.empty(2, 2, splits, *s, device=DEVICE) for s in ((16,), (), ())]
    grid, args, consts = decode_launch(q, k, v, table, torch.tensor([0, 50], device=DEVICE),
                                       out, parts, 0.25, None, cfg)  # fmt: skip
    _paged_decode_kernel[grid](**args, **consts)
    if splits > 1:
        grid, args, consts = combine_launch(parts, out, splits)
        _combine_splits_kernel[grid](**args, **consts)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    ref = paged_decode_reference(q, k, v, table, torch.tensor([8, 8], device=DEVICE), 0.25)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("b, window, splits", [(32, None, None), (32, 700, None),
                                               (32, None, 4), (1, None, None)])  # fmt: skip
def test_bf16_mistral_shape_on_gpu(b, window, splits):
    """H=32, kv=8, D=128, blocks of 16, lengths up to 2048; then captured in a CUDA graph and
    replayed with other lengths (no host synchronisation inside). bf16: P and the output are
    rounded to bf16 (2^-9 relative each)."""
    lens = torch.randint(1, 2049, (b,), generator=torch.Generator().manual_seed(b)).tolist()
    lens[0] = 2048
    k, v, table, kv_lens = make_paged(lens, 16, 8, 128, torch.bfloat16, seed=b)
    q = torch.randn(b, 32, 128, device="cuda", dtype=torch.bfloat16)
    cfg = None if splits is None else DecodeConfig(tile=32, splits=splits)
    ref = paged_decode_reference(q, k, v, table, kv_lens, 128**-0.5, window)
    out = paged_decode(q, k, v, table, kv_lens, 128**-0.5, window, config=cfg)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode(q, k, v, table, kv_lens, 128**-0.5, window, out=out, config=cfg)
    kv_lens.copy_((kv_lens - 7).clamp_min(1))
    graph.replay()
    ref = paged_decode_reference(q, k, v, table, kv_lens, 128**-0.5, window)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
