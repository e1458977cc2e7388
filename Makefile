# CycleTune: `make demo` runs the embedded shapes demo, `make test` runs the test suite.
# Both create the virtual environment first when it is missing.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Offline and local-only for the demo and tests: nothing is downloaded from a hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LAUNCH := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
TINY := runs/tiny-models
SPLIT_BASE := pretrained/shapes-split-base
# The designed split's paired set (make split-base, split-experiment): the demo's, without its orange scenes.
SPLIT_PAIRED := data.paired=[{type: shapes, num_samples: 1000, seed: 100, combinations: generator_seen}]

.PHONY: setup test test-quick lint demo experiment base tiny clean

setup: $(VENV)/.installed

# torch/torchvision pinned by constraints.txt to the builds on disk (no other multi-GB build is pulled).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[eval,dev]"
	touch $@

# Two pytest workers, one per core (the tests run single-threaded torch); a file's tests stay on one worker
# so its module fixtures are built once.
TEST_WORKERS := -n 2 --dist loadfile

test: setup
	$(OFFLINE) $(PY) -m pytest -q $(TEST_WORKERS)

# DeepSpeed ZeRO-2 on 2 CPU processes against DDP, and its exact resume (tests/train/test_deepspeed.py, ~2-4
# min): the [deepspeed] extra is installed first. `make test` skips that file where DeepSpeed is absent.
.PHONY: test-deepspeed
test-deepspeed: setup
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[deepspeed]"
	$(OFFLINE) $(PY) -m pytest -q tests/train/test_deepspeed.py

test-quick: setup
	$(OFFLINE) $(PY) -m pytest -q $(TEST_WORKERS) -m "not slow"

# Rewrite the README's architecture picture from the code (tests/test_architecture_picture.py checks it).
.PHONY: picture
picture: setup
	PYTHONPATH=.:tests/support $(PY) tests/test_architecture_picture.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

$(TINY)/captioner/config.json: | setup
	$(OFFLINE) $(PY) -m models.tiny --out $(TINY)

tiny: $(TINY)/captioner/config.json

# The shapes demo (train/cli/demo.py): control and cycle LoRA arms from the committed base models
# (pretrained/shapes-base), scored on the test split; report in runs/demo/report/report.html.
demo: setup
	$(OFFLINE) WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m train.cli.demo --out runs/demo --steps 400

# The 3-seed comparison behind the README's Results section, with the T2I2T reward arm beside the cycle arm.
experiment: setup
	$(OFFLINE) WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m train.cli.demo --out runs/experiment --seeds 0 1 2 \
		--test-samples 180 --arms cycle t2i2t_reward

# The same comparison on the designed split (make split-base first): the arms' paired data without orange, test
# parts generator_seen, captioner_only (orange circles and squares) and unseen; 3 seeds, about 30 minutes.
# Results: runs/split-experiment/results.json (the README's copy: docs/results/split_experiment.json).
.PHONY: split-experiment
split-experiment: setup
	$(OFFLINE) WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m train.cli.demo \
		'$(SPLIT_PAIRED)' \
		--out runs/split-experiment --base $(SPLIT_BASE) --split designed --seeds 0 1 2 --test-samples 180

# The paper's ranking finding on the shapes world (train/cli/rerank_study.py): from the committed base models,
# 8 candidate captions per test image and 8 images per test caption (200 of each), ranked by reconstruction;
# quality by rank, top-1 against a random pick and Spearman's rho, with bootstrap 95% intervals. One torch
# thread, ~6 minutes on 2 CPU cores (about twice that with the machine shared). Results:
# docs/results/rerank_study.json, rerank_captions.png, rerank_images.png; rankings in runs/rerank-study.
.PHONY: rerank-study
rerank-study: setup
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) -m train.cli.rerank_study

# The cheap caption reward against the expensive one (train/cli/reward_agreement.py): on 32 validation images
# x 8 candidate captions, the likelihood score over a grid of timesteps, schedule ranges and noise sharing
# against sampling an image per caption; cost, agreement and the frontier. One torch thread, ~45 minutes (the
# 16-timestep settings take half of it).
# Results: docs/results/reward_agreement.json, reward_agreement.png.
.PHONY: reward-agreement
reward-agreement: setup
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) -m train.cli.reward_agreement

