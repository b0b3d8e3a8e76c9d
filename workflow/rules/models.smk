rule pretrain:
    input:
        corpus=f"{W}/data/corpus",
        tokenizer=lambda w: f"{W}/tokenizers/{MODELS[w.model]['tokenizer']}",
    output:
        directory(f"{W}/models/{{model}}"),
    wildcard_constraints:
        model="|".join(SCRATCH) or "^$",
    params:
        sd2=SD2,
        placement=lambda w: placement("pretrain", w),
        spec=lambda w: as_arg(MODELS[w.model]),
        wandb=wandb_arg(),
        labels=lambda w: as_arg({"model": w.model}),
        seed=config["seed"],
    threads: model_threads()
    resources:
        **model_resources("pretrain"),
    # Every job of its drafts and targets waits for it: first when cores are scarce, and a target (the longest
    # training, then the answers every fine-tuned draft waits for) before a draft.
    priority: lambda w: 20 if w.model in config["targets"] else 10
    log:
        "logs/pretrain/{model}.log",
    benchmark:
        "logs/benchmarks/pretrain/{model}.tsv"
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} pretrain --name {wildcards.model} --spec {params.spec} --tokenizer {input.tokenizer}"
        " --corpus {input.corpus} --out {output} --seed {params.seed} --threads {threads}"
        " --wandb {params.wandb} --run-name pretrain-{wildcards.model} --labels {params.labels} {params.placement} > {log} 2>&1"


rule model_report:
    input:
        models=[f"{W}/models/{m}" for m in SCRATCH],
        corpus=f"{W}/data/corpus",
        # The report's prompts: the first eval set (HumanEval in the default run).
        prompts=f"{W}/data/eval/{next(iter(config['data']['eval_sets']))}",
    output:
        table=report(f"{R}/tables/models.csv", category="Models", caption="../report/models.rst"),
        examples=f"{R}/models.md",
    params:
        sd2=SD2,
        placement=lambda w: placement("model_report", w),
        models=" ".join(f"{m}={W}/models/{m}" for m in SCRATCH),
        roles=as_arg({m: ("target" if m in config["targets"] else "draft") for m in SCRATCH}),
        seed=config["seed"],
    threads: model_threads()
    resources:
        **model_resources("model_report"),
    log:
        "logs/model_report.log",
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} model-report --models {params.models} --roles {params.roles} --corpus {input.corpus}"
        " --prompts {input.prompts} --table {output.table} --examples {output.examples}"
        " --seed {params.seed} --threads {threads} {params.placement} > {log} 2>&1"


rule layer_subset:
    input:
        lambda w: model_input(MODELS[w.model]["layers_of"]["model"]),
    output:
        directory(f"{W}/models/{{model}}"),
    wildcard_constraints:
        model="|".join(SUBSETS) or "^$",
    params:
        sd2=SD2,
        placement=lambda w: placement("layer_subset", w),
        whole=lambda w: model_path(MODELS[w.model]["layers_of"]["model"]),
        keep=lambda w: MODELS[w.model]["layers_of"]["keep"],
    threads: 1
    resources:
        **model_resources("layer_subset"),
    log:
        "logs/layer_subset/{model}.log",
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} layer-subset --model {params.whole} --keep {params.keep} --out {output} {params.placement} > {log} 2>&1"
