"""Object-store faults and credentials, through a TCP relay in front of the S3 server that the test takes down.

Injected: (1) the endpoint refuses every connection for 2 s while a re-index starts: the run retries and publishes;
(2) the endpoint goes down at the moment the run uploads its new faiss index and stays down until the run gives
up: `roiqa reindex` exits 3 with one line naming the object and the retries, CURRENT still names the old version,
the half-written version has no manifest, the failure to record the run is logged, and once the endpoint is back
the next run takes over the lock, completes with every input exactly once and removes the leftover; (3) the
endpoint goes down when a query run uploads its results: `roiqa query` exits 3, the published query run (CURRENT,
its tables and overlays) is unchanged, and the failed run's overlays stay in an unpublished folder of their own.
Throughout, a distinctive secret key is in the environment: it never appears in anything written to the store,
printed, or logged by Ray's workers.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.fault_relay import FlakyEndpoint
from roiqa import schema as S
from roiqa.index import store
from roiqa.io.redact import redact
from roiqa.results.output import open_results

pytestmark = pytest.mark.slow

BUCKET = "roiqa-faults"
SECRET = "roiqa-test-secret-" + uuid.uuid4().hex
KEY_ID = "AKIAROIQATEST" + uuid.uuid4().hex[:8].upper()
RETRY_S = 4.0


@pytest.fixture(scope="module")
def flaky(s3_server):
    """The relay, with the AWS variables (and a distinctive secret) pointing at it, and a Ray started after them
    so its workers reach the store through the relay too."""
    import ray
    import s3fs

    host, port = s3_server.rsplit("//", 1)[1].split(":")
    relay = FlakyEndpoint((host, int(port)))
    env = {
        "AWS_ENDPOINT_URL": relay.url,
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "ROIQA_STORAGE_RETRY_S": str(RETRY_S),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    direct.mkdir(BUCKET)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    session = ray._private.worker._global_node.get_session_dir_path()
    yield relay, direct, session
    ray.shutdown()
    relay.close()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _upload(direct, collection) -> list[str]:
    files = sorted(glob.glob(os.path.join(collection.gallery_dir, "*")))
    for f in files:
        direct.put_file(f, f"{BUCKET}/images/{os.path.basename(f)}")
    direct.pipe_file(f"{BUCKET}/images/broken.jpg", b"\xff\xd8\xff truncated")
    return files


def _reindex(capsys, cfg_path: str) -> tuple[int, str, str]:
    from jobs.reindex import main

    argv = ["--images", f"s3://{BUCKET}/images", "--index", f"s3://{BUCKET}/index", "--model", "none"]
    rc = main([*argv, "--config", cfg_path])
    out, err = capsys.readouterr()
    _PRINTED.append(out + err)
    return rc, out, err


_PRINTED: list[str] = []


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    cfg = {"model": {"fpn_channels": 32}, "preprocess": {"image_size": 128}, "index": {"batch_size": 8}}
    path.write_text(json.dumps(cfg))
    return str(path)


def test_a_short_outage_is_retried_and_the_run_publishes(flaky, collection, tiny_yaml, capsys):
    relay, direct, _ = flaky
    files = _upload(direct, collection)
    rc, out, err = _reindex(capsys, tiny_yaml)
    assert rc == 0, err[-2000:]
    first = json.loads(out.strip().splitlines()[-1])
    assert (first["status"], first["mode"], first["new"]) == ("published", "full", len(files) + 1)

    direct.put_file(files[0], f"{BUCKET}/images/added.jpg")
    relay.down(2.0)  # shorter than the retry window
    refused = relay.refused
    rc, out, err = _reindex(capsys, tiny_yaml)
    assert rc == 0, err[-2000:]
    second = json.loads(out.strip().splitlines()[-1])
    assert (second["status"], second["new"], second["unchanged"]) == ("published", 1, len(files) + 1)
    assert relay.refused > refused  # the outage really hit the run
    assert direct.cat_file(f"{BUCKET}/index/CURRENT").decode().strip() == second["version"]


def test_an_outage_while_publishing_fails_clearly_and_publishes_nothing(flaky, collection, tiny_yaml, capsys, caplog):
    relay, direct, _ = flaky
    before = direct.cat_file(f"{BUCKET}/index/CURRENT").decode().strip()
    direct.put_file(sorted(glob.glob(os.path.join(collection.gallery_dir, "*")))[1], f"{BUCKET}/images/late.jpg")
    runs_before = store.read_runs(f"s3://{BUCKET}/index").num_rows
    # down from the moment the new faiss index is uploaded until the run has given up
    relay.trip, relay.trip_down_s = re.compile(rb"PUT /roiqa-faults/index/versions/[^ ]+/faiss\.index"), 1e9
    t0 = time.monotonic()
    rc, out, err = _reindex(capsys, tiny_yaml)
    relay.up()
    assert relay.tripped.is_set()
    assert rc == 3, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("roiqa reindex: error:")]
    assert len(line) == 1 and "object store unreachable" in line[0] and "faiss.index" in line[0]
    assert "ROIQA_STORAGE_RETRY_S" in line[0] and time.monotonic() - t0 >= RETRY_S
    assert direct.cat_file(f"{BUCKET}/index/CURRENT").decode().strip() == before  # readers stay on the old one
    direct.invalidate_cache()
    versions = [p.rsplit("/", 1)[-1] for p in direct.ls(f"{BUCKET}/index/versions")]
    half = [v for v in versions if not direct.exists(f"{BUCKET}/index/versions/{v}/{store.MANIFEST}")]
    assert len(half) == 1  # the half-written version: embeddings, no manifest, never published
    assert "could not record the failed run" in err + caplog.text  # the store was down: said, not dropped
    assert store.read_runs(f"s3://{BUCKET}/index").num_rows == runs_before

    rc, out, err = _reindex(capsys, tiny_yaml)
    assert rc == 0, err[-2000:]
    done = json.loads(out.strip().splitlines()[-1])
    assert (done["status"], done["new"], done["parent"]) == ("published", 1, before)
    direct.invalidate_cache()
    assert not direct.exists(f"{BUCKET}/index/versions/{half[0]}")  # the leftover was garbage-collected
    v = store.open_index(f"s3://{BUCKET}/index")
    uris = v.embeddings([S.URI]).column(S.URI).to_pylist() + v.errors().column(S.URI).to_pylist()
    listed = sorted(f"s3://{p}" for p in direct.ls(f"{BUCKET}/images"))
    assert sorted(uris) == listed  # every input exactly once
    assert v.errors().column(S.REASON).to_pylist() == ["corrupt"]


def test_an_outage_during_the_workers_reads_exits_3(flaky, collection, tiny_yaml, capsys, tmp_path):
    """The store goes down when a Ray worker first reads an image (the listing in the driver went through): the
    worker's StorageUnavailable reaches the job through Ray's wrapper, exit 3, nothing published."""
    relay, direct, _ = flaky
    for f in sorted(glob.glob(os.path.join(collection.gallery_dir, "*")))[:4]:
        direct.put_file(f, f"{BUCKET}/worker-reads/{os.path.basename(f)}")
    relay.tripped.clear()
    relay.trip, relay.trip_down_s = re.compile(rb"GET /roiqa-faults/worker-reads/[^ ?]+ HTTP"), 1e9
    from jobs.index import main

    index = str(tmp_path / "index")
    argv = ["--images", f"s3://{BUCKET}/worker-reads", "--index", index, "--model", "none", "--config", tiny_yaml]
    rc = main(argv)
    relay.up()
    out, err = capsys.readouterr()
    _PRINTED.append(out + err)
    assert relay.tripped.is_set()
    assert rc == 3, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("roiqa index: error:")]
    assert len(line) == 1 and "object store unreachable" in line[0] and "/worker-reads/" in line[0]
    assert store.current_version(index) is None


def test_an_outage_while_ray_data_writes_the_embeddings_exits_3(flaky, collection, tiny_yaml, capsys):
    """The store goes down when Ray Data's write_parquet uploads the new version's embeddings (a write outside
    roiqa's own storage calls): the write is retried, then the run exits 3 with one line, not a traceback."""
    relay, direct, _ = flaky
    for f in sorted(glob.glob(os.path.join(collection.gallery_dir, "*")))[:3]:
        direct.put_file(f, f"{BUCKET}/emb-write/{os.path.basename(f)}")
    relay.tripped.clear()
    relay.trip, relay.trip_down_s = re.compile(rb"/roiqa-faults/emb-index/versions/\S+/embeddings/"), 1e9
    from jobs.index import main

    index = f"s3://{BUCKET}/emb-index"
    argv = ["--images", f"s3://{BUCKET}/emb-write", "--index", index, "--model", "none", "--config", tiny_yaml]
    try:
        rc = main(argv)
    finally:
        relay.up()
    out, err = capsys.readouterr()
    _PRINTED.append(out + err)
    assert relay.tripped.is_set()
    assert rc == 3, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("roiqa index: error:")]
    assert len(line) == 1 and "object store unreachable" in line[0] and "embeddings" in line[0]
    assert store.current_version(index) is None


