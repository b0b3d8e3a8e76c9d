# A plain Hugging Face checkpoint of every draft the sweep makes, with what was measured about it
# and the vLLM command that serves it (sd2_draft.json). A local rule: it only links files.
rule export_draft:
    input:
        draft=lambda w: draft_path(w.target, w.draft, w.method, w.sparsity),
        # The target's config (its vocabulary size decides the vLLM command's use_heterogeneous_vocab).
        target=lambda w: model_input(w.target),
        records=lambda w: [f"{R}/records/{e}/{w.target}/{w.draft}/{w.method}-s{w.sparsity}.json" for e in config["data"]["eval_sets"]],
    output:
        directory(f"{W}/export/{{target}}/{{draft}}/{{method}}-s{{sparsity}}"),
    wildcard_constraints:
        method=VARIANT,
    params:
        sd2=SD2,
        target=lambda w: model_path(w.target),
        trust=lambda w: trust(w.target),
        labels=lambda w: as_arg({"target": w.target, "draft": w.draft, "method": w.method, "sparsity": int(w.sparsity)}),
        run_name=config["run_name"],
        seed=config["seed"],
    # Links and copies files and counts zeros one tensor at a time: a local rule (workflow/Snakefile),
    # not worth a cluster job.
    threads: 1
    log:
        "logs/export_draft/{target}/{draft}/{method}-s{sparsity}.log",
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} export-draft --draft {input.draft} --target {params.target} {params.trust} --records {input.records}"
        " --labels {params.labels} --run-name {params.run_name} --out {output} --seed {params.seed} > {log} 2>&1"
