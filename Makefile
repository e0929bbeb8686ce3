# duckcell developer entry points. `make demo` and `make test` work from a fresh clone:
# they install the package, bring up a Docker engine when none answers (scripts/ensure-docker.sh)
# and build the sandbox image when it is missing or out of date.
PYTHON ?= python3
STAMP := .make/installed

.PHONY: install engine image proto proto-check lint test test-unit test-integration demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

engine:
	@bash scripts/ensure-docker.sh

image: install engine
	duckcell image build

proto: install
	$(PYTHON) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		launcher/protocol/runner.proto launcher/protocol/controlplane.proto

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test-unit: install
	$(PYTHON) -m pytest tests/unit -q

test-integration: image
	$(PYTHON) -m pytest tests/integration -q

test: lint image
	$(PYTHON) -m pytest tests -q

demo: image
	duckcell query "SELECT count(*) AS trips, round(avg(fare), 2) AS avg_fare, \
		max(distance_km) AS longest_km FROM (SELECT (i % 97) * 0.5 + 3 AS fare, \
		(i % 41) * 0.7 AS distance_km FROM range(10000000) t(i))"

bench: image
	$(PYTHON) bench/bench_sandbox.py

clean:
	rm -rf .make build dist *.egg-info .pytest_cache .ruff_cache
