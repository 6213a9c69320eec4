"""tarstream agrees with tarfile on every format it may meet, and reports cut archives."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from vila2_curate.pipelines.io.readers.tarstream import TarTruncated, iter_members


def _archive(fmt: int, names: list[str], link: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = (f"payload {i} " * (i * 37 + 1)).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000.25  # a float mtime makes PAX writers add an extended header
            tar.addfile(info, io.BytesIO(data))
        if link:
            sym = tarfile.TarInfo("evil.jpg")
            sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(sym)
            d = tarfile.TarInfo("folder")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
    return buf.getvalue()


NAMES = ["000000001.jpg", "000000001.txt", "ü-ñame.json", "d/" * 60 + "deep.jpg", "x" * 150 + ".txt"]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_match_tarfile(fmt: int):
    names = NAMES if fmt != tarfile.USTAR_FORMAT else NAMES[:3] + ["d/" * 40 + "deep.jpg"]
    data = _archive(fmt, names)
    ours = [(m.name, m.size, m.type, m.linkname, m.data) for m in iter_members(io.BytesIO(data))]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        ref = [(m.name, m.size, m.type, m.linkname, tar.extractfile(m).read() if m.isreg() else None)
               for m in tar.getmembers()]
    assert ours == ref


def test_gzip_archive_is_detected():
    data = gzip.compress(_archive(tarfile.PAX_FORMAT, NAMES[:2]))
    assert [m.name for m in iter_members(io.BytesIO(data))][:2] == NAMES[:2]


def test_want_skips_data():
    data = _archive(tarfile.PAX_FORMAT, NAMES[:3], link=False)
    members = list(iter_members(io.BytesIO(data), want=lambda n: n.endswith(".txt")))
    assert [m.data is not None for m in members] == [False, True, False]


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.9])
def test_cut_archive_yields_what_it_read_then_raises(cut: float):
    data = _archive(tarfile.PAX_FORMAT, NAMES[:3], link=False)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
        end = last.offset_data + last.size  # end of the last member's data (zero padding follows)
    got = []
    with pytest.raises(TarTruncated):
        for m in iter_members(io.BytesIO(data[: int(end * cut)])):
            got.append(m.name)
    assert len(got) < 3


def test_cut_exactly_between_members_is_truncation_not_end():
    data = _archive(tarfile.USTAR_FORMAT, NAMES[:2], link=False)
    first = 512 + (len(b"payload 0 ") + 511) // 512 * 512
    with pytest.raises(TarTruncated, match="end-of-archive"):
        list(iter_members(io.BytesIO(data[:first])))


def test_garbage_header_and_empty_file():
    data = _archive(tarfile.USTAR_FORMAT, NAMES[:1], link=False)
    first = 1024
    with pytest.raises(TarTruncated, match="checksum"):
        list(iter_members(io.BytesIO(data[:first] + b"\x07" * 512)))
    assert list(iter_members(io.BytesIO(b""))) == []
