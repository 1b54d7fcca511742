# The two commands a new user needs (see README.md):
#   make repro   set up .venv if needed, then run the whole pipeline with `dvc repro`
#   make test    set up .venv if needed, then lint and run the whole test suite (CI runs this)
#   make test-fast   the pure unit tests only (`pytest -m "not slow"`, under a minute)
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# OpenCV 4.x beside the venv's 5.x (`dev` extra): one site-packages holds one cv2, so it goes
# to $(VENV)/opencv4 and pipeline/runtimes.py runs it in a subprocess with it on PYTHONPATH.
OPENCV4 := opencv-python-headless>=4.14,<5
export PATH := $(BIN):$(PATH)

# Syne Tune (MOASHA, the baseline of benchmarks/pareto_search.py) beside the venv: only its own
# package (MOASHA imports nothing of its dependencies that .venv lacks; xgboost etc. not needed)
SYNE_TUNE := syne-tune==0.16.0

.PHONY: repro test test-fast lint format mutation clean setup bench-deps device-wheels

setup: $(STAMP)

# (Re)install when .venv is missing or pyproject.toml changed since the last install.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -rf $(VENV)/opencv4
	$(BIN)/python -m pip install --quiet --no-deps --target $(VENV)/opencv4 "$(OPENCV4)"
	touch $(STAMP)

bench-deps: $(STAMP)
	test -d $(VENV)/syne-tune || $(BIN)/python -m pip install --quiet --no-deps --target \
		$(VENV)/syne-tune "$(SYNE_TUNE)"

# Wheels the GPU machine lacks (it has no internet), into the git-ignored .whl/ that
# benchmarks/gpu_check.sh installs (about 6 MB; carry it: run(carry=[".whl"], ...)): airbench for
# benchmarks/vs_airbench.py, a pure-Python sdist built into a py3 wheel (its torch and
# torchvision are already on that machine), and Optuna with its SQL layer, for the GPU search
# test, as the venv pins them, for that machine's Python 3.12.
AIRBENCH := airbench==0.1.8
DEVICE_PY := 3.12

device-wheels: $(STAMP)
	$(BIN)/python -m pip wheel --quiet --no-deps -w .whl "$(AIRBENCH)"
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version \
		$(DEVICE_PY) -d .whl $$($(BIN)/python -m pip freeze | grep -i -E \
		'^(optuna|alembic|sqlalchemy|colorlog|mako)==')

repro: $(STAMP)
	$(BIN)/python -m dvc repro

# Every tier (unit, integration, e2e; gpu tests skip without a GPU), after the lint.
test: lint
	$(BIN)/python -m pytest --durations=15  # the 15 slowest tests, to keep the suite short

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# Mutation testing (mutmut, configured in [tool.mutmut] of pyproject.toml): each mutant of these
# functions runs against the fast unit tests that reach it, then the kill rate per module and
# the surviving mutants are printed (tests/MUTATION.md: the last figures, equivalent mutants).
# To add a module: its file in only_mutate, its tests in pytest_add_cli_args_test_selection,
# its mutant names (globs) here. Minutes on 2 cores.
MUTATION_TARGETS ?= pipeline.config.* pipeline.stats.* \
	pipeline.inference.*preprocess__* pipeline.inference.*_to_pil__* \
	pipeline.inference.*_as_list__* pipeline.inference.*_image_name__* \
	pipeline.study.* \
	pipeline.search_study.x_summarize__* pipeline.search.x_check_above_chance__* \
	pipeline.search.x_choose_tuned__* pipeline.search_study.x_trial_rows__* \
	pipeline.search_study.x__worker_threads__* \
	pipeline.ratio_search.x_judge__* pipeline.ratio_search.x_search_ratio__* \
	pipeline.ratio_search.x_reuse_equal_widths__* pipeline.compress.x_resolve_params__* \
	pipeline.ratio_search.x_attempts_note__* \
	pipeline.export_variant.x_must_agree__* pipeline.export_variant.x_finish_variant__* \
	pipeline.champion.x_summarize_latency__* pipeline.champion.x_faster__* \
	pipeline.champion.x_recommend__* pipeline.champion.x_alias_decision__* \
	pipeline.export_checks.x_check_parity__* \
	pipeline.pareto.* pipeline.search_space.* pipeline.pareto_study.x_select__* \
	pipeline.pareto_study.x_should_stop__* pipeline.pareto_study.x_rung_points__* \
	pipeline.pareto_study.x_baseline_fits__* pipeline.arch_cost.x_study_cost__*
QUOTED_TARGETS := $(foreach t,$(MUTATION_TARGETS),'$(t)')

mutation: $(STAMP)
	rm -rf mutants
	nice -n 10 $(BIN)/mutmut run $(QUOTED_TARGETS) > mutants.log 2>&1 || (tail -40 mutants.log; false)
	$(BIN)/python tests/mutation_report.py $(QUOTED_TARGETS)

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/ruff format --check pipeline tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format pipeline tests benchmarks
	$(BIN)/ruff check --fix pipeline tests benchmarks

clean:
	rm -rf data/prepared models metrics reports plots mlflow.db mlruns mutants mutants.log
