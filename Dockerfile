# shipyard model server: CPU-only PyTorch, non-root, API keys required.
#
#   docker build -t shipyard .
#   shipyard keys add --scope infer --keys-file keys.json          # on the host; key shown once
#   docker run -p 8000:8000 \
#     -v $PWD/keys.json:/etc/shipyard/keys.json:ro \
#     -v $PWD/runs/digits/package:/models/digits:ro \
#     shipyard /models/digits
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SHIPYARD_HOME=/var/lib/shipyard

WORKDIR /opt/shipyard
# CPU wheels of torch first (no CUDA libraries in the image), then the project
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && rm -rf /root/.cache

RUN useradd --system --uid 10001 --home-dir /var/lib/shipyard --create-home shipyard \
    && mkdir -p /etc/shipyard && chown shipyard /var/lib/shipyard
USER shipyard

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready').status != 200)"

# Binds all interfaces, so a keys file is required (the server refuses to start without one).
ENTRYPOINT ["shipyard", "serve", "--host", "0.0.0.0", "--port", "8000", "--keys-file", "/etc/shipyard/keys.json"]
# Default: the package mounted at /models/model; pass other paths or --registry refs instead.
CMD ["/models/model"]
