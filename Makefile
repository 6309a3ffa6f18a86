# The two commands a newcomer runs on a fresh machine: `make demo` and `make test`.
# Both set up what they need (a venv in .venv, Debian's espeak-ng) and are idempotent.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny.yaml

.PHONY: demo test setup clean

setup: $(STAMP) /usr/bin/espeak-ng

/usr/bin/espeak-ng:
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng) || \
	  (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(PY) $(VENV)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/python -m jobs.pipeline --config $(CONFIG)

test: setup
	$(VENV)/bin/python -m pytest tests

clean:
	rm -rf $(VENV) runs assets data
