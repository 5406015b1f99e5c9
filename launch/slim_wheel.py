"""Repack a wheel without some of its files: the slim dm_control wheel that the GPU session carries.

dm_control 1.0.50's wheel is 56 MB, mostly assets that the MT30 tasks never load (locomotion's soccer players
and walkers, the dog's meshes, MuJoCo's rendering test frames, Blender docs). The GPU machine reaches no
package registry and a device call carries at most 64 MiB, so `launch/gpu_wheels.sh` carries this slim copy
(about 1.5 MB) instead. The code that stays is byte for byte the released one; only files are left out, and
RECORD is rewritten to list exactly the files kept (with their sha256 and size), so pip installs it as usual.

    python -m launch.slim_wheel SRC.whl DST_DIR [--drop PREFIX ...] [--drop-suffix SUFFIX ...]
    (no --drop: DM_CONTROL_DROP below)
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import sys
import zipfile
from pathlib import Path
from typing import Sequence

#: dm_control paths (prefixes inside the wheel) that `import dm_control.suite` and the 30 MT30 tasks (19 suite
#: tasks, 11 built in fmbpo_jax/envs/custom.py from suite domains) never read. The suite's dog.py stays (the
#: suite imports it) without its meshes: loading the dog domain fails, no MT30 task uses it.
DM_CONTROL_DROP = (
    "dm_control/locomotion/",
    "dm_control/manipulation/",
    "dm_control/suite/dog_assets/",
    "dm_control/suite/all_domains.png",
    "dm_control/blender/",
    "dm_control/mujoco/testing/assets/",
    "dm_control/third_party/kinova/",
)
#: test modules are never imported by library code
DM_CONTROL_DROP_SUFFIXES = ("_test.py",)

NOTE_NAME = "SLIM.txt"


def record_hash(data: bytes) -> str:
    """RECORD's hash field: 'sha256=' + urlsafe base64 of the digest without padding (PEP 376 / 427)."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def dist_info_dir(names: Sequence[str]) -> str:
    """The wheel's single top-level '*.dist-info/' directory (with the slash)."""
    found = sorted({n.split("/", 1)[0] + "/" for n in names if n.split("/", 1)[0].endswith(".dist-info")})
    if len(found) != 1:
        raise ValueError(f"expected exactly one *.dist-info directory in the wheel, found {found}")
    return found[0]


def _fixed_info(name: str) -> zipfile.ZipInfo:
    """A zip entry dated 1980-01-01 (zip's epoch), so that rebuilding gives the same bytes."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def keep_name(name: str, drop: Sequence[str], drop_suffixes: Sequence[str]) -> bool:
    return not any(name.startswith(p) for p in drop) and not name.endswith(tuple(drop_suffixes))


def slim_wheel(src: str | os.PathLike, dst_dir: str | os.PathLike, drop: Sequence[str],
               drop_suffixes: Sequence[str] = ()) -> tuple[Path, list[str]]:
    """Write dst_dir/<same file name> with the files of `src` whose names start with none of `drop` and end
    with none of `drop_suffixes`; RECORD lists what is kept, and <dist-info>/SLIM.txt says what was left out.

    Returns (the new wheel's path, the names left out). The source's own RECORD is replaced, never copied.
    """
    src, dst_dir = Path(src), Path(dst_dir)
    dst = dst_dir / src.name
    if dst.resolve() == src.resolve():
        raise ValueError(f"{src}: the slim wheel would overwrite its source; choose another directory")
    dst_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as zin:
        infos = [i for i in zin.infolist() if not i.is_dir()]
        dist = dist_info_dir([i.filename for i in infos])
        record_name = dist + "RECORD"
        kept = [i for i in infos if i.filename != record_name and keep_name(i.filename, drop, drop_suffixes)]
        dropped = [i.filename for i in infos if i.filename != record_name and i not in kept]
        note = ("Repacked by launch/slim_wheel.py from " + src.name + ": " + str(len(dropped)) + " files left out "
                "(prefixes " + ", ".join(drop) + (("; suffixes " + ", ".join(drop_suffixes)) if drop_suffixes else "")
                + "). Everything kept is unchanged.\n").encode()
        tmp = dst.with_name(dst.name + ".tmp")
        lines = []
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            for info in kept:
                data = zin.read(info)
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
                lines.append(f"{info.filename},{record_hash(data)},{len(data)}")
            zout.writestr(_fixed_info(dist + NOTE_NAME), note)
            lines.append(f"{dist}{NOTE_NAME},{record_hash(note)},{len(note)}")
            lines.append(f"{record_name},,")
            zout.writestr(_fixed_info(record_name), "\n".join(lines) + "\n")
    os.replace(tmp, dst)
    return dst, dropped


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.slim_wheel", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="the wheel to repack")
    p.add_argument("dst_dir", help="directory for the slim wheel (same file name as src)")
    p.add_argument("--drop", nargs="*", default=None, help="path prefixes to leave out (default: DM_CONTROL_DROP)")
    p.add_argument("--drop-suffix", nargs="*", default=None, help="name endings to leave out (default: _test.py)")
    a = p.parse_args(argv)
    drop = DM_CONTROL_DROP if a.drop is None else tuple(a.drop)
    suffixes = DM_CONTROL_DROP_SUFFIXES if a.drop_suffix is None else tuple(a.drop_suffix)
    try:
        dst, dropped = slim_wheel(a.src, a.dst_dir, drop, suffixes)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        print(f"slim_wheel: {a.src}: {e}", file=sys.stderr)
        return 2
    mb = lambda p: os.path.getsize(p) / 1e6  # noqa: E731
    print(f"{dst}: {mb(a.src):.1f} MB -> {mb(dst):.1f} MB, {len(dropped)} files left out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
