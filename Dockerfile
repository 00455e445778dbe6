# Callgate on the embedded store: one process, data under /var/lib/callgate.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CALLGATE_HOST=0.0.0.0 \
    CALLGATE_PORT=8080 \
    CALLGATE_DATA_DIR=/var/lib/callgate

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin callgate \
    && mkdir -p /var/lib/callgate \
    && chown callgate:callgate /var/lib/callgate

WORKDIR /opt/callgate
COPY pyproject.toml constraints.txt README.md ./
COPY router ./router
COPY media ./media
COPY metering ./metering
COPY tenancy ./tenancy
RUN pip install --no-cache-dir -c constraints.txt .

USER callgate
VOLUME ["/var/lib/callgate"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CALLGATE_PORT', '8080'), timeout=2)"
CMD ["callgate", "serve"]
