# One image for both compose services: the coordinator (pf-coordinator) and the scaled device
# replicas (python -m simulation.replica). Build: docker build -t pocketfed .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    # one BLAS thread per process: replicas and the coordinator share the host's cores
    OPENBLAS_NUM_THREADS=1 \
    OMP_NUM_THREADS=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY protocol ./protocol
COPY device_agent ./device_agent
COPY coordinator ./coordinator
COPY simulation ./simulation
RUN pip install ".[coordinator,agent]" \
    && useradd --create-home --uid 1000 pocketfed \
    && mkdir -p /data /state && chown pocketfed:pocketfed /data /state

USER pocketfed
EXPOSE 8000
CMD ["pf-coordinator", "--host", "0.0.0.0", "--port", "8000", "--db", "/data/pocketfed.db"]