def test_a_query_whose_gallery_store_is_down_exits_3_and_writes_no_results(
    flaky, collection, tiny_yaml, capsys, tmp_path
):
    """Gallery images on s3:// and the endpoint down during the query: an outage, not bad data (no
    `image_unreadable` rows and exit 0): exit 3 and no results."""
    relay, direct, _ = flaky
    for f in sorted(glob.glob(os.path.join(collection.gallery_dir, "*")))[:4]:
        direct.put_file(f, f"{BUCKET}/gallery-q/{os.path.basename(f)}")
    from jobs.index import main as index_main
    from jobs.query import main as query_main

    index, out = str(tmp_path / "index"), str(tmp_path / "out")
    rc = index_main(
        ["--images", f"s3://{BUCKET}/gallery-q", "--index", index, "--model", "none", "--config", tiny_yaml]
    )
    assert rc == 0, capsys.readouterr().err[-2000:]
    relay.down(1e9)
    try:
        rc = query_main(["--index", index, "--queries", collection.queries_uri, "--out", out, "--config", tiny_yaml])
    finally:
        relay.up()
    printed, err = capsys.readouterr()
    _PRINTED.append(printed + err)
    assert rc == 3, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("roiqa query: error:")]
    assert len(line) == 1 and "object store unreachable" in line[0] and "/gallery-q/" in line[0]
    assert not glob.glob(os.path.join(out, "**", "*.parquet"), recursive=True)


