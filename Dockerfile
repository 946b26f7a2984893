# Loupe: serve a fastai image classifier. CPU only.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    LOUPE_DATA_DIR=/data

# Hugging Face Docker Spaces and good practice alike: an unprivileged user with uid 1000.
RUN useradd --create-home --uid 1000 user \
 && mkdir -p /data && chown user:user /data

WORKDIR /app
COPY pre-requirements.txt requirements.txt ./
# CPU-only torch first, as a Space installs it (pre-requirements.txt), then the rest.
RUN pip install -r pre-requirements.txt && pip install -r requirements.txt

COPY --chown=user:user . .
USER user

VOLUME ["/data"]
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/healthz', timeout=4)" || exit 1

CMD ["python", "app.py"]
