"""Security: AUTH, ACL users and TLS straight from the URL; least-privilege ACLs suffice; no pickle anywhere."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from spool.engine import LLMEngine
from spool.producer import Client
from spool.protocol.connection import client_kwargs, connect
from spool.testing.chaos import ROOT, wait_for
from spool.testing.redis_server import free_port
from tests.worker_harness import running_worker

# The ACL rules docs/SECURITY.md recommends; keep the two in step.
PRODUCER_ACL = ("-@all +@connection +get +exists +set +xadd +xread +xrange +xrevrange +eval +multi +exec +discard "
                "~spool:*")
WORKER_ACL = ("-@all +@connection +xreadgroup +xgroup|create +xack +xdel +xclaim +xautoclaim +xpending +xread +xrange "
              "+xrevrange +exists +get +set +del +expire +xadd +hset +hget +hmget +hdel +sadd +srem +smembers +hincrby "
              "+eval +evalsha +script|load +multi +exec +discard ~spool:*")


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=4)


def _roundtrip(engine, worker_url: str, producer_url: str) -> None:
    client = Client(producer_url)
    rid = client.enqueue("secure", max_tokens=4, stream=True)
    with running_worker(engine, worker_url, claim_idle_ms=200):
        res = client.result(rid, timeout=30)
        events = list(client.stream(rid, timeout=10))
        client.cancel("nothing-to-cancel")
        assert client.status(rid) == "completed"
    assert res.status == "completed" and events[-1].type == "done"


def test_requirepass_url(engine, redis_server):
    admin = redis_server.client()
    admin.config_set("requirepass", "s3cret pass/word")
    url = f"redis://:s3cret%20pass%2Fword@127.0.0.1:{redis_server.port}/0"
    assert connect(url).ping()
    t0 = time.monotonic()
    for bad in (f"redis://:wrong@127.0.0.1:{redis_server.port}/0", redis_server.url):
        with pytest.raises(redis.AuthenticationError):
            connect(bad).ping()
    assert time.monotonic() - t0 < 2, "a wrong password must fail at once, not after the reconnect retries"
    _roundtrip(engine, url, url)


def test_least_privilege_acl_users(engine, redis_server):
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "producer", "on", ">ppass", *PRODUCER_ACL.split())
    admin.execute_command("ACL", "SETUSER", "worker", "on", ">wpass", *WORKER_ACL.split())
    admin.execute_command("ACL", "SETUSER", "default", "off")  # nobody gets in without a user
    port = redis_server.port
    producer_url, worker_url = (f"redis://{u}:{p}@127.0.0.1:{port}/0" for u, p in (("producer", "ppass"),
                                                                                     ("worker", "wpass")))
    _roundtrip(engine, worker_url, producer_url)
    p = connect(producer_url)
    # A producer can spend GPU time, but cannot manage groups or touch keys outside the prefix, not even
    # from a script (commands a script calls are held to the caller's ACL).
    for cmd in (("XGROUP", "DESTROY", "spool:jobs", "workers"), ("FLUSHALL",), ("CONFIG", "GET", "*"),
                ("GET", "other:secret"), ("KEYS", "*"), ("SCRIPT", "FLUSH")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            p.execute_command(*cmd)
    for script in ("return redis.call('FLUSHALL')", "return redis.call('GET', 'other:secret')"):
        with pytest.raises(redis.exceptions.ResponseError, match="(?i)can't run this command|can't access"):
            p.eval(script, 0)
    w = connect(worker_url)
    for cmd in (("FLUSHALL",), ("CONFIG", "SET", "save", ""), ("GET", "other:secret"), ("XGROUP", "DESTROY",
                                                                                          "spool:jobs", "workers")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            w.execute_command(*cmd)


def _tls_files(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_url(engine, tmp_path):
    from spool.testing.redis_server import RedisServer

    binary = RedisServer(tmp_path / "probe").binary
    key, cert = _tls_files(tmp_path)
    port = free_port()
    proc = subprocess.Popen([binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                             "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients",
                             "no", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    try:
        try:
            wait_for(lambda: proc.poll() is None and connect(url).ping(), 10, interval=0.1, what="TLS redis")
        except TimeoutError:
            out = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
            if "TLS" in out or "tls" in out:
                pytest.skip(f"this redis-server was built without TLS: {out[-200:]}")
            raise
        r = connect(url)
        assert r.connection_pool.connection_class.__name__ == "SSLConnection"
        with pytest.raises(redis.ConnectionError):  # an untrusted server certificate is refused
            connect(f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required", fail_fast=True).ping()
        _roundtrip(engine, url, url)
    finally:
        proc.kill()
        proc.wait()


def test_url_forms():
    assert client_kwargs("rediss://u:p@h:6380/0")["socket_keepalive"] is True
    assert "socket_keepalive" not in client_kwargs("unix:///tmp/spool.sock")
    with pytest.raises(ValueError, match="scheme"):
        client_kwargs("http://127.0.0.1:6379")
    r = connect("rediss://alice:pw@127.0.0.1:6380/2?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem")
    kw = r.connection_pool.connection_kwargs
    assert (kw["username"], kw["password"], kw["db"], kw["ssl_ca_certs"]) == ("alice", "pw", 2, "/ca.pem")
    assert r.connection_pool.connection_class.__name__ == "SSLConnection"
    assert connect("unix:///tmp/spool.sock").connection_pool.connection_kwargs["path"] == "/tmp/spool.sock"


_PICKLE = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|cloudpickle|joblib)\b|pickle\.loads?\(",
                     re.M)


def test_no_pickle_anywhere():
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".venv", "build", "dist"} or path == Path(__file__):
            continue
        text = path.read_text(errors="replace")
        if _PICKLE.search(text):
            offenders.append(f"{rel}: pickle")
        if re.search(r"torch\.load\((?![^)]*weights_only\s*=\s*True)", text):
            offenders.append(f"{rel}: torch.load without weights_only=True")
        if re.search(r"^\s*(import|from)\s+rq\b", text, re.M) and "JSONSerializer" not in text:
            offenders.append(f"{rel}: rq without serializer=JSONSerializer (rq pickles by default)")
    assert not offenders, offenders
