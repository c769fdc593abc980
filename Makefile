# Set-up and entry points. `make run` and `make test` work on a fresh Debian
# machine: they find a Python 3.12+ (3.12 first: the pjsua2 test softphone has
# no wheel for 3.13), build the virtualenv and install what is missing.

VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 \
                            python3.13 $$HOME/.pyenv/versions/3.13*/bin/python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null \
	&& { command -v $$p; break; }; done)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_GET := $(SUDO) apt-get

.PHONY: run test test-deps bench bench-deps check clean .env

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.12 or newer is required (none found on PATH or under ~/.pyenv)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Phony, so that every `make run` checks it: created 0600 with random
# passwords and admin token (printed once), completed, its mode tightened.
.env:
	@./config/make-env .env

run: $(VENV)/.installed .env
	set -a && . ./.env && set +a && exec $(VENV)/bin/pbx serve --config pbx.yaml

check: $(VENV)/.installed .env
	set -a && . ./.env && set +a && $(VENV)/bin/pbx check --config pbx.yaml

test-deps:
	@command -v sipp >/dev/null || { $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq sip-tester; }
	@command -v svwar >/dev/null || { $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq sipvicious; }
	@command -v openssl >/dev/null || { $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq openssl; }
# baresip 1.0 is the old digest client of the per-extension auth_algorithms test and an interop client (no GUI or video modules needed).
	@command -v baresip >/dev/null || { $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends baresip; }
# linphonec (liblinphone) is the third independent client of the interop tests, next to pjsua2 and baresip.
	@command -v linphonec >/dev/null || { $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends linphone-cli; }
# The RTCP tests decode what reaches the phones with tshark.
	@command -v tshark >/dev/null || { $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends tshark; }
# The wallboard test drives Debian's headless chromium with its chromedriver (no browser download at test time).
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends chromium chromium-driver; }
# fail2ban-regex checks the shipped fail2ban filter; the service the package enables is not wanted here.
	@command -v fail2ban-regex >/dev/null || { $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends fail2ban \
	  && { ! test -d /run/systemd/system || $(SUDO) systemctl disable --now fail2ban; }; }

# Two pytest-xdist workers: most of the suite waits on real calls on loopback,
# so two tests at a time halve its time on a 2-core machine. The few tests
# marked serial time packets to the millisecond and run alone afterwards.
test: $(VENV)/.installed test-deps
	$(PY) -m mypy
	$(PY) -m pytest -q -n 2 -m "not serial"
	$(PY) -m pytest -q -m serial

# The bridge benchmark's baseline is Kamailio + rtpengine, started by the
# benchmark itself: where systemd runs, the services the packages enable at
# install are disabled again, so that nothing stays listening (on 5060, say).
# The IVR benchmark captures RTP with tshark's dumpcap, which test-deps installs.
bench-deps:
	@test -x /usr/sbin/kamailio && command -v rtpengine >/dev/null || { \
	  $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends kamailio rtpengine-daemon \
	  && { ! test -d /run/systemd/system || $(SUDO) systemctl disable --now kamailio rtpengine-daemon; }; }

# Each benchmark prints its own table and adds its headline figures to the
# file BENCH_SUMMARY names (bench/summary.py); `make bench` ends with the one
# table of them all, printed also when a benchmark failed, and then fails
# itself, naming the benchmarks that did.
BENCHMARKS := bridge cores ivr queue recording startup setup
BENCH_SUMMARY := $(CURDIR)/bench/results/summary.jsonl

bench: $(VENV)/.installed test-deps bench-deps
	@mkdir -p $(dir $(BENCH_SUMMARY)) && rm -f $(BENCH_SUMMARY)
	@failed=""; for b in $(BENCHMARKS); do \
	  echo "$(PY) bench/$$b.py"; \
	  BENCH_SUMMARY=$(BENCH_SUMMARY) $(PY) bench/$$b.py || failed="$$failed $$b"; \
	done; \
	$(PY) bench/summary.py $(BENCH_SUMMARY); \
	if [ -n "$$failed" ]; then echo "failed (non-zero exit status):$$failed"; exit 1; fi

clean:
	rm -rf $(VENV) .pytest_cache
