# chatd: a plain Makefile. `make run` and `make test` are all a fresh Debian 12
# machine needs; both install what is missing first (target `deps`).

CXX      ?= g++
PYTHON   := /usr/bin/python3
BUILD    ?= build
SAN      ?=

CXXFLAGS_BASE := -std=c++20 -Wall -Wextra -Werror -Iinclude -iquote src -MMD -MP -pthread
ifeq ($(SAN),1)
  CXXFLAGS_OPT := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
  LDFLAGS_SAN  := -fsanitize=address,undefined
else
  CXXFLAGS_OPT := -O2 -g
  LDFLAGS_SAN  :=
endif
CXXFLAGS += $(CXXFLAGS_BASE) $(CXXFLAGS_OPT)
LDLIBS   := -lfcgi -lhiredis -lcurl -lcrypto -pthread
LDFLAGS  += $(LDFLAGS_SAN)

LIB_SRCS  := $(filter-out src/main_%.cc,$(wildcard src/*.cc))
LIB_OBJS  := $(LIB_SRCS:src/%.cc=$(BUILD)/obj/%.o)
UNIT_SRCS := $(wildcard tests/unit/*.cc)
UNIT_OBJS := $(UNIT_SRCS:tests/unit/%.cc=$(BUILD)/obj/unit/%.o)
# chatd-cleanup-testhooks: chatd-cleanup with the test hooks compiled in
# (CHATD_CLEANUP_CRASH_AT), for the integration tests only; never installed.
BINS      := $(BUILD)/bin/chatd $(BUILD)/bin/chatd-cleanup $(BUILD)/bin/chatd-cleanup-testhooks \
             $(BUILD)/bin/unit_tests

.PHONY: all deps run test asan chaos fuzz fuzz-build unit integration bench install install-chroma uninstall clean
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

$(BUILD)/obj/main_cleanup_testhooks.o: src/main_cleanup.cc
	@mkdir -p $(@D)
	$(CXX) $(CXXFLAGS) -DCHATD_TEST_HOOKS -c $< -o $@

$(BUILD)/bin/chatd-cleanup-testhooks: $(BUILD)/obj/main_cleanup_testhooks.o $(BUILD)/libchatd.a
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/bin/unit_tests: $(UNIT_OBJS) $(BUILD)/libchatd.a
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $^ $(LDLIBS) -lboost_unit_test_framework -o $@

# Benchmark tools (make bench): the FastCGI ceiling, the Chroma drivers
# (chroma_layouts: the raw-API layout study, kept to rerun its figures) and the
# streaming client.
BENCH_BINS := $(BUILD)/bin/trivial_fcgi $(BUILD)/bin/chroma_bench $(BUILD)/bin/chroma_layouts $(BUILD)/bin/sse_ttfb

$(BUILD)/obj/bench/%.o: bench/%.cc
	@mkdir -p $(@D)
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(BUILD)/bin/trivial_fcgi: $(BUILD)/obj/bench/trivial_fcgi.o
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $^ -lfcgi -pthread -o $@

$(BUILD)/bin/sse_ttfb: $(BUILD)/obj/bench/sse_ttfb.o
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $^ -o $@

$(BUILD)/bin/chroma_bench: $(BUILD)/obj/bench/chroma_bench.o $(BUILD)/libchatd.a
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/bin/chroma_layouts: $(BUILD)/obj/bench/chroma_layouts.o $(BUILD)/libchatd.a
	@mkdir -p $(@D)
	$(CXX) $(LDFLAGS) $^ $(LDLIBS) -o $@

-include $(wildcard $(BUILD)/obj/*.d $(BUILD)/obj/unit/*.d $(BUILD)/obj/bench/*.d)

# ---------------------------------------------------------------------------
# Fuzzing (docs/testing.md, "Fuzzing"): one libFuzzer target per parser of
# untrusted bytes, built with Debian's clang 14 in its own folder because the
# whole library must carry the fuzzer's coverage hooks and the sanitizers.
FUZZ_CXX     ?= clang++-14
FUZZ_BUILD   ?= build-fuzz
FUZZ_SECONDS ?= 60
# -Wno-ambiguous-reversed-operator: Debian's RapidJSON 1.1.0 declares its member
# iterator's operator== with a non-const-matching parameter, which C++20's
# reversed candidates make formally ambiguous at every `it == obj.MemberEnd()`;
# both candidates do the same comparison (fixed upstream after 1.1.0).
FUZZ_CXXFLAGS := $(CXXFLAGS_BASE) -Wno-ambiguous-reversed-operator -O1 -g -fno-omit-frame-pointer \
  -fno-sanitize-recover=undefined -fsanitize-ignorelist=tests/fuzz/ubsan-ignorelist.txt
FUZZ_TARGETS := $(patsubst tests/fuzz/%.cc,%,$(wildcard tests/fuzz/fuzz_*.cc))
FUZZ_BINS    := $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/bin/%)
FUZZ_LIB_OBJS := $(LIB_SRCS:src/%.cc=$(FUZZ_BUILD)/obj/%.o)
# libFuzzer's own options for every run: stderr of the code under test is
# closed (it may log, e.g. the JWT verifier's start-up warning) while
# libFuzzer's report stays.
FUZZ_RUN_FLAGS := -close_fd_mask=2 -timeout=10

$(FUZZ_BUILD)/obj/%.o: src/%.cc tests/fuzz/ubsan-ignorelist.txt
	@mkdir -p $(@D)
	$(FUZZ_CXX) $(FUZZ_CXXFLAGS) -fsanitize=fuzzer-no-link,address,undefined -c $< -o $@

$(FUZZ_BUILD)/obj/fuzz/%.o: tests/fuzz/%.cc tests/fuzz/ubsan-ignorelist.txt
	@mkdir -p $(@D)
	$(FUZZ_CXX) $(FUZZ_CXXFLAGS) -fsanitize=fuzzer,address,undefined -c $< -o $@

$(FUZZ_BUILD)/libchatd.a: $(FUZZ_LIB_OBJS)
	@mkdir -p $(@D)
	$(AR) rcs $@ $^

$(FUZZ_BUILD)/bin/%: $(FUZZ_BUILD)/obj/fuzz/%.o $(FUZZ_BUILD)/libchatd.a
	@mkdir -p $(@D)
	$(FUZZ_CXX) -fsanitize=fuzzer,address,undefined $^ $(LDLIBS) -o $@

# The harness objects are intermediate files of the pattern chain: keep them.
.PRECIOUS: $(FUZZ_BUILD)/obj/fuzz/%.o

-include $(wildcard $(FUZZ_BUILD)/obj/*.d $(FUZZ_BUILD)/obj/fuzz/*.d)

fuzz-build: $(FUZZ_BINS)

# Each target for FUZZ_SECONDS, one after the other. New inputs go to the
# scratch folder (the first corpus argument); the committed seeds are only read.
fuzz: $(FUZZ_BINS)
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_BUILD)/corpus/$$t $(FUZZ_BUILD)/artifacts/$$t && \
	  echo "=== $$t for $(FUZZ_SECONDS) s" && \
	  $(FUZZ_BUILD)/bin/$$t $(FUZZ_RUN_FLAGS) -max_total_time=$(FUZZ_SECONDS) \
	    -artifact_prefix=$(FUZZ_BUILD)/artifacts/$$t/ \
	    $(FUZZ_BUILD)/corpus/$$t tests/fuzz/corpus/$$t || exit 1; \
	done

# ---------------------------------------------------------------------------
# Dependencies: Debian 12 packages (docs/dependencies.md says why each) and the
# Chroma server from PyPI in a virtualenv. Idempotent: installs only what is
# missing, so it costs a few dpkg look-ups when everything is there.
DEB_PACKAGES := g++ make pkg-config libfcgi-dev spawn-fcgi multiwatch libhiredis-dev \
  libcurl4-openssl-dev rapidjson-dev libboost-test-dev libssl-dev \
  nginx redis-server python3 python3-venv python3-pytest python3-uvloop python3-yaml curl wrk systemd \
  clang-14 libfuzzer-14-dev libclang-rt-14-dev
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

# The stamp's name carries the requirements' hash, so a changed file makes a
# new stamp name; no file-date prerequisite, which a fresh checkout (newer
# date, same content) would take for a change and reinstall for nothing.
$(CHROMA_STAMP):
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
	$(PYTHON) tests/run_all.py --build $(BUILD) --fuzz-build $(FUZZ_BUILD)

# The same tests against an AddressSanitizer + UBSan build.
asan:
	$(MAKE) BUILD=build-asan SAN=1 test

# The long chaos run under load (docs/testing.md, "Chaos"): minutes; writes
# $(BUILD)/chaos/report.json and report.txt. Options go in CHAOS_ARGS, e.g.
# make chaos CHAOS_ARGS="--phase-s 40 --steady-users 40 --fsync everysec,always"
# (tests/chaos/chaos.py --help lists them). The short form runs in `make test`.
chaos: deps all
	$(PYTHON) tests/chaos/chaos.py --build $(BUILD) --out $(BUILD)/chaos $(CHAOS_ARGS)

bench: deps all $(BENCH_BINS)
	$(PYTHON) bench/run_bench.py --build $(BUILD)

# ---------------------------------------------------------------------------
# Installation (docs/deployment.md). PREFIX and DESTDIR as usual; the units and
# the nginx site get the installed paths.
PREFIX      ?= /usr/local
SYSCONFDIR  ?= /etc
UNITDIR     ?= $(SYSCONFDIR)/systemd/system
BINDIR      := $(PREFIX)/bin
LIBDIR      := $(PREFIX)/lib/chatd
DOCDIR      := $(PREFIX)/share/doc/chatd
SITE_LISTEN ?= 80
SITE_SOCKET ?= /run/chatd/chatd.sock
SITE_MAX_BODY ?= 65536
SITE_READ_TIMEOUT ?= 40s
UNITS := chatd.service chroma.service chatd-cleanup.service chatd-cleanup.timer
# The service's group: it owns /etc/chatd (0750) and the files there (0640), so
# that chatd can read its environment file and *_FILE secrets while nobody
# else can. Create it before `make install` (docs/deployment.md). Installing
# for real (no DESTDIR) without it is an error; into a DESTDIR (packaging,
# maybe as a user who may not chgrp) it is a warning and the tree stays
# root-only until the package's own scripts set the group.
CHATD_GROUP ?= chatd

# The deployment site, rendered from the one template the tests use too.
nginx/chatd.conf: nginx/chatd-site.conf.in
	sed -e 's|@LISTEN@|$(SITE_LISTEN)|g' -e 's|@CHATD_SOCKET@|$(SITE_SOCKET)|g' \
	    -e 's|@MAX_BODY@|$(SITE_MAX_BODY)|g' -e 's|@READ_TIMEOUT@|$(SITE_READ_TIMEOUT)|g' $< > $@

install: $(BUILD)/bin/chatd $(BUILD)/bin/chatd-cleanup nginx/chatd.conf
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DOCDIR) $(DESTDIR)$(LIBDIR) \
	  $(DESTDIR)$(SYSCONFDIR)/nginx/sites-available
	install -d -m 0750 $(DESTDIR)$(SYSCONFDIR)/chatd
	@if getent group '$(CHATD_GROUP)' >/dev/null && chgrp '$(CHATD_GROUP)' $(DESTDIR)$(SYSCONFDIR)/chatd; then :; \
	elif [ -z '$(DESTDIR)' ]; then \
	  echo "install: cannot give $(SYSCONFDIR)/chatd to group '$(CHATD_GROUP)': create the service user and group" \
	       "first (adduser --system --group chatd, docs/deployment.md) or set CHATD_GROUP" >&2; exit 1; \
	else \
	  echo "install: warning: group '$(CHATD_GROUP)' not set on $(DESTDIR)$(SYSCONFDIR)/chatd: chgrp it" \
	       "(and chatd.env.example) to the service's group when installing the package" >&2; \
	fi
	install -m 0755 $(BUILD)/bin/chatd $(BUILD)/bin/chatd-cleanup $(DESTDIR)$(BINDIR)/
	for u in $(UNITS); do \
	  sed -e 's|/usr/local/bin/|$(BINDIR)/|g' -e 's|/usr/local/lib/chatd/|$(LIBDIR)/|g' \
	      -e 's|/usr/local/share/doc/chatd/|$(DOCDIR)/|g' -e 's|/etc/chatd/|$(SYSCONFDIR)/chatd/|g' \
	      systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u && chmod 0644 $(DESTDIR)$(UNITDIR)/$$u; \
	done
	install -m 0644 nginx/chatd.conf $(DESTDIR)$(SYSCONFDIR)/nginx/sites-available/chatd.conf
	install -m 0640 systemd/chatd.env.example $(DESTDIR)$(SYSCONFDIR)/chatd/chatd.env.example
	@chgrp "$$(stat -c %g $(DESTDIR)$(SYSCONFDIR)/chatd)" $(DESTDIR)$(SYSCONFDIR)/chatd/chatd.env.example
	install -m 0644 requirements-chroma.txt $(DESTDIR)$(LIBDIR)/
	install -m 0644 README.md docs/*.md $(DESTDIR)$(DOCDIR)/

# Chroma's virtualenv where chroma.service expects it (needs PyPI once).
install-chroma:
	$(PYTHON) -m venv $(DESTDIR)$(LIBDIR)/chroma-venv
	$(DESTDIR)$(LIBDIR)/chroma-venv/bin/pip install -q --disable-pip-version-check -r requirements-chroma.txt

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/chatd $(DESTDIR)$(BINDIR)/chatd-cleanup
	for u in $(UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$u; done
	rm -f $(DESTDIR)$(SYSCONFDIR)/nginx/sites-available/chatd.conf $(DESTDIR)$(SYSCONFDIR)/chatd/chatd.env.example
	rm -rf $(DESTDIR)$(DOCDIR) $(DESTDIR)$(LIBDIR)

clean:
	rm -rf build build-asan build-fuzz
