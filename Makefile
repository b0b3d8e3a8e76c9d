# Two commands on a fresh machine: `make run` (the default sweep) and `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)

.PHONY: install run test figures report dry-run benchmark clean

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $@

install: $(STAMP)

# The default sweep on 2 cores; its wall time goes to results/run_time.txt.
run: $(STAMP)
	start=$$(date +%s); \
	snakemake --cores 2 --configfile config/config.yaml && \
	echo "make run: $$(( $$(date +%s) - start )) s wall time on $$(nproc) cores, $$(date -u +%F)" | tee results/run_time.txt

test: $(STAMP)
	$(BIN)/pytest

# Every figure from the committed tables alone: no model job is considered.
figures: $(STAMP)
	snakemake figures --allowed-rules figures --cores 1 --force

report: $(STAMP)
	snakemake --report results/report.html --configfile config/config.yaml

dry-run: $(STAMP)
	snakemake -n --configfile config/config.yaml

benchmark: $(STAMP)
	$(BIN)/python benchmarks/speculative_vs_autoregressive.py

clean:
	rm -rf work logs .snakemake