def _query(capsys, tmp_path, queries: str, overlay_size: int) -> tuple[int, str, str]:
    from jobs.query import main

    cfg = {
        "model": {"fpn_channels": 32},
        "preprocess": {"image_size": 128},
        "query": {"top_k": 4, "rerank": 2, "query_sizes": [24, 40], "descriptor_size": 40, "peaks": 3},
        "geometry": {"shortlist": 0},
    }
    cfg["query"]["overlay_size"] = overlay_size  # the overlays of two runs differ
    cfg["query"]["allowed_prefixes"] = [os.path.dirname(queries)]  # the query images stay beside the collection
    path = tmp_path / f"query-{overlay_size}.yaml"
    path.write_text(json.dumps(cfg))
    pq.write_table(pq.read_table(queries).slice(0, 2), tmp_path / "queries.parquet")
    argv = ["--index", f"s3://{BUCKET}/index", "--queries", str(tmp_path / "queries.parquet")]
    rc = main([*argv, "--out", f"s3://{BUCKET}/query", "--config", str(path)])
    out, err = capsys.readouterr()
    _PRINTED.append(out + err)
    return rc, out, err


def test_an_outage_during_a_query_run_leaves_the_published_run_intact(flaky, collection, capsys, tmp_path):
    relay, direct, _ = flaky
    rc, out, err = _query(capsys, tmp_path, collection.queries_uri, overlay_size=96)
    assert rc == 0, err[-2000:]
    printed = json.loads(out.strip().splitlines()[-1])
    published = open_results(f"s3://{BUCKET}/query")
    prefix = f"{BUCKET}/query/"

    def snapshot() -> dict[str, bytes]:
        direct.invalidate_cache()
        return {p: direct.cat_file(p) for p in direct.find(prefix)}

    before = snapshot()
    assert any(p.endswith(".png") for p in before)
    # a second run (other overlays) loses the store once its overlays are written, when it uploads its results
    relay.tripped.clear()
    relay.trip, relay.trip_down_s = re.compile(rb"PUT /roiqa-faults/query/\S*results\.parquet"), 1e9
    rc, out, err = _query(capsys, tmp_path, collection.queries_uri, overlay_size=64)
    relay.up()
    assert relay.tripped.is_set() and rc == 3, err[-2000:]
    assert "object store unreachable" in err and "results.parquet" in err
    after = snapshot()
    assert {p: after[p] for p in before} == before  # nothing of the published run changed
    run = open_results(f"s3://{BUCKET}/query")
    assert run == published and run.summary()["run_id"] == run.run_id and printed["run"] == run.folder
    heat = run.results().column(S.HEATMAP_URI).drop_null().to_pylist()
    assert heat and all(before[u[len("s3://") :]] == direct.cat_file(u[len("s3://") :]) for u in heat)
    # the failed run left only its overlays in a folder of its own, never published
    left = sorted({p[len(prefix) :].split("/")[1] for p in after if p not in before})
    assert len(left) == 1 and left[0] != run.run_id
    assert not direct.exists(f"{prefix}runs/{left[0]}/summary.json")


