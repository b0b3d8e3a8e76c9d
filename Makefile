# Two commands on a fresh machine: `make run` (the default sweep) and `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)

.PHONY: install run test figures readme report dry-run benchmark clean

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $@

install: $(STAMP)

# The default sweep on 2 cores. Without work/ (a fresh clone) the committed results came
# from another machine's models: Snakemake would keep them, so they are removed first
# (`git checkout results/` restores them) and everything is rebuilt. The wall time goes to
# results/run_time.json only from such a run from nothing.
CONFIG := config/config.yaml
run: $(STAMP)
	@mkdir -p logs; \
	fresh=$$([ -d work ] && echo 0 || echo 1); \
	$(BIN)/python -m sd2 estimate-run-time --config $(CONFIG) --previous results/run_time.json --out logs/run_estimate.json --threads 2 || exit 1; \
	if [ $$fresh = 1 ]; then \
		echo "make run: no work/ here, so results/ is not from this machine's models: rebuilding it from nothing"; \
		snakemake --delete-all-output --cores 1 --quiet all --configfile $(CONFIG) || exit 1; \
	else \
		echo "make run: work/ exists: running only what is out of date (the run time is recorded only by a run from nothing; make clean first for one)"; \
	fi; \
	start=$$(date +%s); \
	snakemake --cores 2 --configfile $(CONFIG) || exit 1; \
	$(BIN)/python -m sd2 job-times logs/benchmarks --out results/tables/job_times.csv; \
	if [ $$fresh = 1 ]; then \
		$(BIN)/python -m sd2 record-run-time --seconds $$(( $$(date +%s) - start )) --estimate logs/run_estimate.json --out results/run_time.json; \
	fi

test: $(STAMP)
	$(BIN)/pytest

# Every figure from the committed tables alone: no model job is considered.
figures: $(STAMP)
	snakemake figures --allowed-rules figures --cores 1 --force

# The README's result blocks (between <!-- generated:... --> markers) from the committed tables.
readme: $(STAMP)
	$(BIN)/python -m sd2 readme

report: $(STAMP)
	snakemake --report results/report.html --configfile config/config.yaml

dry-run: $(STAMP)
	snakemake -n --configfile config/config.yaml

benchmark: $(STAMP)
	$(BIN)/python benchmarks/speculative_vs_autoregressive.py

clean:
	rm -rf work logs .snakemake
