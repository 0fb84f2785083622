# make demo: set up, build the built-in data, train every stage briefly on the CPU, report.
# Stages so far: tokenizer (train, probe), diffusion (train, reconstructions of val codes),
# prior (train, held-out ELBO, samples, and the DiT's images of the sampled codes).
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
	$(PY) diffusion.py config/diffusion_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --max_iters=1200 --sample_interval=1200
	$(PY) diffusion.py config/diffusion_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --mode=recon --n_recon=200
	$(PY) prior.py config/prior_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --max_iters=600
	$(PY) prior.py config/prior_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --mode=eval
	$(PY) prior.py config/prior_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --mode=sample \
		--n_samples=1000 --num_steps=32 --remask_eta=0.05
	$(PY) diffusion.py config/diffusion_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --mode=decode \
		--codes_path=$(DEMO)/samples.npy --n_recon=200

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO) out-shapes
