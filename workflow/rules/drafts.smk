rule self_distill:
    input:
        target=lambda w: model_input(w.target),
        prompts=f"{W}/data/finetune",
    output:
        directory(f"{W}/distill/{{target}}"),
    params:
        sd2=SD2,
        placement=lambda w: placement("self_distill", w),
        model=lambda w: model_path(w.target),
        trust=lambda w: trust(w.target),
        settings=as_arg({**config["distill"], "chat": config["chat"], "engine": config["engine"]}),
        seed=config["seed"],
    threads: model_threads()
    resources:
        **model_resources("self_distill"),
    # Every fine-tuned draft waits for the target's answers: first when cores are scarce.
    priority: 10
    log:
        "logs/self_distill/{target}.log",
    benchmark:
        "logs/benchmarks/self_distill/{target}.tsv"
    # Under --sdm conda, engine.name vllm runs in an environment that has vLLM (and this package).
    conda:
        "../envs/vllm.yaml" if config["engine"]["name"] == "vllm" else "../envs/sd2.yaml"
    shell:
        "{params.sd2} self-distill --target {params.model} {params.trust} --prompts {input.prompts} --out {output}"
        " --settings {params.settings} --seed {params.seed} --threads {threads} {params.placement} > {log} 2>&1"


rule prune:
    input:
        draft=lambda w: model_input(w.draft),
        calibration=lambda w: data_path(w.data),
    output:
        directory(f"{W}/pruned/{{data}}/{{draft}}/s{{sparsity}}"),
    params:
        sd2=SD2,
        placement=lambda w: placement("prune", w),
        model=lambda w: model_path(w.draft),
        settings=as_arg({**config["prune"], "chat": config["chat"]}),
        seed=config["seed"],
    threads: model_threads()
    resources:
        **model_resources("prune"),
    log:
        "logs/prune/{data}/{draft}/s{sparsity}.log",
    benchmark:
        "logs/benchmarks/prune/{data}/{draft}/s{sparsity}.tsv"
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} prune --model {params.model} --calibration {input.calibration} --sparsity {wildcards.sparsity}"
        " --settings {params.settings} --out {output} --seed {params.seed} --threads {threads} {params.placement} > {log} 2>&1"


# A draft quantized after it is made (sd2.drafts.quantize): its variant is <variant>@<scheme>, its
# input the unquantized variant's checkpoint (for <variant>@<scheme>-qat its quantization-aware
# fine-tuning, quantized with <scheme>), its calibration data the target's self-distilled answers.
rule quantize:
    input:
        draft=lambda w: quantize_input(w.target, w.draft, w.method, w.sparsity),
        calibration=lambda w: data_path(w.target),
    output:
        directory(f"{W}/quantized/{{target}}/{{draft}}/{{method}}-s{{sparsity}}"),
    wildcard_constraints:
        method=QUANTIZED_VARIANT,
    params:
        sd2=SD2,
        placement=lambda w: placement("quantize", w),
        model=lambda w: quantize_source(w.target, w.draft, w.method, w.sparsity),
        scheme=lambda w: variants.base_scheme(variants.split_quantization(w.method)[1]),
        settings=as_arg({**config["quantize"], "chat": config["chat"]}),
        seed=config["seed"],
    threads: model_threads()
    resources:
        **model_resources("quantize"),
    log:
        "logs/quantize/{target}/{draft}/{method}-s{sparsity}.log",
    benchmark:
        "logs/benchmarks/quantize/{target}/{draft}/{method}-s{sparsity}.tsv"
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} quantize --model {params.model} --calibration {input.calibration} --scheme {params.scheme}"
        " --settings {params.settings} --out {output} --seed {params.seed} --threads {threads} {params.placement} > {log} 2>&1"


rule layer_prune:
    input:
        draft=lambda w: model_input(w.draft),
    output:
        directory(f"{W}/layer_pruned/{{draft}}/s{{sparsity}}"),
    params:
        sd2=SD2,
        placement=lambda w: placement("layer_prune", w),
        model=lambda w: model_path(w.draft),
        # YAML may key the levels as numbers or strings.
        drop=lambda w: as_arg({str(k): v for k, v in (config["layer_prune"]["drop"] or {}).items()}.get(w.sparsity)),
    threads: model_threads()
    resources:
        **model_resources("layer_prune"),
    log:
        "logs/layer_prune/{draft}/s{sparsity}.log",
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} layer-prune --model {params.model} --sparsity {wildcards.sparsity} --drop {params.drop}"
        " --out {output} {params.placement} > {log} 2>&1"


rule finetune:
    input:
        init=finetune_init,
        data=lambda w: data_path(w.data),
        teacher=lambda w: model_input(teacher_model(w)) if teacher_model(w) else [],
    output:
        directory(f"{W}/drafts/{{data}}/{{draft}}/{{method}}-s{{sparsity}}"),
    wildcard_constraints:
        method=TUNED_VARIANT,
    params:
        sd2=SD2,
        placement=lambda w: placement("finetune", w),
        init=finetune_init_path,
        teacher=teacher,
        settings=finetune_settings,
        wandb=wandb_arg(),
        labels=lambda w: as_arg({"target": w.data, "draft": w.draft, "method": w.method, "sparsity": int(w.sparsity)}),
        seed=config["seed"],
    threads: model_threads()
    resources:
        **model_resources("finetune"),
    log:
        "logs/finetune/{data}/{draft}/{method}-s{sparsity}.log",
    benchmark:
        "logs/benchmarks/finetune/{data}/{draft}/{method}-s{sparsity}.tsv"
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} finetune --init {params.init} --data {input.data} {params.teacher} --out {output}"
        " --settings {params.settings} --seed {params.seed} --threads {threads} --wandb {params.wandb}"
        " --run-name finetune-{wildcards.data}-{wildcards.draft}-{wildcards.method}-s{wildcards.sparsity}"
        " --labels {params.labels} {params.placement} > {log} 2>&1"
