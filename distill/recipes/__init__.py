"""The jobs, each read top to bottom: fit (distillation), teacher cache, perplexity, probe, evaluate, finetune, index
build, annotate, and the sweep over all of them. They take model specs and bundles and use ``distill.inference``."""
