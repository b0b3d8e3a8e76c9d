"""Mixture of Attentions (Zimmer et al. 2024, arXiv 2410.03804): a small drafter over the target's activations.

Three attentions, as in the paper:
- Layer Self-Attention (LSA): at every verified position, the activations of all the target's
  layers (the embedding output and every layer, the last after its final norm) attend to each
  other; their mean is that position's context feature c_j (dimension D).
- Cross-attention to the verified context: every drafter layer's queries attend over the keys
  and values of c_0..c_{n-1}, the positions whose hidden states the target has computed.
- Self-attention over the tokens of the current draft step: the last committed token and the
  tokens drafted so far (causal).
A drafter token's input is Linear([e(token); c_{n-1}]), e the target's input embedding; its
output goes through a final norm and a projection to the target's hidden size into the target's
lm_head (both embeddings shared with the target and frozen). Sizes (heads.sizes.moa): layers, width
(D as a fraction of the target's hidden size) and attention_heads (null: the target's heads x width).

Simplifications against the paper, named:
- LSA projects every layer's activation to D with one shared linear map, adds a learned layer
  embedding, runs one attention layer (no MLP) and mean-pools; the paper's LSA block is larger.
- Positions enter only through ALiBi-style linear recency biases (per head) in both the
  cross-attention (distance from the last verified position) and the self-attention; no RoPE.
- The draft token's input fuses the last verified position's context feature (as EAGLE does with
  the target's feature) besides the cross-attention over the whole context.
- Chain drafting only (the paper drafts trees with EAGLE-2's dynamic tree); no client-server mode.
- Training is distillation against the target's softmax over the drafter's depth with teacher-forced
  tokens; the paper's training recipe (its losses and data mixture) is not reproduced.

MACs per drafted token (sd2.macs conventions, linear weights only, the target's activations
reused): input (H + D) D + layers x (4 D^2 self-attention + 2 D^2 cross q/o + 2 D^2 cross k/v
+ 3 D I MLP, I = 2D) + output D H + LSA (L+1)(H D + 4 D^2) + the shared lm_head vocab x H.
LSA and the cross k/v run once per newly verified context position, counted here once per
drafted token (a step drafts k tokens and verifies accepted + 1 <= k + 1 positions).
"""

import torch
from torch import nn
from torch.nn import functional as F

from sd2.drafters.base import DraftHead


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes 2^(-8 i / heads), i = 1..heads."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])


class Attention(nn.Module):
    """q, k, v, o projections; attention with an additive bias (heads, queries, keys)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width, bias=False) for _ in range(4))

    def split(self, x):  # (..., m, D) -> (..., heads, m, D / heads)
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)

    def attend(self, q, k, v, bias):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o(out.transpose(-3, -2).flatten(-2))


class MoALayer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_mlp = (nn.RMSNorm(width) for _ in range(3))
        self.self_attn, self.cross_attn = Attention(width, heads), Attention(width, heads)
        self.gate, self.up = nn.Linear(width, 2 * width, bias=False), nn.Linear(width, 2 * width, bias=False)
        self.down = nn.Linear(2 * width, width, bias=False)

    def forward(self, x, causal_bias, context, item, ctx_len, slopes):
        a = self.self_attn
        h = self.norm_self(x)
        x = x + a.attend(a.split(a.q(h)), a.split(a.k(h)), a.split(a.v(h)), causal_bias)
        x = x + self.cross(self.norm_cross(x), context, item, ctx_len, slopes)
        h = self.norm_mlp(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))

    def cross(self, h, context, item, ctx_len, slopes):
        """Each query q attends over its item's context positions < ctx_len[q], with a recency bias."""
        a = self.cross_attn
        keys, values = context
        q = a.split(a.q(h))  # (Q, heads, d, hd)
        out = torch.empty_like(h)
        positions = torch.arange(keys.shape[-2], device=h.device)
        for b in item.unique().tolist():
            rows = (item == b).nonzero(as_tuple=True)[0]
            qb = q[rows]  # (Qb, heads, d, hd)
            n_q, heads, depth, head_dim = qb.shape
            distance = (ctx_len[rows, None] - 1 - positions[None, :]).float()  # (Qb, n)
            bias = -slopes[:, None, None] * distance[None].clamp(min=0)
            bias = bias.masked_fill((distance < 0)[None], float("-inf"))  # (heads, Qb, n)
            bias = bias[:, :, None, :].expand(-1, -1, depth, -1).reshape(heads, n_q * depth, -1)
            flat = qb.permute(1, 0, 2, 3).reshape(heads, n_q * depth, head_dim)
            attended = F.scaled_dot_product_attention(flat, keys[b], values[b], attn_mask=bias)
            attended = attended.reshape(heads, n_q, depth, head_dim).permute(1, 2, 0, 3).flatten(-2)
            out[rows] = a.o(attended)
        return out