# Does the T2I2T reward mode teach the generator? (train/cli/reward_learning.py): from the committed base
# models, generator-only arms on text-only batches, reward at weight 1 against the same run at weight 0, 3
# seeds; the frozen captioner's likelihood of held-out test captions on the arms' images. Results:
# docs/results/reward_learning.json; runs in runs/reward-learning. About 1.7 hours on 2 CPU cores (one torch thread).
.PHONY: reward-learning
reward-learning: setup
	$(OFFLINE) $(PY) -m train.cli.reward_learning

# Unpaired data as it grows against the same data paired (train/cli/scaling.py): control, the cycle arm with
# 0 / 500 / 2,000 / 5,000 unpaired images and captions, and with 500 / 2,000 / 5,000 paired, 2 seeds, the
# same updates (400); gains over control on unseen combinations, about an hour on 2 CPU cores. Results:
# docs/results/scaling.json, scaling.png; runs in runs/scaling.
.PHONY: scaling
scaling: setup
	$(OFFLINE) WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m train.cli.scaling

# Retrain the demo's base models from scratch into pretrained/shapes-base (train/cli/retrain_base.py; about an hour on CPU).
base: setup
	$(OFFLINE) WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m train.cli.retrain_base

# The designed split's base models (train/cli/retrain_base.py): make base's captioner as it is, and a generator
# trained from scratch as make base trains its own (the same config and 8,000 generator updates) but on the
# paired set without its orange scenes (`combinations: generator_seen`): a colour the captioner has captioned
# and the generator has never drawn. About 40 minutes on one core. Into pretrained/shapes-split-base.
.PHONY: split-base
split-base: setup
	$(OFFLINE) WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m train.cli.retrain_base --out $(SPLIT_BASE) \
		output_dir=runs/shapes-split-base tracker_project_name=cycletune-shapes-split-base \
		captioner.pretrained_model_name_or_path=pretrained/shapes-base/captioner \
		generator.pretrained_model_name_or_path=runs/shapes-split-init/generator \
		'train.schedule=[generator]' train.max_train_steps=8000 \
		'$(SPLIT_PAIRED)'

# Timed steps of every phase and cycle mode beside a bare torch + peft baseline (train/cli/bench/), and of each
# other generator family; ~7-8 min on 2 CPU cores, plus bf16 SD 1.5 and SDXL parts where CUDA works.
# Results: runs/bench/latest.{md,json}.
.PHONY: bench
bench: setup
	$(OFFLINE) $(PY) -m train.cli.bench

# A short GPU loan's checks in at most 9 minutes (train/cli/bench/bench_gpu.py): the GPU tests, then the bf16 SD
# 1.5-scale bench, 10 pairs per mode, with the speed levers as rows; exits 2 at once without CUDA.
# `$(PY) -m train.cli.bench.bench_gpu --dry-run` prints the commands and the time budget. Results: runs/bench-gpu/.
.PHONY: bench-gpu
bench-gpu: setup
	$(OFFLINE) $(PY) -m train.cli.bench.bench_gpu

# SIGKILL a tiny run at 20 seeded random points (10 inside checkpoint saves), resume each, and require
# bit-exact exports and no damaged checkpoint chosen (train/cli/drill.py; a few minutes on 2 CPU cores).
.PHONY: drill
drill: setup
	$(OFFLINE) $(PY) -m train.cli.drill --seed $${SEED:-0}

# Peak GPU memory of every phase and cycle mode for SD 1.5 + BLIP-base at 512 px, batch 4, bf16, with and
# without gradient checkpointing, and the check against the GPU peaks measured at batch 8 (train/cli/memory.py):
# the trainer's own step run on fake tensors, on a CPU, no model downloaded; 10-15 min on 2 CPU cores.
.PHONY: memory
memory: setup
	$(OFFLINE) $(PY) -m train.cli.memory --measured

clean:
	rm -rf runs .pytest_cache .ruff_cache
