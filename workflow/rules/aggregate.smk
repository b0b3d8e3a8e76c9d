from sd2.report.figures import write_captions


rule collect:
    input:
        records=record_paths() + head_record_paths(),
        checkpoints=list(training_curves()),
    output:
        measurements=f"{R}/tables/measurements.csv",
        training=f"{R}/tables/training.csv",
        comparisons=f"{R}/tables/comparisons.csv",
        summary=f"{R}/tables/summary.md",
    params:
        sd2=SD2,
        curves=lambda w: as_arg([{**labels, "path": f"{path}/training.csv"} for path, labels in training_curves().items()]),
    log:
        "logs/collect.log",
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} collect --records {input.records} --curves {params.curves}"
        " --measurements {output.measurements} --training {output.training} --comparisons {output.comparisons}"
        " --summary {output.summary} > {log} 2>&1"


# The report's figure captions come from the figure registry (sd2.report.figures). Snakemake reads a
# caption from a file, so they are written, on every parse, beside Snakemake's own state.
FIGURE_CAPTIONS = write_captions(".snakemake/captions")


rule figures:
    input:
        measurements=f"{R}/tables/measurements.csv",
        comparisons=f"{R}/tables/comparisons.csv",
        training=f"{R}/tables/training.csv",
    output:
        [report(f"{R}/figures/{name}.png", category="Figures", caption=FIGURE_CAPTIONS[name]) for name in FIGURES],
        [f"{R}/figures/{name}.pdf" for name in FIGURES],
    params:
        sd2=SD2,
        # The folders of the tables and figures above: {R}/tables and {R}/figures.
        tables=lambda w, input: os.path.dirname(input.measurements),
        figures=lambda w, output: os.path.dirname(output[0]),
    log:
        "logs/figures.log",
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} figures --tables {params.tables} --out {params.figures} > {log} 2>&1"
