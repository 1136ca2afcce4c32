# The README's two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: test test-fast demo app lint typecheck bench bench-toyworld bench-methods bench-methods-flux bench-options toyworld-base toyworld-flux toyworld-oracle clean

# dev: the test tools; app: persres app (gradio), which the tests drive too
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,app]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench scripts
	$(PY) -m pytest -q

# The tests without the slow ones (full trainings, several processes): under a minute.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow'

demo: $(STAMP)
	bash scripts/demo.sh

# The web app on http://127.0.0.1:7860 (the toy world by default; runs in ./app-runs). Ctrl-C stops it.
app: $(STAMP)
	$(VENV)/bin/persres app

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/train_step.py
	$(PY) bench/sampling.py

# The toy world's quality benchmarks, as run for bench/RESULTS.md (2 CPU cores: about 70 and 25 minutes).
bench-toyworld: $(STAMP)
	$(PY) bench/toyworld_quality.py --ranks 0.05 1 8 32 --sweep-concepts 3 --out bench-output/toyworld
	$(PY) bench/toyworld_class_source.py --out bench-output/toyworld-class

# Every method in one toy-world harness, with residuals' experiments, as run for bench/RESULTS.md ("The
# methods side by side"; 2 CPU cores: about 50 minutes of sweep on two training instances, then 15 minutes
# per held-out concept). A rerun continues where it stopped.
bench-methods: $(STAMP)
	$(PY) bench/toyworld_methods.py --out bench-output/toyworld-methods --experiments

# The same harness on the toy Flux base: residuals (the toy rank 0.05 m, and Flux's default rank 21) and
# LoRA, swept alike; residuals with a smaller update and with only one kind of block's residuals on at
# sampling, to say where text goes (bench/RESULTS.md, "Toy Flux world: the methods side by side").
bench-methods-flux: $(STAMP)
	$(PY) bench/toyworld_methods.py --base models/toyworld-flux --methods residuals lora \
		--change residuals:rank=21 --change residuals:lr=0.001 \
		--change residuals:layers=transformer_blocks. --change residuals:layers=single_transformer_blocks. \
		--change residuals:mask=attention,mask_background_weight=1,mask_background_target=base \
		--out bench-output/toyworld-methods-flux

# Residuals (and LoRA) on the toy U-Net base with each training option of the masked-training issue, from
# the recipes the sweep of bench-methods chose (bench/RESULTS.md, "Learning the concept, not the photos").
bench-options: $(STAMP)
	$(PY) bench/toyworld_methods.py --methods residuals lora --chosen residuals=400@5 --chosen lora=400@5 \
		--change residuals:mask=object --change residuals:mask=attention \
		--change residuals:mask=attention-trained --change lora:mask=object \
		--change residuals:timestep_weighting=min-snr --change residuals:lr_schedule=cosine \
		--change residuals:steps=800,lr_schedule=cosine \
		--change residuals:mask=attention-trained,timestep_weighting=min-snr \
		--change residuals:mask=attention-trained,mask_background_weight=0.1 \
		--change residuals:mask=attention,mask_background_weight=1,mask_background_target=base \
		--change residuals:mask=attention,mask_background_weight=0.3,mask_background_target=base \
		--change residuals:mask=attention,mask_background_weight=1,mask_background_target=base,timestep_weighting=min-snr \
		--change residuals:mask=object,mask_background_weight=1,mask_background_target=base \
		--change lora:mask=attention,mask_background_weight=1,mask_background_target=base \
		--out bench-output/toyworld-masks

# Rebuild the shipped toy-world models from scratch (fixed seeds; see each model's README.md).
# Each refuses to overwrite: move the shipped folder away first.
toyworld-base: $(STAMP)
	$(PY) -m persres.toyworld.train_base --work toyworld-work --out models/toyworld-base

# The Flux-shaped toy base: reuses models/toyworld-base's VAE (2 CPU cores: about two hours).
toyworld-flux: $(STAMP)
	$(PY) -m persres.toyworld.train_flux_base --work toyworld-flux-work --out models/toyworld-flux

toyworld-oracle: $(STAMP)
	$(PY) -m persres.toyworld.train_oracle --out models/toyworld-oracle

clean:
	rm -rf $(VENV) demo-output bench-output