def test_credentials_never_leave_the_environment(flaky, tiny_yaml, capsys, tmp_path):
    relay, direct, session = flaky
    # a manifest row carrying credentials in its URL: refused, and the error line masks them
    pq.write_table(pa.table({S.URI: [f"s3://{KEY_ID}:{SECRET}@elsewhere/x.jpg"]}), tmp_path / "m.parquet")
    direct.put_file(str(tmp_path / "m.parquet"), f"{BUCKET}/manifests/m.parquet")
    from jobs.index import main

    rc = main(["--images", f"s3://{BUCKET}/manifests/m.parquet", "--index", f"s3://{BUCKET}/index2"])
    out, err = capsys.readouterr()
    assert rc == 2 and "outside the allowed prefixes" in err and "s3://***@elsewhere/x.jpg" in err
    _PRINTED.append(out + err)

    leaks = []
    for text in _PRINTED:
        leaks += [s for s in (SECRET, KEY_ID) if s in text]
    written = [p for p in direct.find(BUCKET) if not p.startswith((f"{BUCKET}/manifests/", f"{BUCKET}/images/"))]
    for path in written:  # everything roiqa wrote (the inputs above hold the secret on purpose)
        data = direct.cat_file(path)
        leaks += [f"{path}: {s}" for s in (SECRET, KEY_ID) if s.encode() in data]
    for root, _, names in os.walk(os.path.join(session, "logs")):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            leaks += [f"{name}: {s}" for s in (SECRET, KEY_ID) if s.encode() in data]
    assert not leaks


def test_redact_masks_secrets_urls_and_signatures():
    env = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "RAY_AUTH_TOKEN": "tok-123456", "HOME": "/root"}
    text = (
        "GET s3://AKIA1:s3cr3t-value@bucket/k?X-Amz-Signature=abc123&X-Amz-Credential=AKIA/x&a=1 "
        "token tok-123456 home /root\nAuthorization: AWS4-HMAC-SHA256 Credential=zzz, Signature=fff"
    )
    assert redact(text, env) == (
        "GET s3://***@bucket/k?X-Amz-Signature=***&X-Amz-Credential=***&a=1 token *** home /root\nAuthorization: ***"
    )
