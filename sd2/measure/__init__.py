"""Measuring the drafts: acceptance (MAL with CIs), cost (weight bytes; MACs are sd2.macs) and speed.

- `continuations`: the target's cached greedy continuations of every eval prompt.
- `acceptance`: the exact teacher-forced walk over those continuations (every k at once).
- `trees`: static draft-token trees, measured exactly from the draft's ranks.
- `drafts`: rule measure, every record of one draft model (walks, trees, assisted generation, TVD estimate).
- `speculative`: transformers' assisted generation as a measuring instrument (batch size 1).
- `weight_bytes`: bytes of weights read per generated token.
- `stats`: bootstrap confidence intervals, paired comparisons.
"""
