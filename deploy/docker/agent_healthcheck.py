"""Health check of the agent container: its identity file is readable and it holds an established
TCP connection to the NATS port it was enrolled with.

The agent serves no HTTP, and an agent that is running but cut off from NATS is exactly the
failure worth flagging; the control plane's own view of it is the `rahatback_agent_online` metric.
Reads /proc/net/tcp{,6} of the container's network namespace, so it needs no extra tools.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

ESTABLISHED = "01"
DEFAULT_NATS_PORT = 4222


def nats_port() -> int:
    config = Path(os.environ.get("RAHATBACK_AGENT_CONFIG", "/var/lib/rahatback/agent.json"))
    try:
        identity = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"unhealthy: no readable agent identity at {config} ({exc})") from None
    url = os.environ.get("RAHATBACK_AGENT_NATS_URL") or str(identity.get("nats_url", ""))
    return urlsplit(url.split(",")[0].strip()).port or DEFAULT_NATS_PORT


def connected_to(port: int, tables: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> bool:
    for table in tables:
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            remote, state = fields[2], fields[3]
            if state == ESTABLISHED and int(remote.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def main() -> int:
    port = nats_port()
    if connected_to(port):
        return 0
    print(f"unhealthy: no established connection to NATS port {port}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
