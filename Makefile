# make demo: set up, build the built-in data, train every stage briefly on the CPU, report.
# make test: set up, then the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := out-demo

.PHONY: demo test venv data clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

data: data/shapes/meta.json
data/shapes/meta.json: data/shapes/prepare.py $(VENV)/.installed
	$(PY) data/shapes/prepare.py

demo: venv data
	$(PY) tokenizer.py config/tokenizer_shapes.py --out_dir=$(DEMO)
	$(PY) tokenizer.py config/tokenizer_shapes.py --out_dir=$(DEMO) --mode=probe

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO) out-shapes
