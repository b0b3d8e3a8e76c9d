"""ReDrafter (Zhang et al. 2024, arXiv 2403.09919; apple/ml-recurrent-drafter): a recurrent draft head.

The head reads h, the target's last hidden state (after its final norm) at the last verified
position, and keeps a recurrent state over the tokens it drafts:

    s_1 = SiLU(U e(y[t-1]))                  (s_0 = 0)
    s_i = SiLU(U e(x_{i-1}) + W s_{i-1})     x_{i-1}: the token drafted at the previous step
    logits_i = lm_head(P(ResBlocks([s_i; h])))    ResBlock(z) = z + SiLU(A z), on 2H dims

e is the target's input embedding and lm_head the target's output embedding, shared and frozen
as in the paper (their weights are the target's). Proposals: beam search (sd2.drafters.heads.propose;
beam_width 1 is a chain); verification takes the longest beam prefix the target confirms.

Simplifications against the paper, named:
- The paper's drafter has its own vocabulary projection from [s; h] (2H x vocab); here a learned
  projection P (2H -> H) feeds the target's shared lm_head (H x vocab), a much smaller head at
  large vocabularies. Sizes (heads.sizes.redrafter) set the number of ResBlocks; the recurrent state
  has the target's hidden size, as in the paper.
- Dynamic tree attention (deduplicating the beams' shared prefixes before verification) is left
  out: every beam is verified as its own row of one batched target forward.
- Training is distillation against the target's softmax over the head's depth with teacher-forced
  inputs (the paper's local distillation); no separate ground-truth loss.

MACs per drafted token (sd2.macs conventions, linear weights only; the target's h is reused):
U and W (2 H^2) + layers x (2H)^2 + P (2H x H) + the shared lm_head (vocab x H).
"""

import torch
from torch import nn

from sd2.drafters.base import DraftHead


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        # Zero-initialised: every block starts as the identity, as in the reference code.
        nn.init.zeros_(self.linear.weight)

    def forward(self, x):
        return x + nn.functional.silu(self.linear(x))


class ReDrafter(DraftHead):
    method = "redrafter"

    def __init__(self, target, layers: int = 1):
        super().__init__(target)
        if layers < 0:
            raise ValueError(f"redrafter: layers must be >= 0, got {layers}")
        hidden = self.target_hidden
        self.rnn_u = nn.Linear(hidden, hidden)
        self.rnn_w = nn.Linear(hidden, hidden, bias=False)
        self.blocks = nn.ModuleList(ResBlock(2 * hidden) for _ in range(layers))
        self.proj = nn.Linear(2 * hidden, hidden)
        self.layers = layers

    def features(self, hidden_states):
        return hidden_states[-1]

    def begin(self, feats, item, ctx_len, last):
        h = feats[item, ctx_len - 1]
        return {"h": h, "s": nn.functional.silu(self.rnn_u(self.embed(last)))}

    def logits(self, state):
        z = torch.cat([state["s"], state["h"]], dim=-1)
        for block in self.blocks:
            z = block(z)
        return self.lm_head(self.proj(z))

    def advance(self, state, tokens):
        s = nn.functional.silu(self.rnn_u(self.embed(tokens)) + self.rnn_w(state["s"]))
        return {"h": state["h"], "s": s}

    def index(self, state, idx):
        return {key: value[idx] for key, value in state.items()}
