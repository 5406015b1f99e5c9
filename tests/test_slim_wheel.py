"""launch/slim_wheel.py: the repacked wheel keeps exactly the files asked for, unchanged, with a RECORD pip accepts."""
import zipfile

import pytest

from launch.slim_wheel import NOTE_NAME, record_hash, slim_wheel

FILES = {
    "pkg/__init__.py": b"x = 1\n",
    "pkg/suite/walker.xml": b"<mujoco/>" * 10,
    "pkg/suite/dog_assets/bone.stl": b"\x00" * 4096,
    "pkg/locomotion/soccer/__init__.py": b"import big\n",
    "pkg/engine_test.py": b"assert True\n",
    "pkg-1.0.dist-info/METADATA": b"Name: pkg\nVersion: 1.0\n",
    "pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\n",
}


def _wheel(path, files, record=True):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        if record:  # a stale RECORD that still lists every file: it must not survive the repack
            z.writestr("pkg-1.0.dist-info/RECORD", "".join(f"{n},{record_hash(d)},{len(d)}\n" for n, d in files.items()))
    return path


def test_slim_wheel_drops_prefixes_and_suffixes_and_rewrites_record(tmp_path):
    src = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl", FILES)
    dst, dropped = slim_wheel(src, tmp_path / "out", drop=("pkg/suite/dog_assets/", "pkg/locomotion/"),
                              drop_suffixes=("_test.py",))
    assert dst.name == src.name
    assert sorted(dropped) == ["pkg/engine_test.py", "pkg/locomotion/soccer/__init__.py", "pkg/suite/dog_assets/bone.stl"]
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        kept = {n for n in FILES if n not in dropped}
        assert names == kept | {"pkg-1.0.dist-info/RECORD", f"pkg-1.0.dist-info/{NOTE_NAME}"}
        for n in kept:
            assert z.read(n) == FILES[n]
        rows = [line.split(",") for line in z.read("pkg-1.0.dist-info/RECORD").decode().splitlines()]
    listed = {r[0]: r for r in rows}
    assert set(listed) == names
    assert listed["pkg-1.0.dist-info/RECORD"][1:] == ["", ""]
    with zipfile.ZipFile(dst) as z:
        for name, h, size in rows:
            if name.endswith("RECORD"):
                continue
            data = z.read(name)
            assert (h, int(size)) == (record_hash(data), len(data)), name


def test_slim_wheel_is_reproducible(tmp_path):
    src = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl", FILES)
    a, _ = slim_wheel(src, tmp_path / "a", drop=("pkg/locomotion/",))
    b, _ = slim_wheel(src, tmp_path / "b", drop=("pkg/locomotion/",))
    assert a.read_bytes() == b.read_bytes()


def test_slim_wheel_refuses_bad_input(tmp_path):
    src = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl", FILES)
    with pytest.raises(ValueError, match="overwrite its source"):
        slim_wheel(src, tmp_path, drop=())
    bare = _wheel(tmp_path / "bare-1.0-py3-none-any.whl", {"bare/__init__.py": b""}, record=False)
    with pytest.raises(ValueError, match="dist-info"):
        slim_wheel(bare, tmp_path / "out", drop=())


def test_record_hash_is_urlsafe_unpadded_sha256():
    # sha256(b"") = e3b0c442...; its urlsafe base64 without '=' padding (PEP 376)
    assert record_hash(b"") == "sha256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"
