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
