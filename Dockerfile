# lossguard worker / sinks image: `docker build -t lossguard .`
# Runs `lossguard worker --broker ...` or `lossguard sinks ...` (see docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY detectors ./detectors
COPY producers ./producers
COPY stream_app ./stream_app
# rocksdict: the RocksDB table store (LOSSGUARD_STORE=rocksdb); no torch in the worker image
RUN pip install ".[rocksdb]"
# Faust's web server (dashboard at /lossguard/) must listen beyond the container's loopback
ENV LOSSGUARD_WEB_BIND=0.0.0.0 LOSSGUARD_DATA_DIR=/data
VOLUME /data
ENTRYPOINT ["lossguard"]
CMD ["worker"]
