# The README's two commands are `make run` and `make test`.
SWIFT ?= swift

.PHONY: setup build run test
setup:
	bash scripts/setup.sh

build: setup
	$(SWIFT) build -c release

run: build
	bash scripts/run_default.sh

test: setup
	$(SWIFT) build -c release --product pf2lora
	$(SWIFT) test
