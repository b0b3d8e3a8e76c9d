rule prepare_data:
    input:
        # A user's own prompt files: editing one reruns the data preparation.
        files=[s["path"] for s in (config["data"]["corpus"], config["data"]["finetune"], *config["data"]["eval_sets"].values()) if s.get("source") == "file"],
    output:
        corpus=directory(f"{W}/data/corpus"),
        finetune=directory(f"{W}/data/finetune"),
        evals=[directory(f"{W}/data/eval/{e}") for e in config["data"]["eval_sets"]],
        manifest=f"{R}/data/manifest.json",
    params:
        sd2=SD2,
        data=as_arg(config["data"]),
        evals=" ".join(f"{e}={W}/data/eval/{e}" for e in config["data"]["eval_sets"]),
        seed=config["seed"],
    log:
        "logs/prepare_data.log",
    conda:
        "../envs/sd2.yaml"
    shell:
        "HF_HUB_OFFLINE=0 {params.sd2} prepare-data --data {params.data} --corpus {output.corpus} --finetune {output.finetune}"
        " --eval {params.evals} --manifest {output.manifest} --seed {params.seed} > {log} 2>&1"


rule train_tokenizer:
    input:
        corpus=f"{W}/data/corpus",
        source=lambda w: model_input(tokenizer_source(w.family)) if tokenizer_source(w.family) else [],
    output:
        directory(f"{W}/tokenizers/{{family}}"),
    params:
        sd2=SD2,
        kind=lambda w: config["tokenizers"][w.family]["kind"],
        size=lambda w: (
            f"--model {model_path(tokenizer_source(w.family))}"
            if tokenizer_source(w.family)
            else f"--vocab-size {config['tokenizers'][w.family]['vocab_size']}"
        ),
    log:
        "logs/train_tokenizer/{family}.log",
    conda:
        "../envs/sd2.yaml"
    shell:
        "{params.sd2} train-tokenizer --corpus {input.corpus} --kind {params.kind} {params.size} --out {output} > {log} 2>&1"
