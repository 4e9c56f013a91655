# The README's two commands: `make demo` (the main job on the embedded tiny default) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test lint

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
# speechtokenizer without its declared deps: they are its trainer's and pull a torchaudio that breaks.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps speechtokenizer==1.0.1
	$(PIP) install -q -e ".[dev,qlora,deepspeed]"

# Until training lands: build the tiny default and answer a spoken prompt (random weights: noise out).
demo: install
	speechlm init configs/tiny/model.yaml --out out/tiny
	speechlm generate --model out/tiny --audio configs/tiny/sample.flac --text "What did you hear?" \
		--output text+speech --out-audio out/tiny-answer.wav

test: install
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
