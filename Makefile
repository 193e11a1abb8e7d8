# hometeam — the two set-up commands are `make run` and `make test`; each installs what it needs.
.PHONY: help run test bench stack-up stack-down stack-status docs up down

help:
	@echo "make run         the system: local Kafka + FerretDB, the five services (Ctrl-C stops all)"
	@echo "make test        every test, on a real Kafka broker and a real store"
	@echo "make bench       benchmarks: pipeline sweep vs raw Kafka, routing decision, sweeper (docs/benchmarks.md)"
	@echo "make stack-up    only the local Kafka + FerretDB (scripts/stack.sh up)"
	@echo "make stack-down  stop what stack-up started"
	@echo "make docs        regenerate the AsyncAPI documents under docs/asyncapi/"
	@echo "make up          with Docker: build the image, start everything (docker compose up -d --build)"
	@echo "make down        with Docker: stop and remove what make up started (volumes are kept)"

run:
	bash scripts/run.sh

test:
	bash scripts/test.sh

bench:
	bash scripts/bench.sh

stack-up:
	bash scripts/bootstrap.sh
	bash scripts/stack.sh up

stack-down:
	bash scripts/stack.sh down

stack-status:
	bash scripts/stack.sh status

docs:
	bash scripts/bootstrap.sh
	.venv/bin/python scripts/asyncapi.py write

up:
	docker compose -p hometeam up -d --build
	@echo "hometeam is starting; 'docker compose -p hometeam ps' shows health. See docs/deployment.md."
	@echo "  ingest http://127.0.0.1:8081  team-routing :8082  conversation-state :8083  timeout-sweeper :8084  metrics :8085"
	@echo "  Prometheus http://127.0.0.1:9090  Grafana http://127.0.0.1:3000  Jaeger http://127.0.0.1:16686"

down:
	docker compose -p hometeam down
