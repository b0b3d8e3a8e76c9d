"""Aggregation (the DAG's end): tables, figures, the README's generated blocks, the model table.

- `results`: records into measurements.csv, comparisons.csv and the summary tables.
- `plots`: every figure, from the tables alone.
- `readme`: the README's generated blocks, from the committed tables.
- `model_report`: results/models.md, the sizes and training of every model.
"""
