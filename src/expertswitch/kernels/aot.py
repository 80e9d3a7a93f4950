"""Compile a Triton kernel for an NVIDIA GPU on a machine without one (ahead of time).

Triton's wheel carries ptxas, so the whole pipeline (TTIR → TTGIR → LLVM IR → PTX → cubin) runs
on a CPU. That catches what the interpreter cannot — compile errors, shared memory over the
SM's budget, register spills — and shows what the GPU would run (wgmma or mma.sync, cp.async
pipelining, vector widths). Specialisation follows Triton's JIT: an int argument equal to 1
becomes a constant, ints and pointers divisible by 16 are marked so (tensors from the caching
allocator are 256-byte aligned), so the code compiled here is the code a launch would build.

    ck = compile_for_gpu(_moe_gemm_kernel, args, constexprs, num_warps=4, num_stages=3)
    ck.shared_bytes, ck.registers, ck.spill_bytes, ck.features()
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
        torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8"}  # fmt: skip
HOPPER = ("cuda", 90, 32)  # H100 / H200: sm_90, 32-thread warps
# 16-byte global→shared copies: what streaming weights at full bandwidth needs
_CP_ASYNC_16B = re.compile(r"cp\.async\.c[ga]\.shared\.global[^;]*\],\s*0x10")


@dataclass
class CompiledKernel:
    name: str
    asm: dict
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None

    def features(self) -> dict[str, int]:
        """Counts of instructions that say how the kernel will run."""
        ptx = self.asm.get("ptx", "")
        return {
            "wgmma": ptx.count("wgmma.mma_async"),
            "mma_sync": ptx.count("mma.sync"),
            "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            "cp_async_16B": len(_CP_ASYNC_16B.findall(ptx)),
            "tma_load": ptx.count("cp.async.bulk.tensor"),
            "ld_global_v4": len(re.findall(r"ld\.global[.\w]*\.v4", ptx)),
            "ld_global_scalar16": len(re.findall(r"ld\.global[.\w]*\.b16 ", ptx)),
        }


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout  # fmt: skip
    reg = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(local.group(1)) if local else None)


def compile_for_gpu(
    fn,
    args: dict,
    constexprs: dict | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    target: tuple[str, int, int] = HOPPER,
) -> CompiledKernel:
    """fn: a @triton.jit function; args: its runtime arguments by name (tensors stand for
    pointers: only dtype and alignment matter, a CPU tensor will do; TensorDescriptors for
    host-built TMA descriptors); constexprs: by name."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs or {})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name not in args:
            raise ValueError(f"{fn.__name__}: no value for argument {name!r}")
        v = args[name]
        if type(v).__name__ == "TensorDescriptor":  # a host-built TMA descriptor
            from triton.runtime.jit import mangle_type

            signature[name] = mangle_type(v)
        elif isinstance(v, torch.Tensor):
            signature[name] = _PTR[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{fn.__name__}: argument {name!r} must be a tensor or an int")
        elif v == 1:  # the JIT specialises 1 to a constant
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    consts = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget(*target),
                        options={"num_warps": num_warps, "num_stages": num_stages})  # fmt: skip
    regs, spills = _resources(ck.asm["cubin"])
    return CompiledKernel(fn.__name__, ck.asm, ck.metadata.shared, regs, spills)
