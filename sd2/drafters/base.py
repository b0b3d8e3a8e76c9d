"""The interface of a draft head: a small module over a frozen target's hidden states, sharing the
target's input embedding and lm_head (their weights are the target's, neither trained nor saved with
the head). ReDrafter (sd2.drafters.redrafter) and Mixture of Attentions (sd2.drafters.moa) implement
it; sd2.drafters.heads trains, rolls out, measures and decodes with any head that does."""

import torch


class DraftHead(torch.nn.Module):
    """A draft head over a frozen target. Subclasses implement the head's own state machine:

    features(hidden_states) -> (B, n, F): per-position context features from the target's hidden
        states (the tuple output_hidden_states gives: embeddings, then every layer, the last normed);
        position-wise, so features of new positions can be appended.
    begin(feats, item, ctx_len, last) -> state for Q queries: query q reads feats[item[q], :ctx_len[q]]
        and the last committed token last[q].
    logits(state) -> (Q, vocab) float logits of the next drafted token.
    advance(state, tokens) -> state with tokens (Q,) appended as drafted.
    index(state, idx) -> state of the queries idx (beam expansion and reordering).
    linear_uses() -> {linear layer: runs per drafted token} where a layer runs other than once
        (macs_per_token counts the non-zero weights of every linear layer times its uses).
    """

    method = ""

    def __init__(self, target):
        super().__init__()
        # A plain tuple: the target's modules are used, not registered (not trained, not saved).
        self._shared = (target.get_input_embeddings(), target.get_output_embeddings())
        config = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
        self.target_hidden = config.hidden_size
        self.target_layers = config.num_hidden_layers
        self.vocab = self._shared[1].weight.shape[0]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        embedding = self._shared[0]
        return embedding(tokens.to(embedding.weight.device)).to(self.param_dtype)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        head = self._shared[1]
        # Back to the head's device: with device_map auto the target's lm_head may sit on another GPU.
        return head(x.to(head.weight.device, head.weight.dtype)).float().to(x.device)

    @property
    def param_dtype(self):
        return next(self.parameters()).dtype

    def linear_uses(self) -> dict:
        """How many times each of the head's linear layers runs per drafted token (default: once)."""
        return {module: 1 for module in self.modules() if isinstance(module, torch.nn.Linear)}

    def macs_per_token(self, dense: bool = False) -> int:
        """Linear-layer weight MACs per drafted token (sd2.macs conventions): the head's own linear layers
        at their non-zero weights (dense: all weights) times their uses, plus the shared lm_head (vocab x
        hidden, dense: the head computes it for every drafted token; the embedding lookup is free)."""
        own = sum(
            (module.weight.numel() if dense else int(torch.count_nonzero(module.weight))) * uses
            for module, uses in self.linear_uses().items()
        )
        return own + self.vocab * self.target_hidden


def target_forward(target, ids: torch.Tensor, attention_mask=None, **kwargs):
    """One target forward with every layer's hidden states."""
    return target(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)


def head_device(head) -> torch.device:
    return next(head.parameters()).device


def on_head(head, hidden_states) -> tuple:
    device, dtype = head_device(head), head.param_dtype
    return tuple(h.to(device, dtype) for h in hidden_states)
