# QuantLab: the dashboard with a pre-warmed demo (the default sweep runs at build time).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MALLOC_ARENA_MAX=2 \
    QUANTLAB_CACHE=/app/cache \
    QUANTLAB_DB=/app/cache/quantlab.duckdb

RUN groupadd --gid 10001 quantlab && useradd --create-home --uid 10001 --gid 10001 quantlab
WORKDIR /app

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

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
