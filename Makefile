PY ?= python3

.PHONY: install test digits

# Installs fastdit and its test tools. A machine without torch gets the 2.13.0 build first, so that
# pip does not resolve torch itself while installing the dependencies.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'

test: install
	$(PY) -m pytest -q tests
