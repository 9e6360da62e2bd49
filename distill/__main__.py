"""``python -m distill`` (and ``torchrun -m distill fit ...`` for DistributedDataParallel)."""

from distill.cli import main

main()
