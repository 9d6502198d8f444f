"""Signed commands on the agent's side (docs/security.md "Signed commands").

Through the real supervisor against a real nats-server: a forged, unsigned, misdirected, expired or
replayed command is refused, terminated and reported on `agent.<id>.report.command.refused`, and
nothing of it runs (no started report, no progress, no file in the storage); a valid command after
it still runs. The same for RPC requests, which get a refused answer. Then the replay cache itself:
persisted 0600, survives a restart, tells a JetStream redelivery from a replay, stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rahatback_agent.command_auth import (
    CommandAuth,
    CommandAuthError,
    CommandRefusal,
    IdKind,
    ReplayCache,
    replay_cache_path,
)
from rahatback_agent.identity import save_identity
from rahatback_agent.main import main
from rahatback_agent.settings import AgentSettings
from rahatback_agent.supervisor import Supervisor
from rahatback_contracts import signing, streams, subjects
from rahatback_contracts.messages import (
    BackupCommand,
    DatabaseTarget,
    DbListReply,
    DbListRequest,
    DbTestReply,
    DbTestRequest,
    EncryptionSpec,
    StorageTarget,
    StorageTestRequest,
)

from tests.agent.conftest import (
    API_SIGNING_KEY,
    API_SIGNING_KEY_ID,
    AgentHarness,
    make_identity,
    running_agent,
    signed,
)
from tests.servers import NatsServer

pytestmark = pytest.mark.integration

OTHER_AGENT = "fedcba9876543210fedcba9876543210"
INTRUDER_KEY = Ed25519PrivateKey.generate()


def now() -> datetime:
    return datetime.now(UTC)


def sqlite_source(folder: Path) -> Path:
    path = folder / "shop.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total REAL)")
        db.executemany("INSERT INTO orders (total) VALUES (?)", [(i * 1.5,) for i in range(200)])
    return path


def backup_command(agent: AgentHarness, source: Path, *, expires_at: datetime | None = None) -> BackupCommand:
    return BackupCommand(
        command_id=uuid.uuid4().hex,
        org_id=agent.identity.org_id,
        issued_at=now(),
        expires_at=expires_at or now() + timedelta(minutes=10),
        run_id=uuid.uuid4().hex,
        job_id=uuid.uuid4().hex,
        database=DatabaseTarget(name="shop", engine="sqlite", settings={"path": str(source)}),
        storage=StorageTarget(name="local", kind="local", settings={"path": str(agent.storage_dir)}),
        encryption=EncryptionSpec(enabled=False),
    )


def stored_files(agent: AgentHarness) -> list[Path]:
    return sorted(p for p in agent.storage_dir.rglob("*") if p.is_file())


async def refusal_of(agent: AgentHarness, command_id: str, within: float = 20.0) -> dict[str, Any]:
    subject = subjects.agent_command_refused(agent.agent_id)
    _, body = await agent.reports.wait_for(
        lambda s, b: s == subject and b.get("command_id") == command_id, within
    )
    return body


def reports_about(agent: AgentHarness, run_id: str) -> list[str]:
    return [s for s, b in agent.reports.received if b.get("run_id") == run_id]


async def assert_consumer_settled(agent: AgentHarness) -> None:
    """Every command was acknowledged or terminated: none waits to be redelivered and run later."""
    info = await agent.js.consumer_info(
        streams.AGENT_COMMANDS.name, streams.agent_commands_consumer(agent.agent_id).durable
    )
    assert info.num_pending == 0 and info.num_ack_pending == 0, info


async def test_forged_unsigned_and_misdirected_commands_are_refused_and_nothing_runs(
    nats_server: NatsServer, api_nc: NATS, tmp_path: Path
) -> None:
    source = sqlite_source(tmp_path)
    async with running_agent(nats_server, api_nc, tmp_path) as agent:
        subject = subjects.agent_command(agent.agent_id, "job.execute")

        def forged(s: str, b: bytes) -> dict[str, str]:  # another key, claiming the pinned key id
            return signing.signature_headers(INTRUDER_KEY, API_SIGNING_KEY_ID, s, b)

        def unknown_key(s: str, b: bytes) -> dict[str, str]:
            return signing.signature_headers(INTRUDER_KEY, "intruder-1", s, b)

        def unsigned(s: str, b: bytes) -> dict[str, str]:
            return {}

        def for_another_agent(s: str, b: bytes) -> dict[str, str]:
            return signed(subjects.agent_command(OTHER_AGENT, "job.execute"), b)

        def for_a_restore(s: str, b: bytes) -> dict[str, str]:
            return signed(subjects.agent_command(agent.agent_id, "restore.execute"), b)

        cases = {
            "forged": (forged, "bad_signature"),
            "unknown key": (unknown_key, "unknown_key"),
            "unsigned": (unsigned, "unsigned"),
            "signed for another agent": (for_another_agent, "bad_signature"),
            "signed for another command": (for_a_restore, "bad_signature"),
        }
        refused: dict[str, BackupCommand] = {}
        for name, (headers_for, _) in cases.items():
            command = backup_command(agent, source)
            refused[name] = command
            body = command.to_bytes()
            await agent.js.publish(subject, body, headers=headers_for(subject, body))
        # and one signed correctly whose body was changed on the way (the run's storage path)
        genuine = backup_command(agent, source)
        tampered = genuine.model_copy(
            update={
                "storage": StorageTarget(name="x", kind="local", settings={"path": str(tmp_path / "evil")})
            }
        )
        await agent.js.publish(subject, tampered.to_bytes(), headers=signed(subject, genuine.to_bytes()))

        for name, (_, reason) in cases.items():
            report = await refusal_of(agent, refused[name].command_id)
            assert report["reason"] == reason, (name, report)
            assert report["subject"] == subject
            assert report["run_kind"] == "backup" and report["run_id"] == refused[name].run_id
        assert (await refusal_of(agent, genuine.command_id))["reason"] == "bad_signature"

        # a valid command after them runs: the agent is not stuck, and it is the only one that ran
        valid = backup_command(agent, source)
        await agent.send_command("job.execute", valid)
        done = await agent.reports.outcome("backup", "completed", "run_id", valid.run_id)
        assert (agent.storage_dir / done["storage_key"]).is_file()

        for command in [*refused.values(), genuine]:
            assert reports_about(agent, command.run_id) == [subjects.agent_command_refused(agent.agent_id)]
            progress = subjects.agent_progress(agent.agent_id)
            assert not [
                s for s, d in agent.wiretap.messages if s == progress and command.run_id.encode() in d
            ]
        assert stored_files(agent) and all(valid.run_id in p.name for p in stored_files(agent))
        assert not (tmp_path / "evil").exists()
        await assert_consumer_settled(agent)


async def test_an_expired_command_is_refused_and_the_refusal_says_when_it_expired(
    nats_server: NatsServer, api_nc: NATS, tmp_path: Path
) -> None:
    source = sqlite_source(tmp_path)
    async with running_agent(nats_server, api_nc, tmp_path, command_clock_skew_seconds=60) as agent:
        expired = backup_command(agent, source, expires_at=now() - timedelta(minutes=2))
        await agent.send_command("job.execute", expired)
        report = await refusal_of(agent, expired.command_id)
        assert report["reason"] == "expired"
        assert expired.expires_at.isoformat() in report["detail"]

        # within the allowed clock skew a command still runs
        late = backup_command(agent, source, expires_at=now() - timedelta(seconds=20))
        await agent.send_command("job.execute", late)
        await agent.reports.outcome("backup", "completed", "run_id", late.run_id)

        assert reports_about(agent, expired.run_id) == [subjects.agent_command_refused(agent.agent_id)]
        assert stored_files(agent) and all(late.run_id in p.name for p in stored_files(agent))
        await assert_consumer_settled(agent)


async def test_a_replayed_command_is_refused_even_after_a_restart(
    nats_server: NatsServer, api_nc: NATS, tmp_path: Path
) -> None:
    source = sqlite_source(tmp_path)
    async with running_agent(nats_server, api_nc, tmp_path) as agent:
        command = backup_command(agent, source)
        subject, body = subjects.agent_command(agent.agent_id, "job.execute"), command.to_bytes()
        headers = signed(subject, body)
        await agent.js.publish(subject, body, headers=headers)
        await agent.reports.outcome("backup", "completed", "run_id", command.run_id)
        files = stored_files(agent)

        # the very same signed bytes, published again (a second stream message): a replay
        await agent.js.publish(subject, body, headers=headers)
        report = await refusal_of(agent, command.command_id)
        assert report["reason"] == "replayed"
        await agent.shut_down()

        cache = replay_cache_path(tmp_path / "agent.json")
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        assert command.command_id in json.loads(cache.read_text())["commands"]["entries"]

        # a restarted agent (same identity, same folder) still remembers it
        settings = AgentSettings(
            config=tmp_path / "agent.json", heartbeat_seconds=0.5, fetch_timeout_seconds=0.5
        )
        online = asyncio.Event()

        async def on_beat(msg: Msg) -> None:
            online.set()

        beats = await api_nc.subscribe(subjects.agent_heartbeat(agent.agent_id), cb=on_beat)
        stop = asyncio.Event()
        task = asyncio.create_task(Supervisor(agent.identity, settings).run(stop))
        refused_on = subjects.agent_command_refused(agent.agent_id)

        def refusals() -> int:
            return sum(1 for s, b in agent.reports.received if s == refused_on)

        try:
            await asyncio.wait_for(online.wait(), 20)
            await agent.js.publish(subject, body, headers={**headers, "Nats-Msg-Id": "after-restart"})
            await agent.reports.wait_for(lambda s, b: refusals() == 2)
            await assert_consumer_settled(agent)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
            await beats.unsubscribe()
        started = subjects.agent_report(agent.agent_id, "backup", "started")
        assert [s for s in reports_about(agent, command.run_id) if s == started] == [started]  # ran once
        assert stored_files(agent) == files


async def test_rpc_requests_must_be_signed_fresh_and_new(
    nats_server: NatsServer, api_nc: NATS, tmp_path: Path
) -> None:
    async with running_agent(nats_server, api_nc, tmp_path) as agent:
        subject = subjects.agent_rpc(agent.agent_id, "storage.test")
        probe = StorageTarget(name="nas", kind="local", settings={"path": str(agent.storage_dir)})

        def request(expires_at: datetime | None = None) -> bytes:
            return StorageTestRequest(
                request_id=uuid.uuid4().hex,
                issued_at=now(),
                expires_at=expires_at or now() + timedelta(minutes=1),
                storage=probe,
            ).to_bytes()

        async def ask(body: bytes, headers: dict[str, str]) -> dict[str, Any]:
            reply = await agent.nc.request(subject, body, timeout=20, headers=headers)
            answer: dict[str, Any] = json.loads(reply.data)
            return answer

        good = request()
        assert (await ask(good, signed(subject, good)))["ok"] is True

        forged, old = request(), request(now() - timedelta(hours=1))
        plain = StorageTestRequest(request_id=uuid.uuid4().hex, storage=probe).to_bytes()
        cases = {
            "unsigned": (request(), {}),
            "forged": (forged, signing.signature_headers(INTRUDER_KEY, API_SIGNING_KEY_ID, subject, forged)),
            "replayed": (good, signed(subject, good)),
            "expired": (old, signed(subject, old)),
            "no expiry": (plain, signed(subject, plain)),
        }
        for name, (body, headers) in cases.items():
            answer = await ask(body, headers)
            assert answer["ok"] is False and answer["error_code"] == "refused", (name, answer)
            assert answer["error"].startswith("the agent refused this request: "), answer
        reasons = {"unsigned": "unsigned", "forged": "bad_signature", "replayed": "replayed"}
        for name, reason in reasons.items():
            request_id = json.loads(cases[name][0])["request_id"]
            report = await refusal_of(agent, request_id)
            assert (report["reason"], report["run_kind"]) == (reason, "rpc")

        # a db.test with a signature for storage.test is refused too (subject binding)
        db_subject = subjects.agent_rpc(agent.agent_id, "db.test")
        db_request = DbTestRequest(
            request_id=uuid.uuid4().hex,
            issued_at=now(),
            expires_at=now() + timedelta(minutes=1),
            database=DatabaseTarget(name="d", engine="sqlite", settings={"path": str(tmp_path / "x.db")}),
        ).to_bytes()
        reply = await agent.nc.request(
            db_subject, db_request, timeout=20, headers=signed(subject, db_request)
        )
        assert DbTestReply.from_bytes(reply.data).error_code == "refused"  # as the API reads it
        assert not (tmp_path / "x.db").exists()  # the agent never opened it

        # and an unsigned db.list, read the way the API reads that reply
        list_subject = subjects.agent_rpc(agent.agent_id, "db.list")
        list_request = DbListRequest(
            request_id=uuid.uuid4().hex,
            issued_at=now(),
            expires_at=now() + timedelta(minutes=1),
            database=DatabaseTarget(name="d", engine="sqlite", settings={"path": str(tmp_path / "x.db")}),
        ).to_bytes()
        listed = DbListReply.from_bytes((await agent.nc.request(list_subject, list_request, timeout=20)).data)
        assert (listed.ok, listed.error_code, listed.databases) == (False, "refused", [])
        assert listed.error is not None and listed.error.startswith("the agent refused this request: ")
    assert stored_files(agent) == []  # the good probe cleaned up after itself; the refused ones never ran


async def test_requests_and_commands_still_run_after_commands_overflowed_the_replay_cache(
    nats_server: NatsServer, api_nc: NATS, tmp_path: Path
) -> None:
    """A whole-server job sends one command (6 h lifetime) per database; once they overflow the cache
    its floor is hours ahead. A storage.test (a one-minute request) and a new backup must still run."""
    source = sqlite_source(tmp_path)
    filled = ReplayCache(replay_cache_path(tmp_path / "agent.json"), max_entries=100)
    start = now()
    for i in range(150):
        filled.remember(f"earlier-{i}", start + timedelta(hours=6, seconds=i), seq=i, now=start)
    assert filled.floor("command") == start + timedelta(hours=6, seconds=49)

    async with running_agent(nats_server, api_nc, tmp_path, replay_cache_max_entries=100) as agent:
        subject = subjects.agent_rpc(agent.agent_id, "storage.test")
        probe = StorageTestRequest(
            request_id=uuid.uuid4().hex,
            issued_at=now(),
            expires_at=now() + timedelta(seconds=50),
            storage=StorageTarget(name="nas", kind="local", settings={"path": str(agent.storage_dir)}),
        ).to_bytes()
        reply = await agent.nc.request(subject, probe, timeout=20, headers=signed(subject, probe))
        assert json.loads(reply.data)["ok"] is True, reply.data

        command = backup_command(agent, source, expires_at=now() + timedelta(hours=6, minutes=1))
        await agent.send_command("job.execute", command)
        done = await agent.reports.outcome("backup", "completed", "run_id", command.run_id)
        assert (agent.storage_dir / done["storage_key"]).is_file()

        # a replay is still refused
        reply = await agent.nc.request(subject, probe, timeout=20, headers=signed(subject, probe))
        assert json.loads(reply.data)["error_code"] == "refused"
        request_id = json.loads(probe)["request_id"]
        assert (await refusal_of(agent, request_id))["reason"] == "replayed"
        await assert_consumer_settled(agent)


async def test_an_identity_without_a_pinned_key_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Agents enrolled before commands were signed: re-enroll (pinning on first contact would pin
    whatever key the first message on the agent's subject came with)."""
    identity = make_identity("nats://127.0.0.1:9").model_copy(
        update={"command_key_id": None, "command_public_key_b64": None}
    )
    config = tmp_path / "agent.json"
    save_identity(identity, config)
    assert main(["run", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "pins no command-signing key" in err and "rahatback-agent enroll" in err and "--force" in err
    with pytest.raises(CommandAuthError):
        Supervisor(identity, AgentSettings(config=config))


async def test_a_damaged_replay_cache_stops_the_agent_instead_of_forgetting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.json"
    save_identity(make_identity("nats://127.0.0.1:9"), config)
    replay_cache_path(config).write_text("{not json")
    assert main(["run", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "replay cache" in err and "damaged" in err


# ------------------------------------------------------------------ the replay cache itself


def auth(tmp_path: Path, max_entries: int = 100) -> CommandAuth:
    cache = ReplayCache(tmp_path / "agent.commands.json", max_entries)
    return CommandAuth({API_SIGNING_KEY_ID: API_SIGNING_KEY.public_key()}, cache, timedelta(seconds=30))


def test_a_redelivery_is_not_a_replay(tmp_path: Path) -> None:
    """JetStream redelivers the same stored message (same stream sequence) when the agent did not
    acknowledge it: before the agent accepted it, it runs; after, it is acknowledged, not run."""
    checker = auth(tmp_path)
    expires = now() + timedelta(hours=1)
    assert checker.check_fresh("c1", expires, seq=7) == "new"
    assert checker.check_fresh("c1", expires, seq=7) == "new"  # crashed before accepting: runs
    checker.accept("c1", expires, seq=7)
    assert checker.check_fresh("c1", expires, seq=7) == "redelivered"
    with pytest.raises(CommandRefusal) as caught:
        checker.check_fresh("c1", expires, seq=8)  # the same command as another stream message
    assert caught.value.reason == "replayed"
    # and after a restart (a new process reading the file)
    assert auth(tmp_path).check_fresh("c1", expires, seq=7) == "redelivered"


def test_expired_entries_are_pruned_and_stay_refused(tmp_path: Path) -> None:
    checker = auth(tmp_path)
    moment = now()
    checker.accept("old", moment + timedelta(seconds=1), seq=1, now=moment)
    later = moment + timedelta(minutes=5)
    checker.accept("new", later + timedelta(hours=1), seq=2, now=later)
    assert checker.cache.seen("old") is None and checker.cache.seen("new") is not None
    with pytest.raises(CommandRefusal) as caught:  # gone from the cache, but expired anyway
        checker.check_fresh("old", moment + timedelta(seconds=1), seq=3, now=later)
    assert caught.value.reason == "expired"


def test_a_full_cache_keeps_refusing_what_it_had_to_forget(tmp_path: Path) -> None:
    checker = auth(tmp_path, max_entries=100)
    start = now()
    for i in range(150):
        checker.accept(f"c{i}", start + timedelta(hours=1, seconds=i), seq=i)
    assert len(checker.cache) == 100
    assert checker.cache.floor("command") == start + timedelta(hours=1, seconds=49)
    with pytest.raises(CommandRefusal, match="older than the replay cache remembers"):
        checker.check_fresh("c3", start + timedelta(hours=1, seconds=3), seq=999)
    # a genuine new command (expiring after every command seen so far) is still accepted
    assert checker.check_fresh("fresh", start + timedelta(hours=2), seq=1000) == "new"
    assert ReplayCache(tmp_path / "agent.commands.json").floor("command") == checker.cache.floor("command")


def test_commands_filling_the_cache_do_not_lock_out_requests(tmp_path: Path) -> None:
    """Commands live 6 h, requests about a minute: commands overflowing the cache (a whole-server job,
    one command per database) must not raise a floor hours ahead that every request falls under."""
    checker = auth(tmp_path, max_entries=100)
    start = now()
    checker.accept("r-old", start + timedelta(seconds=50), seq=None, kind="request")
    for i in range(150):
        checker.accept(f"c{i}", start + timedelta(hours=6, seconds=i), seq=i)
    assert checker.cache.floor("command") == start + timedelta(hours=6, seconds=49)
    assert checker.cache.floor("request") is None

    # a fresh request and a fresh command are accepted, after a restart too
    for fresh in (checker, auth(tmp_path, max_entries=100)):
        assert fresh.check_fresh("r-new", start + timedelta(seconds=50), None, kind="request") == "new"
        assert fresh.check_fresh("c-new", start + timedelta(hours=6, minutes=5), seq=500) == "new"
    checker.accept("r-new", start + timedelta(seconds=50), None, kind="request")
    # replays are still refused: a request it remembers, a command it had to forget
    replays: list[tuple[str, datetime, int | None, IdKind]] = [
        ("r-new", start + timedelta(seconds=50), None, "request"),
        ("r-old", start + timedelta(seconds=50), None, "request"),
        ("c3", start + timedelta(hours=6, seconds=3), 999, "command"),
        ("c120", start + timedelta(hours=6, seconds=120), 998, "command"),
    ]
    for ident, expires, seq, kind in replays:
        with pytest.raises(CommandRefusal) as caught:
            checker.check_fresh(ident, expires, seq, kind=kind)
        assert caught.value.reason == "replayed", ident


def test_a_cache_file_from_before_requests_were_kept_apart_still_refuses_replays(tmp_path: Path) -> None:
    start = now()
    floor = start + timedelta(hours=5)
    replay_cache_path(tmp_path / "agent.json").write_text(
        json.dumps(
            {
                "version": 1,
                "floor": floor.isoformat(),
                "entries": {
                    "c1": {"expires_at": (start + timedelta(hours=6)).isoformat(), "seq": 4},
                    "r1": {"expires_at": (start + timedelta(seconds=50)).isoformat(), "seq": None},
                },
            }
        )
    )
    checker = auth(tmp_path)
    with pytest.raises(CommandRefusal, match="already accepted"):
        checker.check_fresh("c1", start + timedelta(hours=6), seq=5)
    with pytest.raises(CommandRefusal, match="already accepted"):
        checker.check_fresh("r1", start + timedelta(seconds=50), None, kind="request")
    # which kind the old floor came from is unknown: it stays a floor for both until it passes
    assert checker.cache.floor("command") == checker.cache.floor("request") == floor
    checker.accept("c2", start + timedelta(hours=6, minutes=1), seq=6)
    assert json.loads(replay_cache_path(tmp_path / "agent.json").read_text())["version"] == 2
