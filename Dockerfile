# QuantLab: the dashboard with a pre-warmed demo (the default sweep runs at build time).
#
# Base: Debian bookworm with Debian's own python3 (3.11, the version QuantLab is tested on). Not
# python:3.11-slim: that image builds its own Python under /usr/local, so a base made locally with
# `debootstrap --variant=minbase bookworm` (what scripts/build-image does where no registry serves
# images) would run a different Python from the one `docker build` gets. With debian:bookworm-slim
# both bases are the same Debian release with the same python3 package, and this file builds
# unchanged from either: `--build-arg BASE=localhost/quantlab-base:bookworm`.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MALLOC_ARENA_MAX=2 \
    QUANTLAB_CACHE=/app/cache \
    QUANTLAB_DB=/app/cache/quantlab.duckdb

# One step, so that what it removes is not kept in an earlier layer:
# - Bookworm's python3 is "externally managed" (PEP 668): packages go into a venv, /opt/venv.
# - Behind a TLS-inspecting proxy pip needs the proxy's CA: pass the host's bundle as a build secret
#   (`--secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt`); without it pip uses its own.
# - tf-keras and tensorflow-model-optimization go in with --no-deps: tf-keras asks for the
#   `tensorflow` wheel, which would land on top of tensorflow-cpu (see requirements-no-deps.txt).
# - Not needed to run: TensorFlow's C++ headers, the packages' own test suites, the static symbol
#   tables of TensorFlow's shared libraries (strip keeps the dynamic ones; about 250 MB), binutils
#   once it has stripped them, and apt's caches. Only TensorFlow's: libraries that auditwheel
#   patched (numpy.libs, scipy.libs, ...) no longer load once stripped.
WORKDIR /app
COPY requirements.txt requirements-no-deps.txt ./
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3=3.11.2-1+b1 python3-venv=3.11.2-1+b1 \
        binutils=2.40-2 \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps -r requirements-no-deps.txt \
    && site=/opt/venv/lib/python3.11/site-packages \
    && rm -rf "$site/tensorflow/include" \
    && find "$site" -depth -type d -name tests -prune -exec rm -rf {} + \
    && find "$site/tensorflow" -type f \( -name '*.so' -o -name '*.so.[0-9]*' \) \
        -exec strip --strip-unneeded {} + \
    && apt-get purge -y --auto-remove binutils \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && groupadd --gid 10001 quantlab && useradd --create-home --uid 10001 --gid 10001 quantlab

COPY --chown=10001:10001 . .
RUN mkdir -p /app/cache && chown -R 10001:10001 /app/cache
USER 10001:10001

# Pre-warm the demo: train the default baseline and measure every technique once.
RUN python -m quantlab sweep --model seed-cnn --dataset digits-28 --techniques all

VOLUME ["/app/cache"]
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4).status == 200 else 1)"]

CMD ["streamlit", "run", "app.py", "--server.address=0.0.0.0", "--server.port=8501", "--server.headless=true", "--browser.gatherUsageStats=false"]
