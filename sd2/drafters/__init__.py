"""Target-dependent drafters: draft heads that read the target's hidden states (issue 13).

- `heads`: what every head shares: the head interface, training by distillation from the
  target, batched beam/chain rollouts, the offline measurement and our own decoding loop.
- `redrafter`: ReDrafter (Zhang et al. 2024), a recurrent head fed the target's last hidden state.
- `moa`: Mixture of Attentions (Zimmer et al. 2024), attention over the target's layers and context.

A head is named `<method>-<size>` (e.g. redrafter-small); its size comes from the config's heads.sizes.
"""


def head_class(method: str):
    """The nn.Module class of a head method."""
    from sd2.drafters.moa import MixtureOfAttentions
    from sd2.drafters.redrafter import ReDrafter

    classes = {"redrafter": ReDrafter, "moa": MixtureOfAttentions}
    if method not in classes:
        raise ValueError(f"unknown draft-head method {method!r} (known: {', '.join(classes)})")
    return classes[method]


def split_name(head: str) -> tuple[str, str]:
    """(method, size) from a head name like redrafter-small."""
    method, sep, size = head.partition("-")
    if not sep or not size:
        raise ValueError(f"head name {head!r} is not <method>-<size> (e.g. redrafter-small)")
    head_class(method)
    return method, size
