# Kagzi's build, test and lint entry points. Every Go module of go.work is tested and
# linted on its own (go test ./... does not cross module boundaries).

SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)

GO      ?= go
MODULES := libs libs/workflowcheck services examples migrations
BINS    := kagzi scheduler timer executor

# staticcheck 2026.2.2: the 2025.1 releases predate Go 1.26 and are not on the module proxy.
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/kagzi/kagzi/services/internal/cli.Version=$(VERSION)

# Two packages at a time: the machines have two cores, and every package that talks to
# PostgreSQL makes its own databases, so more would only queue on the server.
TESTFLAGS ?= -race -count=1 -p 2 -timeout 9m

.PHONY: all build dev demo test lint tidy bench chaos clean

all: build

build:
	@mkdir -p bin
	cd services && $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o ../bin/ $(addprefix ./,$(BINS))

dev:
	$(GO) run ./services/kagzi dev

demo:
	./scripts/demo.sh

# Runs every module even when one fails, so one run shows every failure.
test:
	@fail=""; \
	for m in $(MODULES); do \
		echo "=== go test $$m"; \
		(cd $$m && $(GO) test $(TESTFLAGS) ./...) || fail="$$fail $$m"; \
	done; \
	if [ -n "$$fail" ]; then echo "FAILED modules:$$fail"; exit 1; fi

lint:
	@unformatted=$$(gofmt -l $(MODULES)); \
	if [ -n "$$unformatted" ]; then echo "gofmt -l:"; echo "$$unformatted"; exit 1; fi
	@fail=""; \
	for m in $(MODULES); do \
		echo "=== vet and staticcheck $$m"; \
		(cd $$m && $(GO) vet ./... && $(GO) run $(STATICCHECK) ./...) || fail="$$fail $$m"; \
	done; \
	if [ -n "$$fail" ]; then echo "FAILED modules:$$fail"; exit 1; fi

tidy:
	@for m in $(MODULES); do echo "=== go mod tidy $$m"; (cd $$m && $(GO) mod tidy) || exit 1; done

# `kagzi bench`: every scenario of issue 4 against fresh databases on DATABASE_URL's
# server (the table on stdout, bench.json beside it; BENCHFLAGS="--scenarios s1,s2" and
# the like pass through), then the store's hot-path micro-benchmarks, whose output two
# runs can be compared by. A failed scenario fails the target, after both have run.
BENCHFLAGS ?=
bench:
	@mkdir -p bin
	cd services && $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o ../bin/kagzi ./kagzi
	@status=0; bin/kagzi bench --out bench.json $(BENCHFLAGS) || status=$$?; \
	(cd libs && $(GO) test -run '^$$' -bench . -benchtime 200x ./store/) || status=$$?; \
	exit $$status

# The fault battery (services/internal/battery) at its full chaos sizes, one test at a
# time, then the security battery's chaos tier (S08), then their summary tables: test,
# faults injected, runs, lost, duplicate results, duplicate bodies (attributable or not),
# stuck, verdict; for S08 what was refused and measured.
chaos:
	@mkdir -p bin && rm -f bin/chaos-summary.txt
	@cd services && $(GO) test -race -count=1 -p 1 -timeout 120m ./internal/battery/ \
		-args -kagzi.chaos -kagzi.summary=$(CURDIR)/bin/chaos-summary.txt; \
	status=$$?; \
	$(GO) test -race -count=1 -timeout 20m -run 'TestS08' ./internal/security/ \
		-args -kagzi.chaos -kagzi.summary=$(CURDIR)/bin/chaos-summary.txt || status=1; \
	cd $(CURDIR)/libs && start=$$(date +%s) && \
		if $(GO) test -count=1 -timeout 60m -run '^TestModel$$' ./store/ -rapid.checks=20000; then v=PASS; else v=FAIL; status=1; fi; \
	echo "TestModel (T17): 20,000 sequences of the store against its model: $$v in $$(( $$(date +%s) - start )) s" >> $(CURDIR)/bin/chaos-summary.txt; \
	echo; cat $(CURDIR)/bin/chaos-summary.txt 2>/dev/null; exit $$status

clean:
	rm -rf bin
