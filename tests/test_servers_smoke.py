from tests.servers import NatsServer, PostgresServer


def test_postgres_answers(postgres: PostgresServer) -> None:
    assert postgres.psql("postgres", "select 1") == "1"


async def test_nats_jetstream_answers(nats_server: NatsServer) -> None:
    import nats

    nc = await nats.connect(nats_server.url)
    info = await nc.jetstream().account_info()
    assert info.limits is not None
    await nc.close()
