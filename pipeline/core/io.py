"""Writing files so that a reader never sees half of one: written aside, flushed, then renamed into place.

Every file the pipeline writes for another process or a later run to read (manifests, checkpoints' state, the
world's generated data, generated replies) goes through `write_atomic`; `inventory` and `damaged` check a folder
against the sizes recorded when it was written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


def write_atomic(path: Path, write) -> None:
    """`write(f)` into a file beside `path`, flushed to disk, then renamed onto it: readers (other ranks, other runs,
    a process killed mid-write) see the old file or the complete new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def json_line(obj) -> str:
    """One JSON line with sorted keys and no spaces: the same record always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text))


def write_jsonl(path: Path, records) -> None:
    write_atomic(path, lambda f: f.writelines(map(json_line, records)))


def write_json_atomic(path: Path, obj: Any) -> None:
    """A JSON document (manifests, checkpoint state), indented and with sorted keys."""
    write_atomic(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=str))


def read_utf8(path: Path) -> str:
    """The text of a file the user gave us, which must be UTF-8 (a leading byte-order mark is dropped). Anything else
    is one UserError naming the file, the byte offset and line of the first bad byte, and what the file looks like."""
    from pipeline.core.errors import UserError

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        looks = (
            "UTF-16 (it starts with a UTF-16 byte-order mark)"
            if data[:2] in (b"\xff\xfe", b"\xfe\xff")
            else "binary"
            if b"\x00" in data[:4096]
            else "text in another encoding"
        )
        raise UserError(
            f"{path}: not UTF-8 at byte {e.start} (line {line}: {e.reason}); it looks like {looks}. "
            f"The file must be UTF-8 (convert it, e.g. iconv -f <encoding> -t utf-8)"
        ) from None


def inventory(folder: Path) -> dict[str, int]:
    """{relative path: size} of every file under `folder`: cheap to check, and catches truncated or missing files."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def damaged(folder: Path, expected: dict[str, int]) -> Optional[str]:
    """What is wrong with `folder` against its recorded inventory, or None when it is whole."""
    for name, size in expected.items():
        p = Path(folder) / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} is {p.stat().st_size} bytes, expected {size}"
    return None
