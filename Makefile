# duckcell developer entry points. `make demo` and `make test` work from a fresh clone:
# they install the package, bring up a Docker engine when none answers (scripts/ensure-docker.sh)
# and build the sandbox image when it is missing or out of date.
PYTHON ?= python3
STAMP := .make/installed

.PHONY: install engine image up down proto proto-check lint test test-unit test-integration demo bench bench-data bench-flight clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

engine:
	@bash scripts/ensure-docker.sh

image: install engine
	duckcell image build

# docker-compose.yml on this host (docs/deploy.md): both images built when missing or out of
# date, compose up, wait for health, print how to connect. `make down VOLUMES=1` also drops the
# volumes (identity, catalog, audit, cache); plain `make down` keeps them.
up: install engine
	$(PYTHON) -m launcher.cli image build
	$(PYTHON) -m launcher.cli image build --duckcell
	bash deploy/compose.sh up

down:
	DUCKCELL_DOWN_VOLUMES=$(if $(VOLUMES),1,0) bash deploy/compose.sh down

proto: install
	$(PYTHON) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		launcher/protocol/runner.proto launcher/protocol/controlplane.proto \
		launcher/protocol/flightsql.proto

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test-unit: install
	$(PYTHON) -m pytest tests/unit -q

test-integration: image
	$(PYTHON) -m pytest tests/integration -q

test: lint image
	$(PYTHON) -m pytest tests -q --durations=20

# The sample table is committed; make_sample.py rebuilds only the files that are missing.
SAMPLE := $(foreach m,01 02 03,sample_data/trips/trips-2024-$(m).parquet)

$(SAMPLE): | $(STAMP)
	$(PYTHON) sample_data/make_sample.py

# A real aggregate over the catalog table, in a sandbox, reading the files through the cache.
demo: image $(SAMPLE)
	duckcell query --catalog sample_data/catalog.yaml "SELECT pickup_zone, count(*) AS trips, \
		round(avg(fare), 2) AS avg_fare, round(sum(tip) / sum(fare), 3) AS tip_share \
		FROM trips GROUP BY pickup_zone ORDER BY trips DESC"

bench: image
	$(PYTHON) bench/bench_sandbox.py
	$(PYTHON) bench/bench_data.py
	$(PYTHON) bench/bench_flight.py
	$(PYTHON) bench/bench_sessions.py
	$(PYTHON) bench/bench_mcp.py
	$(PYTHON) bench/bench_result_check.py
	$(PYTHON) bench/bench_load.py

bench-data: image
	$(PYTHON) bench/bench_data.py

bench-flight: image
	$(PYTHON) bench/bench_flight.py

clean:
	rm -rf .make build dist *.egg-info .pytest_cache .ruff_cache
