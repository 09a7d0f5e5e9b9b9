"""Reading sources: tar shards streamed with size limits and duplicate names, odd file names; real files and tars."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from roiqa import errors as row_errors
from roiqa import schema as S
from roiqa.config import IndexConfig
from roiqa.index.incremental import listing_rows, rows_of
from roiqa.index.tables import split_duplicates
from roiqa.io import uri as uri_mod
from roiqa.io.listing import list_images
from roiqa.io.sources import expand_tar, read_files

LIMIT = IndexConfig().max_image_bytes


def png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def member(name: str, data: bytes) -> bytes:
    """One regular tar member (GNU format): header, data, padding to the 512-byte block."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


def sparse_member(name: str, size: int) -> bytes:
    """An old-GNU sparse member (what GNU tar writes for a file with holes): the header says `size` bytes, the
    archive holds one 512-byte block of them; reading it gives the block, then zeros up to `size`."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 512
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    assert len(buf) == 512
    buf[386:398] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)  # sparse[0].offset
    buf[398:410] = tarfile.itn(512, 12, tarfile.GNU_FORMAT)  # sparse[0].numbytes
    buf[483:495] = tarfile.itn(size, 12, tarfile.GNU_FORMAT)  # realsize
    buf[148:156] = b" " * 8
    buf[148:155] = b"%06o\0" % sum(buf)
    return bytes(buf) + b"\1" * 512


def write_tar(path, *members: bytes) -> str:
    with open(path, "wb") as f:
        f.write(b"".join(members) + b"\0" * 1024)
    return str(path)


def rows(out: dict) -> list[tuple[str, int, str]]:
    """(uri, bytes read, reason) of each output row."""
    return [(u, len(b), e.reason if e else "") for u, b, e in zip(out[S.URI], out[S.BYTES], row_errors.read(out))]


def batch(*uris: str) -> dict[str, np.ndarray]:
    return {S.URI: np.array(list(uris), dtype=object)}


# ---------------------------------------------------------------- duplicate member names


def test_a_member_name_twice_gives_a_row_for_the_earlier_copy_and_the_last_is_read(tmp_path):
    red, green, blue = png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))
    shard = write_tar(tmp_path / "s.tar", member("a.png", red), member("b.png", green), member("a.png", blue))
    out = expand_tar(batch(shard))
    assert rows(out) == [(f"{shard}#a.png", 0, "duplicate_uri"), (f"{shard}#b.png", len(green), "")] + [
        (f"{shard}#a.png", len(blue), "")
    ]
    assert "appears again later" in out[S.ERROR_MESSAGE][0]
    assert out[S.BYTES][2] == blue
    # reading the URI back gives the same copy as the index read
    assert uri_mod.read_bytes(f"{shard}#a.png") == blue


def test_one_uri_read_twice_is_refused_and_other_rows_kept():
    emb = pa.table({S.IMAGE_ID: [1, 2, 1, 3, 3], S.URI: ["a", "b", "a", "c", "d"]})  # 3: a hash collision
    kept, errors = split_duplicates(emb)
    assert kept.column(S.URI).to_pylist() == ["b", "c"]
    got = sorted(zip(errors.column(S.URI).to_pylist(), errors.column(S.REASON).to_pylist()))
    assert got == [("a", "duplicate_uri"), ("a", "duplicate_uri"), ("d", "duplicate_uri")]
    assert "none is indexed" in errors.column(S.MESSAGE)[0].as_py()
    assert "c" in errors.column(S.MESSAGE)[2].as_py()
    assert split_duplicates(kept)[1].num_rows == 0


def test_a_reindex_carries_rows_of_unchanged_shards_and_lists_anew_only_the_listing_rows():
    errors = pa.table(
        {
            S.URI: ["/d/s.tar#a.png", "/d/m.png", "/d/x.tar#y.png"],
            S.STAGE: ["read"] * 3,
            S.REASON: ["duplicate_uri", "duplicate_uri", "too_large"],
            S.MESSAGE: [
                "tar member 'a.png' appears again later in the shard",
                "listed more than once in the manifest",
                "x",
            ],
        }
    )
    assert listing_rows(errors).to_pylist() == [False, True, False]
    # a file named like a tar member (no shard x.tar) is its own source
    assert rows_of(errors, {"/d/s.tar", "/d/x.tar#y.png"}).to_pylist() == [True, False, True]


# ---------------------------------------------------------------- size limits


def test_a_sparse_member_over_the_limit_is_a_row_and_not_read(tmp_path):
    size = 300 * 2**20
    shard = write_tar(tmp_path / "s.tar", member("ok.png", png((1, 2, 3))), sparse_member("big.png", size))
    assert os.path.getsize(shard) < 10_000
    with tarfile.open(shard) as tar:  # the reference: tarfile itself reads the member as 300 MiB
        assert tar.getmember("big.png").size == size
    out = expand_tar(batch(shard), max_bytes=LIMIT)
    assert rows(out) == [(f"{shard}#ok.png", len(png((1, 2, 3))), ""), (f"{shard}#big.png", 0, "too_large")]
    message = out[S.ERROR_MESSAGE][1]
    assert str(size) in message and str(LIMIT) in message and "index.max_image_bytes" in message
    with pytest.raises(uri_mod.TooLarge, match=str(size)):
        uri_mod.read_bytes(f"{shard}#big.png", max_bytes=LIMIT)


def test_a_shard_is_streamed_and_a_large_member_skipped_with_little_memory(tmp_path, run_measured):
    size = 400 * 2**20  # a regular member whose data is a hole on disk: the shard is 400 MiB, its blocks are not
    path = tmp_path / "s.tar"
    good = member("ok.png", png((9, 9, 9)))
    info = tarfile.TarInfo("big.png")
    info.size = size
    with open(path, "wb") as f:
        f.write(good + info.tobuf(tarfile.GNU_FORMAT))
        f.seek(size, os.SEEK_CUR)
        f.write(member("after.png", png((7, 7, 7))) + b"\0" * 1024)
    assert os.path.getsize(path) > size
    code = (
        "import numpy as np\nfrom roiqa.io.sources import expand_tar\n"
        "before()\nout = expand_tar({'uri': np.array([sys.argv[1]], dtype=object)}, max_bytes=int(sys.argv[2]))\n"
        "sizes = [len(b) for b in out['bytes']]\n"
        "print(json.dumps({'grew_mib': after(), 'sizes': sizes, 'errors': list(out['error_reason'])}))"
    )
    got = run_measured(code, str(path), str(LIMIT))
    assert got["sizes"] == [len(png((9, 9, 9))), 0, len(png((7, 7, 7)))]
    assert got["errors"] == ["", "too_large", ""]
    assert got["grew_mib"] < 50  # reading the shard whole (or the member) would take over 400 MiB


def test_a_file_over_the_limit_is_a_row_and_not_read(tmp_path):
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    small.write_bytes(png((1, 1, 1)))
    big.write_bytes(png((2, 2, 2)) + b"\0" * 5000)
    limit = 2000
    # from the listed size (no read at all) and, without one, by reading no more than limit + 1 bytes
    listed = {S.URI: np.array([str(small), str(big)], dtype=object), S.SIZE_BYTES: np.array([-1, 99_999])}
    for b in (listed, batch(str(small), str(big))):
        out = read_files(b, max_bytes=limit)
        assert rows(out) == [(str(small), small.stat().st_size, ""), (str(big), 0, "too_large")]
        assert str(limit) in out[S.ERROR_MESSAGE][1]
    assert "99999 bytes" in read_files(listed, max_bytes=limit)[S.ERROR_MESSAGE][1]
    assert read_files(batch(str(big)))[S.BYTES][0] == big.read_bytes()  # no limit given: read whole
    listing = list_images(str(tmp_path))
    assert listing.sizes == {str(small): small.stat().st_size, str(big): big.stat().st_size}


# ---------------------------------------------------------------- odd names


def test_names_with_chain_and_member_separators_are_read_as_files(tmp_path):
    a, b = png((1, 0, 0)), png((0, 1, 0))
    (tmp_path / "a::b.png").write_bytes(a)
    (tmp_path / "x.tar#y.png").write_bytes(b)
    listing = list_images(str(tmp_path))
    assert listing.uris == [str(tmp_path / "a::b.png"), str(tmp_path / "x.tar#y.png")] and not listing.errors
    assert uri_mod.filesystem(str(tmp_path / "a::b.png"))[1] == str(tmp_path / "a::b.png")
    out = read_files(batch(*listing.uris))
    assert list(out[S.BYTES]) == [a, b] and row_errors.read(out) == [None, None]
    # a shard x.tar without y.png does not hide the file; one that holds y.png is read as its member
    write_tar(tmp_path / "x.tar", member("other.png", a))
    assert uri_mod.read_bytes(str(tmp_path / "x.tar#y.png")) == b
    write_tar(tmp_path / "x.tar", member("y.png", a))
    uri_mod._tar_members.cache_clear()
    assert uri_mod.read_bytes(str(tmp_path / "x.tar#y.png")) == a
    assert rows(read_files(batch(str(tmp_path / "missing.tar#y.png"))))[0][2] == "not_found"


def test_a_file_name_that_is_not_utf8_is_a_row_showing_its_bytes(tmp_path):
    (tmp_path / "good.png").write_bytes(png((5, 5, 5)))
    fd = os.open(os.fsencode(str(tmp_path)) + b"/bad\xffname.png", os.O_WRONLY | os.O_CREAT)
    os.write(fd, png((6, 6, 6)))
    os.close(fd)
    listing = list_images(str(tmp_path))
    assert listing.uris == [str(tmp_path / "good.png")]
    [(uri, err)] = listing.errors
    assert uri == str(tmp_path) + "/bad\\xffname.png"
    assert (err.stage, err.reason) == ("read", "undecodable_name")
    assert set(listing.signatures) == set(listing.sizes) == {str(tmp_path / "good.png")}
    pa.array([uri, *listing.uris], pa.string())  # every URI can go into a table


def test_a_tar_member_name_that_is_not_utf8_is_a_row_showing_its_bytes(tmp_path):
    info = tarfile.TarInfo("bad\udcffname.png")  # tarfile writes the byte 0xff back (surrogateescape)
    data = png((3, 3, 3))
    info.size = len(data)
    raw = info.tobuf(tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")
    assert b"bad\xffname.png" in raw
    shard = write_tar(tmp_path / "s.tar", raw + data + b"\0" * (-len(data) % 512), member("ok.png", data))
    out = expand_tar(batch(shard))
    assert rows(out) == [(f"{shard}#bad\\xffname.png", 0, "undecodable_name"), (f"{shard}#ok.png", len(data), "")]
    pa.array(list(out[S.URI]), pa.string())
