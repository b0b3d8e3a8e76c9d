"""Target-dependent drafters: draft heads that read the target's hidden states.

- `base`: the head interface (DraftHead) and the target-side functions every head uses.
- `heads`: what every head shares: training by distillation from the target, batched
  beam/chain rollouts, the offline measurement and our own decoding loop.
- `redrafter`: ReDrafter (Zhang et al. 2024), a recurrent head fed the target's last hidden state.
- `moa`: Mixture of Attentions (Zimmer et al. 2024), attention over the target's layers and context.

A head is named `<method>-<size>` (e.g. redrafter-small); its size comes from the config's heads.sizes,
its class from the registry's head families (sd2.methods.HEAD_FAMILIES).
"""
