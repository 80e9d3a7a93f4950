"""`torchrun --nproc-per-node N -m expertswitch.train --config RUN.yaml`: the `expertswitch
train` command, one process per rank (data parallel; gloo on CPU, NCCL on GPUs)."""

import sys

from expertswitch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
