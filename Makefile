# Two commands on a fresh machine:
#   make demo   bootstrap .venv, build, run the offloading demo (ends by itself)
#   make test   bootstrap .venv, colcon build, colcon test, colcon test-result
#   make bench  bootstrap .venv, run the benchmark matrix, regenerate docs/benchmarks.md
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rrto-installed
DEMO_SECONDS ?= 20
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
export PYTHONUNBUFFERED := 1

.PHONY: demo test build bench lint clean

$(STAMP): requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt -c constraints.txt
	touch $(VENV)/COLCON_IGNORE
	touch $@

build: $(STAMP)
	source $(BIN)/activate && colcon build --event-handlers console_cohesion- summary+

demo: build
	source $(BIN)/activate && source install/setup.bash && \
	    python -m rrto_ros.bringup --duration $(DEMO_SECONDS)

test: build
	source $(BIN)/activate && source install/setup.bash && \
	    rc=0; colcon test --return-code-on-test-failure --event-handlers console_direct+ || rc=$$?; \
	    colcon test-result --verbose || rc=1; exit $$rc

# the benchmark runs from the source tree (no colcon build needed); under 15 min on 2 cores
bench: $(STAMP)
	$(BIN)/python -m bench.run_all

lint: $(STAMP)
	$(BIN)/python -m flake8 rrto_ros rrto_server launch test bench

clean:
	rm -rf build install log
