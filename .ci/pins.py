"""Compare what a venv installed (its `pip freeze`) with constraints.txt.

    python .ci/pins.py check FREEZE   exit 1 when an installed package is not pinned (CI: nothing floats)
    python .ci/pins.py diff FREEZE    print the packages whose installed version differs from the pinned one
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def versions(path: Path) -> dict[str, str]:
    """{normalized name: version} of the `name==version` lines (local labels such as +cpu dropped)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==([^\s;+]+)", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def main(command: str, freeze: str) -> int:
    installed, pinned = versions(Path(freeze)), versions(CONSTRAINTS)
    if command == "check":
        loose = sorted(f"{n}=={v}" for n, v in installed.items() if n not in pinned)
        if loose:
            print(f"constraints.txt does not pin {len(loose)} installed package(s): {', '.join(loose)}")
            return 1
        print(f"all {len(installed)} installed packages are pinned by constraints.txt")
        return 0
    changed = [f"{n}: {pinned.get(n, 'not pinned')} -> {v}" for n, v in sorted(installed.items()) if pinned.get(n) != v]
    print("\n".join(changed) if changed else "every installed package is at its pinned version")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("check", "diff"):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
