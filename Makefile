# Two commands do all the set-up on a fresh machine:
#   make run    build .venv, then teacher -> Stage I -> II -> III -> IV -> one results table
#   make test   build .venv, then the unit tests, the tiny end-to-end pipeline, and ddp-smoke
PY     ?= .venv/bin/python
# how the training scripts are started: $(PY), or torchrun for data parallelism (ddp-smoke)
LAUNCH ?= $(PY)
TORCHRUN = .venv/bin/torchrun --standalone --nproc_per_node=2
RUN    ?= out/default
SMOKE  ?= out/smoke
PRESET ?= default
SEED   ?= 0

.PHONY: venv run pipeline smoke ddp-smoke ddp-smoke-quiet pytest test bench gpu-check stage1-inits ablate ablate-quick clean

# requirements-test.txt: math-verify, the grader's test oracle (tests/test_grader.py), not a
# run-time dependency. pip through the venv's python: a copied venv's pip script can point elsewhere.
.venv/.installed: requirements.txt requirements-test.txt
	python3 -m venv .venv
	.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
	.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

venv: .venv/.installed

# The whole method on the built-in math suite. DIR, PRESET and SEED pick where and how.
pipeline:
	$(LAUNCH) train_teacher.py  --preset $(PRESET) --seed $(SEED) --out $(DIR)/teacher.pt
	$(LAUNCH) stage1_cluster.py --preset $(PRESET) --seed $(SEED) --in $(DIR)/teacher.pt --out $(DIR)/stage1.pt
	$(LAUNCH) stage2_distill.py --preset $(PRESET) --seed $(SEED) --in $(DIR)/stage1.pt  --out $(DIR)/stage2.pt
	$(LAUNCH) stage3_prgrpo.py  --preset $(PRESET) --seed $(SEED) --in $(DIR)/stage2.pt  --out $(DIR)/stage3.pt
	$(LAUNCH) stage4_balance.py --preset $(PRESET) --seed $(SEED) --in $(DIR)/stage3.pt  --out $(DIR)/stage4.pt
	$(PY) eval_math.py --table $(DIR)

run: venv
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory pipeline DIR=$(RUN) PRESET=$(PRESET) SEED=$(SEED) && \
	echo "make run: $$(( $$(date +%s) - start )) s wall"

smoke: venv
	$(MAKE) --no-print-directory pipeline DIR=$(SMOKE) PRESET=tiny

# the tiny pipeline with 2 data-parallel processes (gloo on CPU)
ddp-smoke: venv
	$(MAKE) --no-print-directory pipeline DIR=out/ddp-smoke PRESET=tiny LAUNCH="$(TORCHRUN)"

# pytest and ddp-smoke side by side: both are mostly single-threaded start-up and tiny models,
# so on two cores this takes about the time of the longer one
test: venv
	@rm -rf out/ddp-smoke && mkdir -p out
	@$(MAKE) --no-print-directory -j2 pytest ddp-smoke-quiet

pytest: venv
	$(PY) -m pytest -q tests

ddp-smoke-quiet: venv
	@$(MAKE) --no-print-directory ddp-smoke > out/ddp-smoke.log 2>&1 \
	  && echo "ddp-smoke: passed (log in out/ddp-smoke.log)" \
	  || (tail -40 out/ddp-smoke.log; echo "ddp-smoke: FAILED"; exit 1)

# Stage I baselines: the same warmup budget from three initialisations (needs $(RUN)/teacher.pt)
stage1-inits: venv
	for init in cluster random_subsets random; do \
	  $(PY) stage1_cluster.py --preset $(PRESET) --seed $(SEED) --init $$init --in $(RUN)/teacher.pt \
	    --out $(RUN)/inits/stage1_$$init.pt 2>/dev/null | grep "val loss" | sed "s/^/$$init: /"; \
	done

# the ablation study over seeds 0 1 2 (ablate.py): results/, RESULTS.md; --quick: tiny preset,
# results_quick/, RESULTS_quick.md. Resumable: run it again to continue.
ablate: venv
	$(PY) ablate.py

ablate-quick: venv
	$(PY) ablate.py --quick

bench: venv
	$(PY) bench.py --json out/bench.json

# on a lent GPU: CUDA tests, kernel, gpu-preset pipeline, Stage III twice (gpu_check.py);
# try it first on CPU with `make gpu-check GPU_CHECK=--dry-run`
gpu-check: venv
	$(PY) gpu_check.py --out out/gpu_check $(GPU_CHECK)

clean:
	rm -rf out .venv
