# hometeam — the two set-up commands are `make run` and `make test`; each installs what it needs.
.PHONY: help run test stack-up stack-down stack-status docs

help:
	@echo "make run         the system: local Kafka + FerretDB, the five services (Ctrl-C stops all)"
	@echo "make test        every test, on a real Kafka broker and a real store"
	@echo "make stack-up    only the local Kafka + FerretDB (scripts/stack.sh up)"
	@echo "make stack-down  stop what stack-up started"
	@echo "make docs        regenerate the AsyncAPI documents under docs/asyncapi/"

run:
	bash scripts/run.sh

test:
	bash scripts/test.sh

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
