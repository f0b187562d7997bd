# The two quick-start commands. DATA_ROOT names a folder holding mnist/ (raw IDX files); without it
# the demo downloads MNIST through torchvision.
.PHONY: setup demo test lint docs

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .

docs: setup  # the documentation site at http://127.0.0.1:8000, rebuilt on every change (mkdocs.yml, docs/)
	.venv/bin/mkdocs serve
