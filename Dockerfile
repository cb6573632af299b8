# The worker image for compose.yaml: CUDA torch from PyPI, spool on top.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine engine
COPY kernels kernels
COPY worker worker
COPY producer producer
COPY gateway gateway
COPY protocol protocol
COPY spool spool
COPY spool_testing spool_testing
RUN pip install --no-cache-dir torch && pip install --no-cache-dir .
ENTRYPOINT []
CMD ["spool", "--help"]
