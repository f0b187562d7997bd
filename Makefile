# The two quick-start commands. DATA_ROOT names a folder holding mnist/ (raw IDX files); without it
# the demo downloads MNIST through torchvision.
.PHONY: setup demo test lint

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .
