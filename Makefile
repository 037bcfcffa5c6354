# Build, test and run the KMS locally. `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# cargo from rustup is often not on PATH in non-login shells (CI, sudo).
ifeq ($(shell command -v cargo 2>/dev/null),)
  ifneq ($(wildcard $(HOME)/.cargo/bin/cargo),)
    export PATH := $(HOME)/.cargo/bin:$(PATH)
  endif
endif

CARGO         ?= cargo
DEV_DIR       := .dev
SOFTHSM_DIR   := $(DEV_DIR)/softhsm
SOFTHSM_LABEL := kms-dev
PKI_DIR       := $(DEV_DIR)/pki
KMSCTL        ?= target/release/kmsctl
KMS_SERVER    ?= target/release/kms-server
SERVER_CONFIG ?= config/kms-server.example.toml
# Key backend of `make demo`: pkcs11 (SoftHSM) or tpm (a swtpm the demo starts and stops).
BACKEND       ?= pkcs11

.PHONY: help deps build dev-env dev-softhsm dev-pki demo test lint bench run-server clean-dev
# Steps depend on each other's side effects (packages, binaries); cargo parallelises itself.
.NOTPARALLEL:

help:
	@echo "make deps        install missing Debian packages (scripts/install-deps.sh)"
	@echo "make build       cargo build --release --workspace"
	@echo "make dev-env     SoftHSM token '$(SOFTHSM_LABEL)' in $(SOFTHSM_DIR) + dev PKI in $(PKI_DIR)"
	@echo "make demo        deps, build, dev-env, scripts/demo.sh (BACKEND=tpm: on a swtpm)"
	@echo "make lint        cargo fmt --check + clippy -D warnings"
	@echo "make test        deps, lint, then build + cargo test with a PostgreSQL (scripts/with-postgres.sh)"
	@echo "make bench       deps, then scripts/bench.sh \$$(BENCH_ARGS) (release build, own server and token)"
	@echo "make run-server  kms-server in the foreground with $(SERVER_CONFIG)"
	@echo "make clean-dev   rm -rf $(DEV_DIR)"

deps:
	scripts/install-deps.sh

build:
	$(CARGO) build --release --workspace

dev-env: dev-softhsm dev-pki

dev-softhsm:
	softhsm-setup/init-token.sh --dir $(SOFTHSM_DIR) --label $(SOFTHSM_LABEL)

# `kmsctl pki init` keeps existing files and only adds what is missing.
dev-pki: build
	$(KMSCTL) pki init --dir $(PKI_DIR) --server-name localhost \
	    --client admin --client notes-store --client app --client auditor

demo: deps build dev-env
	BACKEND=$(BACKEND) scripts/demo.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: deps lint
	scripts/with-postgres.sh bash -euo pipefail -c \
	    '$(CARGO) build --workspace --bins && $(CARGO) test --workspace'

# kms-bench starts its own server with its own token and PKI: .dev is not needed.
bench: deps
	scripts/bench.sh $(BENCH_ARGS)

run-server: build dev-env
	SOFTHSM2_CONF=$(CURDIR)/$(SOFTHSM_DIR)/softhsm2.conf \
	    KMS_PKCS11_PIN_FILE=$(CURDIR)/$(SOFTHSM_DIR)/user.pin \
	    $(KMS_SERVER) --config $(SERVER_CONFIG)

clean-dev:
	rm -rf $(DEV_DIR)
