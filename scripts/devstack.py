"""The whole RahatBack stack on one machine with embedded defaults: `make up`.

Starts a nats-server child process (JetStream, data in var/nats), the API on SQLite (var/rahatback.db),
bootstraps an admin on first start, enrolls one local agent and runs it. Ctrl-C stops everything.
State lives in var/ (`make clean` removes it).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_for(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - local URL we built
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become ready within {timeout:.0f} s (see var/*.log)")


def api_call(api: str, token: str, method: str, path: str, body: dict[str, object] | None = None) -> Any:
    request = urllib.request.Request(  # noqa: S310 - local URL we built
        api + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        return json.loads(response.read())


class Stack:
    def __init__(self, var: Path, api_port: int, nats_port: int, nats_jwt: bool = False) -> None:
        self.var = var
        # operator/JWT mode (docs/nats-security.md): every service and the agent with its own user
        self.nats_jwt = nats_jwt
        self.api = f"http://127.0.0.1:{api_port}"
        self.api_port = api_port
        self.nats_url = f"nats://127.0.0.1:{nats_port}"
        self.nats_port = nats_port
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            "RAHATBACK_DEV_MODE": "true",
            "RAHATBACK_VAR_DIR": str(var),
            "RAHATBACK_DATABASE_URL": f"sqlite+aiosqlite:///{var / 'rahatback.db'}",
            "RAHATBACK_NATS_URL": self.nats_url,
            "RAHATBACK_PUBLIC_URL": self.api,
            "RAHATBACK_AGENT_CONFIG": str(var / "agent" / "agent.json"),
            "RAHATBACK_SCHEDULER_NATS_URL": self.nats_url,
            "RAHATBACK_NOTIFIER_NATS_URL": self.nats_url,
            "RAHATBACK_NOTIFIER_PRIVATE_KEY_FILE": str(var / "notifier.key"),
            # no RAHATBACK_NOTIFIER_SMTP_HOST set: emails are written to this folder as .eml files
            "RAHATBACK_NOTIFIER_OUTBOX_DIR": str(var / "outbox"),
        }

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.var / f"{name}.log", "ab") as log:
            child = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.children[name] = child
        return child

    def start(self) -> str:
        self.var.mkdir(parents=True, exist_ok=True)
        for port, what in ((self.api_port, "API"), (self.nats_port, "NATS")):
            if not port_free(port):
                raise SystemExit(f"port {port} for the {what} is taken: is `make up` already running?")
        if self.nats_jwt:
            self.spawn("nats", [str(BIN / "nats-server"), "-c", str(self.nats_jwt_config())])
        else:
            self.spawn(
                "nats",
                [
                    str(BIN / "nats-server"),
                    "-js",
                    "-sd",
                    str(self.var / "nats"),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.nats_port),
                ],
            )
        token = self.bootstrap_admin()
        self.env["RAHATBACK_NOTIFIER_PUBLIC_KEY"] = self.notifier_public_key()
        self.start_api()
        self.spawn("scheduler", [str(BIN / "rahatback-scheduler"), "run"])
        self.spawn("notifier", [str(BIN / "rahatback-notifier"), "run"])
        self.enroll_agent(token)
        self.start_agent(token)
        return token

    def nats_jwt_config(self) -> Path:
        """`rahatback-api nats-setup` (once: it keeps existing keys), a server config including its
        nats-auth.conf, and each service's credentials in its environment."""
        auth = self.var / "nats-auth"
        setup = [str(BIN / "rahatback-api"), "nats-setup", "--out", str(auth)]
        subprocess.run([*setup, "--resolver-dir", str(self.var / "nats-resolver")], check=True, cwd=ROOT)
        config = self.var / "nats-server.conf"
        config.write_text(
            f'listen: "127.0.0.1:{self.nats_port}"\n'
            f'jetstream: {{ store_dir: "{self.var / "nats"}" }}\n'
            'include "nats-auth/nats-auth.conf"\n'
        )
        self.env.update(
            {
                "RAHATBACK_NATS_CREDS": str(auth / "creds" / "api.creds"),
                "RAHATBACK_NATS_SYSTEM_CREDS": str(auth / "creds" / "api-system.creds"),
                "RAHATBACK_NATS_SIGNING": str(auth / "api-signing.json"),
                "RAHATBACK_SCHEDULER_NATS_CREDS": str(auth / "creds" / "scheduler.creds"),
                "RAHATBACK_NOTIFIER_NATS_CREDS": str(auth / "creds" / "notifier.creds"),
            }
        )
        return config

    def notifier_public_key(self) -> str:
        """The notifier's key pair lives in var/notifier.key; the API seals webhook URLs to it."""
        notifier = str(BIN / "rahatback-notifier")
        if not (self.var / "notifier.key").exists():
            keygen = [notifier, "keygen", "--out", str(self.var / "notifier.key")]
            subprocess.run(keygen, env=self.env, check=True, cwd=ROOT, capture_output=True)
        out = subprocess.run(
            [notifier, "public-key"], env=self.env, check=True, cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip().splitlines()[-1]

    def start_api(self) -> None:
        self.spawn(
            "api", [str(BIN / "rahatback-api"), "serve", "--host", "127.0.0.1", "--port", str(self.api_port)]
        )
        wait_for(self.api + "/readyz")

    def start_agent(self, token: str) -> None:
        self.spawn("agent", [str(BIN / "rahatback-agent"), "run"])
        self.wait_agent_online(token)

    def stop_child(self, name: str, timeout: float = 30) -> None:
        child = self.children.pop(name, None)
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def bootstrap_admin(self) -> str:
        token_file = self.var / "admin-token"
        if token_file.exists():
            return token_file.read_text().strip()
        password = secrets.token_urlsafe(16)
        subprocess.run([str(BIN / "rahatback-api"), "migrate"], env=self.env, check=True, cwd=ROOT)
        out = subprocess.run(
            [str(BIN / "rahatback-api"), "create-admin", "--email", "admin@localhost", "--org", "Local"],
            env={**self.env, "RAHATBACK_ADMIN_PASSWORD": password},
            check=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        token = out.stdout.strip().splitlines()[-1].rsplit(": ", 1)[-1]
        for path, value in ((token_file, token), (self.var / "admin-password", password)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(value + "\n")
        return token

    def enroll_agent(self, token: str) -> None:
        config = Path(self.env["RAHATBACK_AGENT_CONFIG"])
        force: list[str] = []
        if config.exists():
            if json.loads(config.read_text()).get("command_public_key_b64"):
                return
            # enrolled before commands were signed: it pins no key and would refuse to start
            print("re-enrolling the local agent: its identity predates signed commands (docs/security.md)")
            force = ["--force"]
        enrollment = api_call(self.api, token, "POST", "/v1/agents/enrollment-tokens", {"ttl_minutes": 10})
        subprocess.run(
            [
                str(BIN / "rahatback-agent"),
                "enroll",
                "--api",
                self.api,
                "--token",
                str(enrollment["token"]),
                "--name",
                "local-agent",
                *force,
            ],
            env=self.env,
            check=True,
            cwd=ROOT,
        )

    def wait_agent_online(self, token: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(agent["online"] for agent in api_call(self.api, token, "GET", "/v1/agents")):
                return
            time.sleep(0.5)
        raise SystemExit("the local agent did not come online (see var/agent.log)")

    def stop(self) -> None:
        for name in reversed(list(self.children)):
            self.stop_child(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["up"])
    parser.add_argument("--var", type=Path, default=ROOT / "var")
    parser.add_argument("--api-port", type=int, default=int(os.environ.get("RAHATBACK_API_PORT", "8000")))
    parser.add_argument("--nats-port", type=int, default=int(os.environ.get("RAHATBACK_NATS_PORT", "4222")))
    parser.add_argument(
        "--nats-jwt", action="store_true", help="run NATS in operator/JWT mode (docs/nats-security.md)"
    )
    args = parser.parse_args()
    stack = Stack(args.var.resolve(), args.api_port, args.nats_port, nats_jwt=args.nats_jwt)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        token = stack.start()
        print(
            f"\nRahatBack is running.\n"
            f"  API          {stack.api}/v1   (docs: {stack.api}/docs)\n"
            f"  admin token  {token}\n"
            f"               (also in {args.var}/admin-token;\n"
            f"                login admin@localhost, password in {args.var}/admin-password)\n"
            f"  NATS         {stack.nats_url}   logs: {args.var}/*.log\n"
            f"  emails       {args.var}/outbox/*.eml  (set RAHATBACK_NOTIFIER_SMTP_HOST to send them)\n\n"
            f"Try a first backup in another terminal:  make demo\n"
            f"Ctrl-C stops the stack.\n",
            flush=True,
        )
        while not stop:
            for child in stack.children.values():
                if child.poll() is not None:
                    raise SystemExit(f"{child.args[0]} exited with {child.returncode}; see {args.var}/*.log")
            time.sleep(0.5)
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
