# podtally — every target installs what it needs; run as root for the netns/iptables tests.
# Debian's /usr/bin/python3.11 backs the venv so the sidecar can run from it as uid 1337
# (a pyenv Python under /root is not executable by other users).
PYTHON ?= $(shell test -x /usr/bin/python3.11 && echo /usr/bin/python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# chromium: the HTML report is opened and screenshotted headless (tests/report).
APT_PACKAGES := iptables iproute2 util-linux curl ca-certificates prometheus chromium

.PHONY: all venv system-deps ebpf-deps test lint demo bench clean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade 'pip>=25.1'
	$(BIN)/python -m pip install -q --disable-pip-version-check -e . --group test --group lint
	# helm-sdkpy bundles Helm's real engine (the chart tests); it declares Python>=3.12 but
	# its lint/install work on 3.11, and no group can carry --ignore-requires-python.
	$(BIN)/python -m pip install -q --disable-pip-version-check --ignore-requires-python 'helm-sdkpy==0.1.32'
	touch $@

venv: $(STAMP)

# Debian packages the real-network tests use; installed only when missing, only as root.
system-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	else echo "not root: skipping Debian packages ($(APT_PACKAGES))"; fi

# The eBPF agent's needs (issue 7), as root: bcc from Debian (PyPI's "bcc" is another
# project), bpftool (tests check nothing stays loaded), kernel headers for bcc's compiler
# (Debian's linux-headers-amd64 stand in when the running kernel ships none: tracepoints
# and uprobes need only their common definitions), and tracefs. Then the venv sees bcc:
# a .pth file adds a directory holding only a link to Debian's bcc package, so nothing
# else of /usr/lib/python3/dist-packages can shadow the venv's own packages.
EBPF_APT_PACKAGES := python3-bpfcc libbpfcc bpftool linux-headers-amd64
KERNEL_MODULES := /lib/modules/$(shell uname -r)
BCC_SITE := $(VENV)/debian-bpfcc

ebpf-deps: venv
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(EBPF_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	  if [ ! -e $(KERNEL_MODULES)/build/include ]; then \
	    hdr=$$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1); \
	    echo "kernel headers: $(KERNEL_MODULES)/build -> $$hdr"; \
	    mkdir -p $(KERNEL_MODULES) && ln -sfn $$hdr $(KERNEL_MODULES)/build \
	      && ln -sfn $${hdr%-amd64}-common $(KERNEL_MODULES)/source; \
	  fi; \
	  if [ ! -e /sys/kernel/tracing/uprobe_events ]; then \
	    mount -t tracefs tracefs /sys/kernel/tracing; \
	  fi; \
	else echo "not root: skipping the eBPF agent's system set-up ($(EBPF_APT_PACKAGES))"; fi
	@if [ -d /usr/lib/python3/dist-packages/bcc ]; then \
	  mkdir -p $(BCC_SITE) && ln -sfn /usr/lib/python3/dist-packages/bcc $(BCC_SITE)/bcc && \
	  site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  echo "../../../debian-bpfcc" > $$site/debian-bpfcc.pth; \
	fi

lint: venv
	$(BIN)/ruff check src tests demo $(wildcard bench)
	$(BIN)/mypy
	$(BIN)/lint-imports

test: venv system-deps ebpf-deps lint
	$(BIN)/python -m pytest

demo: venv
	$(BIN)/python demo/run_demo.py

bench: venv ebpf-deps
	$(BIN)/python bench/bench_sidecar.py
	$(BIN)/python bench/bench_finops_queries.py
	$(BIN)/python bench/bench_ebpf_agent.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# --- Local Kubernetes (kind). Needs docker, kind, helm and kubectl on the PATH; none of
# them is installed by these targets. `make kind-up deploy` builds, loads and installs.
KIND_CLUSTER   ?= podtally
IMAGE_TAG      ?= dev
OPERATOR_IMAGE ?= podtally-operator
SIDECAR_IMAGE  ?= podtally-sidecar
HELM_RELEASE   ?= podtally
HELM_NAMESPACE ?= podtally-system

.PHONY: kind-up images kind-load deploy

kind-up:
	kind get clusters | grep -qx '$(KIND_CLUSTER)' \
	  || kind create cluster --name $(KIND_CLUSTER) --config kind-config.yaml --wait 120s

# Both images build from the repository root (they COPY pyproject.toml, README.md, src/).
images:
	docker build -f operator/Dockerfile -t $(OPERATOR_IMAGE):$(IMAGE_TAG) .
	docker build -f sidecar/Dockerfile -t $(SIDECAR_IMAGE):$(IMAGE_TAG) .

kind-load: images
	kind load docker-image --name $(KIND_CLUSTER) $(OPERATOR_IMAGE):$(IMAGE_TAG) $(SIDECAR_IMAGE):$(IMAGE_TAG)

# The loaded images are local only: IfNotPresent (the tag is not `latest`) never pulls them.
deploy: kind-load
	helm upgrade --install $(HELM_RELEASE) charts/podtally \
	  --namespace $(HELM_NAMESPACE) --create-namespace --wait --timeout 5m \
	  --kube-context kind-$(KIND_CLUSTER) \
	  --set image.repository=$(OPERATOR_IMAGE) --set image.tag=$(IMAGE_TAG) \
	  --set image.pullPolicy=IfNotPresent \
	  --set injection.image.repository=$(SIDECAR_IMAGE) --set injection.image.tag=$(IMAGE_TAG) \
	  --set injection.image.pullPolicy=IfNotPresent

# The whole user story on one machine (root): helm install, the operator, admission over
# HTTPS, pods run by the test kubelet (tests/e2e/kubelet.py), Prometheus, the FinOps queries
# and `podtally report`. Also part of `make test`; -s prints the story as it happens.
.PHONY: e2e
e2e: venv system-deps
	$(BIN)/python -m pytest tests/e2e/test_user_story.py -s -p no:cacheprovider
