from sd2.plots import FIGURES


def figure_paths():
    return [f"{R}/figures/{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")]


def training_curves():
    curves = {f"{W}/models/{m}": {"stage": "pretrain", "model": m} for m in SCRATCH}
    curves.update(tuned_drafts())
    return curves


rule collect:
    input:
        records=record_paths(),
        checkpoints=list(training_curves()),
    output:
        measurements=f"{R}/tables/measurements.csv",
        training=f"{R}/tables/training.csv",
        comparisons=f"{R}/tables/comparisons.csv",
        summary=f"{R}/tables/summary.md",
    params:
        curves=lambda w: as_arg([{**labels, "path": f"{path}/training.csv"} for path, labels in training_curves().items()]),
    log:
        "logs/collect.log",
    shell:
        "{SD2} collect --records {input.records} --curves {params.curves}"
        " --measurements {output.measurements} --training {output.training} --comparisons {output.comparisons}"
        " --summary {output.summary} > {log} 2>&1"


rule figures:
    input:
        measurements=f"{R}/tables/measurements.csv",
        comparisons=f"{R}/tables/comparisons.csv",
        training=f"{R}/tables/training.csv",
    output:
        [report(f"{R}/figures/{name}.png", category="Figures", caption=f"../report/{name}.rst") for name in FIGURES],
        [f"{R}/figures/{name}.pdf" for name in FIGURES],
    log:
        "logs/figures.log",
    shell:
        "{SD2} figures --tables {R}/tables --out {R}/figures > {log} 2>&1"