class MixtureOfAttentions(DraftHead):
    method = "moa"

    def __init__(self, target, layers: int = 1, width: float = 1.0, attention_heads: int | None = None):
        super().__init__(target)
        config = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
        heads = attention_heads or max(1, round(config.num_attention_heads * width))
        fraction, width = width, round(width * self.target_hidden)
        if layers < 1 or not 0 < fraction <= 1 or width % heads:
            raise ValueError(
                f"moa: need layers >= 1 (got {layers}), width in (0, 1] (got {fraction}) and a width of "
                f"{width} = width x target hidden divisible by attention_heads ({heads})"
            )
        self.width, self.heads, self.layers = width, heads, layers
        levels = self.target_layers + 1
        self.lsa_in = nn.Linear(self.target_hidden, width, bias=False)
        self.layer_embedding = nn.Parameter(torch.zeros(levels, width))
        self.lsa = Attention(width, heads)
        self.lsa_norm = nn.RMSNorm(width)
        self.inp = nn.Linear(self.target_hidden + width, width, bias=False)
        self.blocks = nn.ModuleList(MoALayer(width, heads) for _ in range(layers))
        self.norm_out = nn.RMSNorm(width)
        self.out = nn.Linear(width, self.target_hidden, bias=False)
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def features(self, hidden_states):
        """Layer Self-Attention at every position: (B, n, D)."""
        x = self.lsa_in(torch.stack(hidden_states, dim=-2)) + self.layer_embedding  # (B, n, L+1, D)
        a = self.lsa
        x = x + a.attend(a.split(a.q(x)), a.split(a.k(x)), a.split(a.v(x)), None)
        return self.lsa_norm(x.mean(dim=-2))

    def begin(self, feats, item, ctx_len, last):
        # Every layer's context keys and values, once per item (shared by the queries, never indexed).
        context = [
            (blk.cross_attn.split(blk.cross_attn.k(feats)), blk.cross_attn.split(blk.cross_attn.v(feats)))
            for blk in self.blocks
        ]
        state = {"item": item, "ctx_len": ctx_len, "last_feature": feats[item, ctx_len - 1], "context": context}
        state["x"] = self._input(state, last)[:, None]
        return state

    def _input(self, state, tokens):
        return self.inp(torch.cat([self.embed(tokens), state["last_feature"]], dim=-1))

    def logits(self, state):
        x = state["x"]
        depth = x.shape[1]
        steps = torch.arange(depth, device=x.device)
        distance = (steps[:, None] - steps[None, :]).float()
        causal = (-self.slopes[:, None, None] * distance).masked_fill(distance < 0, float("-inf"))
        for blk, context in zip(self.blocks, state["context"]):
            x = blk(x, causal, context, state["item"], state["ctx_len"], self.slopes)
        return self.lm_head(self.out(self.norm_out(x[:, -1])))

    def advance(self, state, tokens):
        return {**state, "x": torch.cat([state["x"], self._input(state, tokens)[:, None]], dim=1)}

    def index(self, state, idx):
        return {key: value if key == "context" else value[idx] for key, value in state.items()}

    def linear_uses(self) -> dict:
        # LSA projects and attends over every one of the target's L + 1 activations of a position.
        lsa = {self.lsa_in, self.lsa.q, self.lsa.k, self.lsa.v, self.lsa.o}
        return {module: len(self.layer_embedding) if module in lsa else 1 for module in super().linear_uses()}
