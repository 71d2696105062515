# The README's two commands are `make run` and `make test`.
SWIFT ?= swift

.PHONY: setup build run test test-fast flower-test http-test
setup:
	bash scripts/setup.sh

build: setup
	$(SWIFT) build -c release

run: build
	bash scripts/run_default.sh

test: setup
	$(SWIFT) build -c release --product pf2lora
	$(SWIFT) test
	bash scripts/flower_test.sh
	bash scripts/http_test.sh

# The inner loop: the suite without its slow classes, by test name (`swift test --skip` regexes;
# Swift Testing's `tag:` filters are not in the 6.3 toolchain). Under a minute on this 2-core machine;
# `make test` (CI) still runs everything. A new test that starts server processes, kills processes,
# fuzzes for long or trains for seconds goes in one of these classes, or its suite name here.
SLOW_SERVER_PROCESSES = ServerTests|ServerHardeningTests|ServerDrainTests|ServerTrainingControlTests/(trainingRequests|cancel)|PersonalizeTests|FederatedClientTests|FederateTests|DemoClientTests|CLIHardeningTests/randomModel|TokenizerFamilyTests/tokenizeCommand|ChatTemplateTests/tokenizeMessagesCommand|ChatTemplateTests/generateWithMessages|Llama3InstructTests/(generateCommand|serveStops)|LlamaFamilyServingTests/serveManyClientsOnALlamaBase
SLOW_CRASH_AND_CONCURRENCY = Reliability|BatchInvarianceTests
SLOW_FUZZ = FuzzProtocolTests
SLOW_TRAINING = WeightPrecisionServingTests/q8_0Perplexity|SyntheticTests|DefaultModelTests|GPT2TaskTests/federatedRun|GPT2TaskTests/storeMapping|GradientPretrainTests/lossGoesDown|LlamaFamilyServingTests/federationOnALlamaBase
SLOW_TESTS = $(SLOW_SERVER_PROCESSES)|$(SLOW_CRASH_AND_CONCURRENCY)|$(SLOW_FUZZ)|$(SLOW_TRAINING)
test-fast:
	$(SWIFT) test --skip '$(SLOW_TESTS)'

# The OpenAI-compatible HTTP endpoint (docs/HTTP.md) driven by the pinned `openai` package.
http-test: setup
	bash scripts/http_test.sh

# PF2LoRA on Flower (docs/FLOWER.md): two pf2lora nodes under a real SuperLink, checked against `federate`.
flower-test: setup
	bash scripts/flower_test.sh

# Reliability (docs/RELIABILITY.md): the suite under ThreadSanitizer and AddressSanitizer, and the
# libFuzzer targets (FUZZ_SECONDS each).
.PHONY: sanitize fuzz
FUZZ_SECONDS ?= 300
sanitize: setup
	bash scripts/sanitize.sh

fuzz:
	bash Fuzz/build.sh
	mkdir -p .build/fuzz/corpus-protocol .build/fuzz/corpus-adapter
	ASAN_OPTIONS=detect_leaks=0 .build/fuzz/protocol-fuzzer -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -dict=Fuzz/json.dict -print_final_stats=1 .build/fuzz/corpus-protocol Fuzz/seeds/protocol
	ASAN_OPTIONS=detect_leaks=0 .build/fuzz/adapter-fuzzer -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -print_final_stats=1 .build/fuzz/corpus-adapter Fuzz/seeds/adapter

# The embedded default from scratch (issue 16): Debian description corpus, tokenizer, Llama-family base,
# PF2LoRA federation of the section clients, docs/RESULTS.md (~2 h on 2 cores; pretraining resumes).
# Needs Debian's package index: `apt-get update -o Acquire::Languages=en` (the script says so if missing).
.PHONY: reproduce reproduce-fortunes
reproduce: setup
	bash scripts/reproduce.sh

# The first-generation default (GPT-2 on fortunes, models/fortune-gpt2 + adapters/fortune-gpt2) and
# docs/RESULTS-fortunes.md (~1 h).
reproduce-fortunes: setup
	bash scripts/reproduce_fortunes.sh

# The fair protocol of issue 13 (matched compute, equal tuning, seeds, statistics): docs/SYNTHETIC-fair.md,
# docs/SYNTHETIC-rank-sweep.md, docs/RESULTS-data-to-text.md, docs/RESULTS-fortune-fair.md (resumable; hours).
.PHONY: fair
fair: setup
	bash scripts/fair_experiments.sh all
