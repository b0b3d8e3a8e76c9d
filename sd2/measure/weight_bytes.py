"""Weight bytes a model reads per generated token: the cost that bounds batch-1 decoding.

Decoding one token multiplies the activations by every linear layer's weights once, so a
draft at batch 1 reads all of them from memory, and on today's hardware that read, not the
multiply-adds, takes the time. MACs (sd2.macs) count the non-zeros; bytes count what a
stored layout of those weights costs, zeros and indices included:

- `dense`: every weight, zeros too: numel x bits / 8.
- `bitmask`: one bit per position plus the non-zeros (compressed-tensors' bitmask layout):
  numel / 8 + nnz x bits / 8.
- `csr`: the non-zeros with a column index each (16 bits where in_features <= 65,536, else 32)
  and a 32-bit offset per row: nnz x (bits + index bits) / 8 + (rows + 1) x 4.

Each layer is counted in its smallest layout (a sparse store picks one per layer; at 50%
sparsity and 16 bits bitmask wins, CSR only pays from about 75%). Unquantized weights count
16 bits (bf16, as a draft is served), whatever dtype a demo checkpoint was saved in. A quantized
decoder linear (sd2.quantized's schemes: w8a16, w4a16) counts its bits per weight plus one 16-bit
scale per group (per output row for w8a16, per 128 inputs for w4a16, the scheme's groups);
lm_head and the embedding stay 16-bit. The embedding costs the one row a token looks up; lm_head
(tied or not) is read whole.
"""

import torch

from sd2.quantized import group_size, weight_bits

SERVING_BITS = 16
LAYOUTS = ("dense", "bitmask", "csr")


def layer_bytes(rows: int, cols: int, nnz: int, scheme: str | None = None, scale_bits: int = SERVING_BITS) -> dict:
    """Bytes of one (rows x cols) weight with nnz non-zeros in every layout; a quantized one (scheme
    w8a16, w4a16) with its scales (sd2.quantized's groups), an unquantized one at 16 bits."""
    if scheme in (None, "none"):
        bits, scales = SERVING_BITS, 0.0
    else:
        bits = weight_bits(scheme)[0]
        scales = rows * (cols // group_size(scheme, cols)) * scale_bits / 8
    index_bits = 16 if cols <= 2**16 else 32
    numel = rows * cols
    return {
        "dense": numel * bits / 8 + scales,
        "bitmask": numel / 8 + nnz * bits / 8 + scales,
        "csr": nnz * (bits + index_bits) / 8 + (rows + 1) * 4 + scales,
    }


def model_weight_bytes(model, quantization: str | None = None) -> dict:
    """Bytes read per token by `model` (loaded, quantized weights dequantised) stored as `quantization`.

    Returns weight_bytes_per_token (each layer in its smallest layout), dense_weight_bytes_per_token
    (16-bit, zeros stored, no quantization: the same architecture served plainly), the layouts
    chosen (layer count per layout) and the per-layout totals.
    """
    lm_head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    totals = dict.fromkeys(LAYOUTS, 0.0)
    best, dense_plain, chosen = 0.0, 0.0, dict.fromkeys(LAYOUTS, 0)
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        rows, cols = weight.shape
        nnz = int(torch.count_nonzero(weight))
        if module is lm_head:
            # Stored dense and 16-bit: a sparse or quantized output layer is not something these drafts make.
            sizes = dict.fromkeys(LAYOUTS, rows * cols * SERVING_BITS / 8)
        else:
            sizes = layer_bytes(rows, cols, nnz, quantization)
        layout = min(LAYOUTS, key=sizes.get)
        chosen[layout] += 1
        best += sizes[layout]
        for name in LAYOUTS:
            totals[name] += sizes[name]
        dense_plain += rows * cols * SERVING_BITS / 8
    row = embedding.weight.shape[1] * SERVING_BITS / 8
    return {
        "weight_bytes_per_token": round(best + row),
        "dense_weight_bytes_per_token": round(dense_plain + row),
        "weight_layouts": {name: n for name, n in chosen.items() if n},
        "weight_bytes_by_layout": {name: round(total + row) for name, total in totals.items()},
        "quantization": quantization or "none",
    }
