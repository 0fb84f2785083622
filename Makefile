# make demo: set up, build the built-in data, then every stage of the pipeline with the built-in
# configs at full length (data/shapes/demo.py lists them): the tokenizer (train, dump the codes,
# probe), then the DiT (train, reconstructions of val codes) and the prior, beside the text model,
# then sample.py's uncond, compose and text modes; one table of each stage's wall time and quality
# against its floor, out-demo/demo.json and one labeled picture, out-demo/demo.png.
# make test: set up, then the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := out-demo

.PHONY: demo test results venv data clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

data: data/shapes/meta.json
data/shapes/meta.json: data/shapes/prepare.py $(VENV)/.installed
	$(PY) data/shapes/prepare.py

demo: venv data
	$(PY) data/shapes/demo.py --out_dir=$(DEMO)

test: venv
	$(PY) -m pytest -q tests

# make results: the paper's claims against baselines, full-length runs (hours; resumable: a stage
# that finished is not run again), then docs/results.md. After the shared stages, the two seeds'
# stages run side by side, one thread each (about half the 3-4 hours of one stage at a time; the
# script's --parallel=False runs them in turn). data/shapes/results.py lists the stages.
results: venv data
	$(PY) data/shapes/results.py

# make clean: every output folder of make demo, make results, the README's built-in commands and
# the scripts' defaults. Kept: the data, docs/ and assets/, and the multi-day runs' out-imagenet-*
# and out-folder-*.
clean:
	rm -rf $(DEMO) out-shapes out-shapes-* out-oracle out-results \
		out-tokenizer out-diffusion out-prior out-text2dlc out-samples
