# chatd: a plain Makefile. `make run` and `make test` are all a fresh Debian 12
# machine needs; both install what is missing first (target `deps`).

CXX      ?= g++
PYTHON   := /usr/bin/python3
BUILD    ?= build
SAN      ?=

CXXFLAGS_BASE := -std=c++20 -Wall -Wextra -Werror -Iinclude -MMD -MP -pthread
ifeq ($(SAN),1)
  CXXFLAGS_OPT := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
  LDFLAGS_SAN  := -fsanitize=address,undefined
else
  CXXFLAGS_OPT := -O2 -g
  LDFLAGS_SAN  :=
endif
CXXFLAGS += $(CXXFLAGS_BASE) $(CXXFLAGS_OPT)
LDLIBS   := -lfcgi -lhiredis -lcurl -ljwt -lcrypto -pthread
LDFLAGS  += $(LDFLAGS_SAN)

LIB_SRCS  := $(filter-out src/main_%.cc,$(wildcard src/*.cc))
LIB_OBJS  := $(LIB_SRCS:src/%.cc=$(BUILD)/obj/%.o)
UNIT_SRCS := $(wildcard tests/unit/*.cc)
UNIT_OBJS := $(UNIT_SRCS:tests/unit/%.cc=$(BUILD)/obj/unit/%.o)
BINS      := $(BUILD)/bin/chatd $(BUILD)/bin/chatd-cleanup $(BUILD)/bin/unit_tests

.PHONY: all deps run test asan unit integration bench install uninstall clean
all: $(BINS)

$(BUILD)/obj/%.o: src/%.cc
	@mkdir -p $(@D)
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(BUILD)/obj/unit/%.o: tests/unit/%.cc
	@mkdir -p $(@D)
	$(CXX) $(CXXFLAGS) -DBOOST_TEST_DYN_LINK -c $< -o $@

$(BUILD)/libchatd.a: $(LIB_OBJS)
	@mkdir -p $(@D)
	$(AR) rcs $@ $^

$(BUILD)/bin/chatd: $(BUILD)/obj/main_chatd.o $(BUILD)/libchatd.a
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/bin/chatd-cleanup: $(BUILD)/obj/main_cleanup.o $(BUILD)/libchatd.a
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/bin/unit_tests: $(UNIT_OBJS) $(BUILD)/libchatd.a
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $^ $(LDLIBS) -lboost_unit_test_framework -o $@

-include $(wildcard $(BUILD)/obj/*.d $(BUILD)/obj/unit/*.d)

# ---------------------------------------------------------------------------
# Dependencies: Debian 12 packages (docs/dependencies.md says why each) and the
# Chroma server from PyPI in a virtualenv. Idempotent: installs only what is
# missing, so it costs a few dpkg look-ups when everything is there.
DEB_PACKAGES := g++ make pkg-config libfcgi-dev spawn-fcgi multiwatch libhiredis-dev \
  libcurl4-openssl-dev rapidjson-dev libboost-test-dev libjwt-dev libssl-dev \
  nginx redis-server python3 python3-venv python3-pytest python3-uvloop curl wrk systemd
CHROMA_VENV  := .venv/chroma
CHROMA_STAMP := $(CHROMA_VENV)/.installed-$(shell sha1sum requirements-chroma.txt | cut -c1-12)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

deps: $(CHROMA_STAMP)
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "deps: installing$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(CHROMA_STAMP): requirements-chroma.txt
	@dpkg-query -W -f='$${Status}' python3-venv 2>/dev/null | grep -q 'install ok installed' || \
	  { $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv; }
	rm -rf $(CHROMA_VENV)
	$(PYTHON) -m venv $(CHROMA_VENV)
	$(CHROMA_VENV)/bin/pip install -q --disable-pip-version-check -r requirements-chroma.txt
	touch $@

# ---------------------------------------------------------------------------
run: deps all
	$(PYTHON) tests/harness/run_local.py --build $(BUILD)

unit: all
	$(BUILD)/bin/unit_tests

# Unit tests (Boost.Test) and integration tests (pytest against the real stack),
# ending with one line "N passed, N failed".
test: deps all
	$(PYTHON) tests/run_all.py --build $(BUILD)

# The same tests against an AddressSanitizer + UBSan build.
asan:
	$(MAKE) BUILD=build-asan SAN=1 test

bench: deps all
	$(PYTHON) bench/run_bench.py --build $(BUILD)

clean:
	rm -rf build build-asan
