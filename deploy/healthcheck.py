"""Container healthcheck: ``GET https://127.0.0.1:PORT/healthz`` must answer 200 (exit 0), else exit 1.

The relay's certificate names the public host, not 127.0.0.1, and may be self-signed: this check
on the loopback address only asks whether the relay answers, so it does not verify the certificate.
"""

import ssl
import sys
import urllib.request

port = int(sys.argv[1]) if len(sys.argv) > 1 else 8765
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE  # loopback liveness probe only; clients pin the certificate
try:
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context, timeout=4) as r:  # noqa: S310
        sys.exit(0 if r.status == 200 else 1)
except OSError as exc:
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
