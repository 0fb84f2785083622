# make demo: set up, build the built-in data, train every stage briefly on the CPU, report.
# Stages: tokenizer (train, dump the codes of every split, probe, then the scorer's report: how
# the codes' positions carry the factors, and how held-out pairs read), diffusion (train,
# reconstructions of val codes and of ood codes, scored), prior (train, held-out ELBO, samples
# read by the probe), the text model (train, codes for a few prompts), a class-conditional DiT
# (the baseline), then every sample.py mode (recon, uncond, compose, class, text) and one table
# of their scores. The trainers write arrays; data/shapes/score.py scores them.
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
	$(PY) tokenizer.py config/tokenizer_shapes.py --out_dir=$(DEMO)
	$(PY) tokenizer.py config/tokenizer_shapes.py --out_dir=$(DEMO) --mode=dump
	$(PY) tokenizer.py config/tokenizer_shapes.py --out_dir=$(DEMO) --mode=probe
	$(PY) data/shapes/score.py --codes_dir=$(DEMO)
	$(PY) diffusion.py config/diffusion_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --max_iters=3000 --sample_interval=3000
	$(PY) diffusion.py config/diffusion_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --mode=recon --n_recon=200
	$(PY) data/shapes/score.py --images=$(DEMO)/recon_val.npz --split=val
	$(PY) diffusion.py config/diffusion_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --mode=recon --n_recon=200 --split=ood
	$(PY) data/shapes/score.py --images=$(DEMO)/recon_ood.npz --split=ood
	$(PY) prior.py config/prior_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --max_iters=600
	$(PY) prior.py config/prior_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --mode=eval
	$(PY) prior.py config/prior_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --mode=sample \
		--n_samples=1000 --num_steps=32 --remask_eta=0.05
	$(PY) data/shapes/score.py --samples=$(DEMO)/samples.npy --codes_dir=$(DEMO)
	$(PY) text2dlc.py config/text2dlc_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --max_iters=2000
	$(PY) text2dlc.py config/text2dlc_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO) --mode=sample \
		--prompts='a red square|a small green circle|a large blue triangle on a white background'
	$(PY) data/shapes/score.py --samples=$(DEMO)/text_codes.npy --prompts=$(DEMO)/text_codes_prompts.txt \
		--codes_dir=$(DEMO)
	$(PY) diffusion.py config/diffusion_shapes.py --codes_dir=$(DEMO) --out_dir=$(DEMO)/class --max_iters=1500 \
		--sample_interval=1500 --cond=class --num_classes=18
	$(PY) sample.py config/sample_shapes.py --mode=recon,uncond,compose,class,text --out_dir=$(DEMO)/samples \
		--tokenizer_dir=$(DEMO) --diffusion_dir=$(DEMO) --prior_dir=$(DEMO) --text2dlc_dir=$(DEMO) \
		--class_dit=$(DEMO)/class/diffusion.pt

test: venv
	$(PY) -m pytest -q tests

# make results: the paper's claims against baselines, full-length runs (hours; resumable: a stage
# that finished is not run again), then docs/results.md. data/shapes/results.py lists the stages.
results: venv data
	$(PY) data/shapes/results.py

# make clean: every output folder of make demo, make results, the README's built-in commands and
# the scripts' defaults. Kept: the data, docs/ and assets/, and the multi-day runs' out-imagenet-*
# and out-folder-*.
clean:
	rm -rf $(DEMO) out-shapes out-shapes-* out-oracle out-results \
		out-tokenizer out-diffusion out-prior out-text2dlc out-samples
