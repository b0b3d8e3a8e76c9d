"""Making the drafts (the DAG's middle): self-distillation, fine-tuning, pruning, quantization.

- `distill`: the target answers the fine-tuning prompts (self-data distillation).
- `finetune`: dense and sparse fine-tuning with a fixed mask, one of the sweep's losses.
- `prune`: one-shot pruning (SparseGPT or Wanda with llm-compressor, or by magnitude).
- `quantize`: weight-only quantization of a draft's decoder linears, its zeros held.
- `layer_prune`: the layer-pruned baseline (whole decoder layers dropped).
"""
