# Target-dependent draft heads (sd2.drafters; the families of sd2.methods.HEAD_FAMILIES, ReDrafter
# and Mixture of Attentions built in), trained per target on its self-distilled data and measured
# greedily with the rollout walk. Include after
# common.smk, which holds the heads' helpers; rule collect takes head_record_paths() among its record inputs. A head is named
# <method>-<size> (heads.sizes.<method>); its records use draft = the head name and sparsity 0,
# or s for the sparse head pruned from it (heads.sparsities, workdir/heads/<target>/<head>-s<s>).

# A head's record path also matches rule measure's {draft}/{method}-s{sparsity}.json.
ruleorder: measure_head > measure


# Memory and placement: the train_head plan (sd2.memory: the frozen target's batched forwards with
# hidden states and logits, the head's optimizer states and its logits over the trained depth).
rule train_head:
    input:
        target=lambda w: model_input(w.target),
        data=f"{W}/distill/{{target}}",
    output:
        directory(f"{W}/heads/{{target}}/{{head}}"),
    wildcard_constraints:
        head=HEAD,
    params:
        sd2=SD2,
        placement=lambda w: placement("train_head", w),
        target=lambda w: model_path(w.target),
        trust=lambda w: trust(w.target),
        size=lambda w: as_arg(head_size(w.head)),
        settings=as_arg(HEADS["train"]),
        chat=as_arg(config["chat"]),
        beams=lambda w: head_beams(w.head),
        wandb=wandb_arg(),
        seed=config["seed"],
    threads: model_threads()
    resources:
        **model_resources("train_head"),
    log:
        "logs/train_head/{target}/{head}.log",
    benchmark:
        "logs/benchmarks/train_head/{target}/{head}.tsv"
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} train-head --target {params.target} {params.trust} --data {input.data} --head {wildcards.head}"
        " --size {params.size} --settings {params.settings} --chat {params.chat} --beam-width {params.beams}"
        " --out {output} --seed {params.seed} --threads {threads} --wandb {params.wandb}"
        " --run-name train_head-{wildcards.target}-{wildcards.head} {params.placement} > {log} 2>&1"


rule train_sparse_head:
    input:
        target=lambda w: model_input(w.target),
        data=f"{W}/distill/{{target}}",
        dense=f"{W}/heads/{{target}}/{{head}}",
    output:
        directory(f"{W}/heads/{{target}}/{{head}}-s{{sparsity}}"),
    wildcard_constraints:
        head=HEAD,
    params:
        sd2=SD2,
        placement=lambda w: placement("train_head", w),
        target=lambda w: model_path(w.target),
        trust=lambda w: trust(w.target),
        size=lambda w: as_arg(head_size(w.head)),
        settings=as_arg(HEADS["train"]),
        chat=as_arg(config["chat"]),
        beams=lambda w: head_beams(w.head),
        wandb=wandb_arg(),
        seed=config["seed"],
    threads: model_threads()
    resources:
        **model_resources("train_head"),
    log:
        "logs/train_head/{target}/{head}-s{sparsity}.log",
    benchmark:
        "logs/benchmarks/train_head/{target}/{head}-s{sparsity}.tsv"
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} train-head --target {params.target} {params.trust} --data {input.data} --head {wildcards.head}"
        " --size {params.size} --settings {params.settings} --chat {params.chat} --beam-width {params.beams}"
        " --init {input.dense} --sparsity {wildcards.sparsity}"
        " --out {output} --seed {params.seed} --threads {threads} --wandb {params.wandb}"
        " --run-name train_head-{wildcards.target}-{wildcards.head}-s{wildcards.sparsity} {params.placement} > {log} 2>&1"


rule measure_head:
    input:
        target=lambda w: model_input(w.target),
        head=head_dir,
        outputs=f"{W}/target_outputs/{{target}}/{{eval_set}}.json",
    output:
        f"{R}/records/{{eval_set}}/{{target}}/{{head}}/{{method}}-s{{sparsity}}.json",
    wildcard_constraints:
        head=HEAD,
        method=HEAD_FAMILY,
    params:
        sd2=SD2,
        placement=lambda w: placement("target_outputs", w),
        target=lambda w: model_path(w.target),
        trust=lambda w: trust(w.target),
        settings=as_arg(config["measure"]),
        labels=lambda w: as_arg({"target": w.target, "draft": w.head, "method": w.method, "sparsity": int(w.sparsity), "eval_set": w.eval_set}),
        beams=lambda w: head_beams(w.head),
        wandb=wandb_arg(),
        seed=config["seed"],
    # One thread in a CPU run, as rule measure: two measurement jobs share the 2-core default machine.
    threads: model_threads(1)
    resources:
        **model_resources("target_outputs"),
    log:
        "logs/measure_head/{eval_set}/{target}/{head}/{method}-s{sparsity}.log",
    benchmark:
        "logs/benchmarks/measure_head/{eval_set}/{target}/{head}/{method}-s{sparsity}.tsv"
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} measure-head --target {params.target} --head {input.head} {params.trust}"
        " --target-outputs {input.outputs} --settings {params.settings} --beam-width {params.beams}"
        " --labels {params.labels} --out {output} --seed {params.seed} --threads {threads} --wandb {params.wandb}"
        " --run-name measure_head-{wildcards.eval_set}-{wildcards.target}-{wildcards.head}-s{wildcards.sparsity}"
        " {params.placement} > {log} 2>&1"
