"""Compute kernels: each Triton kernel sits with its launcher and a pure-torch reference, which is
also the CPU path. Nothing here imports from the packages above (moe, models, engine)."""
