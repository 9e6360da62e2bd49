"""``python -m distill`` (and ``torchrun -m distill fit ...`` for DistributedDataParallel)."""

from distill.cli.app import main

main()
