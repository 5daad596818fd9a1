"""`python -m stablelm.kernels`: build the native kernels now (otherwise the first model that needs them
builds them, ~35 s on 2 cores) and print what this CPU runs: its probes and each format's status as JSON."""

from __future__ import annotations

import json

from . import native_ops


def main() -> int:
    from ..layers import linear  # after the build: describe() probes every format

    native_ops()  # None, having said why in one line, when the build cannot run: the torch paths still work
    print(json.dumps(linear.describe(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
