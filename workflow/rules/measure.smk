rule target_outputs:
    input:
        target=lambda w: model_input(w.target),
        eval_set=f"{W}/data/eval/{{eval_set}}",
    output:
        f"{W}/target_outputs/{{target}}/{{eval_set}}.json",
    params:
        sd2=SD2,
        placement=lambda w: placement("target_outputs", w),
        target=lambda w: model_path(w.target),
        trust=lambda w: trust(w.target),
        settings=as_arg({**TARGET_OUTPUT_SETTINGS, "engine": config["engine"]}),
        seed=config["seed"],
    # One thread in a CPU run: the batch-1 timing shares the 2-core default machine with another job.
    threads: model_threads(1)
    resources:
        **model_resources("target_outputs"),
    log:
        "logs/target_outputs/{target}/{eval_set}.log",
    benchmark:
        "logs/benchmarks/target_outputs/{target}/{eval_set}.tsv"
    # Under --sdm conda, engine.name vllm runs in an environment that has vLLM (and this package).
    conda:
        "../envs/vllm.yaml" if config["engine"]["name"] == "vllm" else "../envs/sd2.yaml"
    shell:
        "{params.sd2} target-outputs --target {params.target} {params.trust} --eval-set {input.eval_set}"
        " --settings {params.settings} --out {output} --seed {params.seed} --threads {threads} {params.placement} > {log} 2>&1"


# One job per draft for every eval set: the models load once (a job's imports and loading cost more than
# measuring a small eval set's greedy cells).
rule measure:
    input:
        target=lambda w: model_input(w.target),
        draft=lambda w: draft_input(w.target, w.draft, w.method, w.sparsity),
        outputs=[f"{W}/target_outputs/{{target}}/{e}.json" for e in EVAL_SETS],
    output:
        [f"{R}/records/{e}/{{target}}/{{draft}}/{{method}}-s{{sparsity}}.json" for e in EVAL_SETS],
    # Draft variants of sd2.methods (heads are measured by their own rules).
    wildcard_constraints:
        method=VARIANT,
    params:
        sd2=SD2,
        placement=lambda w: placement("measure", w),
        target=lambda w: model_path(w.target),
        draft=lambda w: draft_path(w.target, w.draft, w.method, w.sparsity),
        trust=lambda w: trust(w.target, w.draft),
        eval_sets=lambda w, input, output: " ".join(
            f"--eval-set {e} {i} {o}" for e, i, o in zip(EVAL_SETS, input.outputs, output)
        ),
        settings=as_arg(config["measure"]),
        labels=lambda w: as_arg({"target": w.target, "draft": w.draft, "method": w.method, "sparsity": int(w.sparsity)}),
        wandb=wandb_arg(),
        seed=config["seed"],
    # One thread in a CPU run: two measurement jobs share the 2-core default machine.
    threads: model_threads(1)
    resources:
        **model_resources("measure"),
    # The cell checked at every k takes several times an ordinary one: started first, it does not end the run alone.
    priority: lambda w: 1 if is_check_cell(w) else 0
    log:
        "logs/measure/{target}/{draft}/{method}-s{sparsity}.log",
    benchmark:
        "logs/benchmarks/measure/{target}/{draft}/{method}-s{sparsity}.tsv"
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} measure --target {params.target} --draft {params.draft} {params.trust} {params.eval_sets}"
        " --settings {params.settings} --labels {params.labels} --seed {params.seed}"
        " --threads {threads} --wandb {params.wandb}"
        " --run-name measure-{wildcards.target}-{wildcards.draft}-{wildcards.method}-s{wildcards.sparsity}"
        " {params.placement} > {log} 2>&1"
