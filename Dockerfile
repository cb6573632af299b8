# The worker image for compose.yaml: CUDA torch from PyPI, spool on top.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md scripts/constraints.txt ./
COPY spool spool
RUN pip install --no-cache-dir torch && pip install --no-cache-dir -c constraints.txt .
ENTRYPOINT []
CMD ["spool", "--help"]
