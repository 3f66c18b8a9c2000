# cipherpost relay: docs/deployment.md ("Docker"). Non-root, state in the /data volume, healthcheck.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# [scale]: asyncpg and redis, for --store postgresql://... and --bus redis://...
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[scale]'

FROM python:3.12-slim
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin cipherpost \
    && mkdir -p /data && chown 10001:10001 /data && chmod 0700 /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
COPY deploy/healthcheck.py /usr/local/bin/cipherpost-healthcheck
USER 10001
ENV CIPHERPOST_DATA=/data PYTHONUNBUFFERED=1
VOLUME /data
EXPOSE 8765
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/usr/local/bin/cipherpost-healthcheck", "8765"]
ENTRYPOINT ["cipherpost"]
CMD ["server", "--host", "0.0.0.0", "--port", "8765", "--data", "/data"]
