"""Making the drafts (the DAG's middle): self-distillation, fine-tuning, pruning.

- `distill`: the target answers the fine-tuning prompts (self-data distillation).
- `finetune`: dense and sparse fine-tuning with a fixed mask, one of the sweep's losses.
- `prune`: one-shot unstructured pruning with llm-compressor (SparseGPT or Wanda).
- `layer_prune`: the layer-pruned baseline (whole decoder layers dropped).
"""
