# Streaming data pipeline for multihead vision training on WebDataset shards.
# Run `make help` for the targets. Everything runs inside ./.venv, created on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

DATASET ?= vimh
DATA    ?= data
SRC     ?=
OUT     ?= $(DATA)/shards/$(DATASET)
EXPERIMENT ?= $(DATASET)_cnn
ARGS    ?=
DEMO_SRC := $(DATA)/sources/vimh-32x32x3_demo
# demo sources `make shards` generates when SRC is not given, and the file that marks each done
SHARD_FORMATS := vimh cifar100mh imagenet100
DEMO_SRC_vimh := $(DEMO_SRC)
DEMO_DONE_vimh := $(DEMO_SRC)/vimh_dataset_info.json
DEMO_SRC_cifar100mh := $(DATA)/sources/cifar100mh-32x32x3_demo
DEMO_DONE_cifar100mh := $(DEMO_SRC_cifar100mh)/cifar100mh_dataset_info.json
DEMO_SRC_imagenet100 := $(DATA)/sources/imagenet100_demo
DEMO_DONE_imagenet100 := $(DEMO_SRC_imagenet100)/.generated
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo shards validate train train-mix bench test lint

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"
	touch $@

install: $(STAMP) ## Create .venv and install the project with its test tools (pinned by requirements.lock)

$(DEMO_SRC)/vimh_dataset_info.json: | $(STAMP)
	$(BIN)/shards generate $(DEMO_SRC) --train 4096 --test 1024 --size 32x32x3 --heads 2

$(DEMO_DONE_cifar100mh): | $(STAMP)
	$(BIN)/shards generate $(DEMO_SRC_cifar100mh) --format cifar100mh --train 4096 --test 1024

$(DEMO_DONE_imagenet100): | $(STAMP)
	$(BIN)/shards generate $(DEMO_SRC_imagenet100) --format imagenet100
	touch $@

demo: $(STAMP) $(DEMO_SRC)/vimh_dataset_info.json ## Main job end to end: generate, convert, validate, train, per-head metrics
	$(BIN)/shards convert vimh $(DEMO_SRC) $(DATA)/shards/demo --max-samples 1024
	$(BIN)/shards validate $(DATA)/shards/demo --decode
	$(BIN)/shards inspect $(DATA)/shards/demo --grid $(DATA)/shards/demo/grid.png
	$(BIN)/python -m training.train experiment=vimh_demo data.train=$(DATA)/shards/demo paths.log_dir=$(DATA)/logs

shards: $(STAMP) ## Convert a source: make shards DATASET=vimh|cifar100mh|imagenet100 [SRC=dir] [OUT=dir] (no SRC: a generated demo)
	@if [ -z "$(filter $(DATASET),$(SHARD_FORMATS))" ]; then echo "DATASET=$(DATASET): expected one of: $(SHARD_FORMATS)"; exit 2; fi
	@if [ -z "$(SRC)" ]; then $(MAKE) --no-print-directory $(DEMO_DONE_$(DATASET)); fi
	$(BIN)/shards convert $(DATASET) $(or $(SRC),$(DEMO_SRC_$(DATASET))) $(OUT)

validate: $(STAMP) ## Validate shards: make validate [OUT=dir] (decodes every image)
	$(BIN)/shards validate $(OUT) --decode --json $(OUT)/validation.json

train: $(STAMP) ## Train: make train DATASET=vimh [EXPERIMENT=vimh_cnn] [OUT=shards] [ARGS="trainer.max_epochs=5"]
	$(BIN)/python -m training.train experiment=$(EXPERIMENT) data.train=$(OUT) $(ARGS)

MIX_EXPERIMENT ?= mix_vimh_cifar100mh
train-mix: $(STAMP) ## Train on a mix: make train-mix [MIX_EXPERIMENT=mix_vimh_cifar100mh] [ARGS=...] (makes missing demo shards)
	@for d in $(wordlist 2,3,$(subst _, ,$(MIX_EXPERIMENT))); do case $$d in cifar100) d=cifar100mh;; esac; \
	  test -f $(DATA)/shards/$$d/train/manifest.json || $(MAKE) --no-print-directory shards DATASET=$$d; done
	$(BIN)/python -m training.train experiment=$(MIX_EXPERIMENT) paths.data_dir=$(DATA) $(ARGS)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev,bench]"
	touch $@

bench: $(BENCH_STAMP) ## Benchmarks against webdataset, litdata and mosaicml-streaming (writes docs/bench/)
	$(BIN)/python -m benchmarks.bench_convert
	$(BIN)/python -m benchmarks.bench_loader
	$(BIN)/python -m benchmarks.bench_decode
	$(BIN)/python -m benchmarks.bench_stall
	$(BIN)/python -m benchmarks.bench_convert_scale
	$(BIN)/python -m benchmarks.bench_mix

test: $(STAMP) ## Run the test suite (add PYTEST_ARGS="-m slow" for the slow tests only)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff on everything; mypy on pipeline/, shard_tools/, training/ and benchmarks/
	$(BIN)/ruff check .
	$(BIN)/mypy
