# The combiner image: `combiner serve` by default; `combiner worker` and the other
# commands run from the same image (see compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY broker ./broker
COPY combiner ./combiner
COPY workers ./workers
RUN pip install . && useradd --system --uid 10001 --home /app combiner \
    && mkdir -p /data && chown combiner /data
USER combiner

ENV COMBINER_HOST=0.0.0.0 COMBINER_PORT=12080 COMBINER_STATE_DIR=/data
EXPOSE 12080
# Healthy while the replica's gRPC health service answers SERVING.
HEALTHCHECK --interval=5s --timeout=2s --start-period=5s --retries=3 \
    CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
ch=grpc.insecure_channel('127.0.0.1:12080'); \
r=g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=1.5); \
sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"
ENTRYPOINT ["combiner"]
CMD ["serve"]
