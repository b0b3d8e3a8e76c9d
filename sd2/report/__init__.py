"""Aggregation (the DAG's end): tables, figures, the README's generated blocks, the model table.

- `collect`: records and training logs into measurements.csv and training.csv (the table schema).
- `comparisons`: paired comparisons with bootstrap CIs into comparisons.csv; the drafter families.
- `markdown`: summary.md, the per-draft and comparison tables in markdown.
- `figures`: the figure registry (name, drawing function, tables, caption) and rule `figures`.
- `plots`: every figure's drawing function, from the tables alone; `canvas`: what they share.
- `readme`: the README's generated blocks, from the committed tables.
- `model_report`: results/models.md, the sizes and training of every model.
"""
