"""The package's folders form layers, and no module imports one from a higher layer (issue 28): a change
that needs one is a sign the code sits in the wrong folder."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "stablelm"
LAYERS = ["kernels", "io", "layers", "models", "generation", "training", "serving"]  # lowest first
ALLOWED = {
    ("models/model.py", "generation"),  # model.generate(): transformers' API, imported when called
    ("kernels/__main__.py", "layers"),  # `python -m stablelm.kernels`: an entry point, like cli.py
}


def test_no_module_imports_a_higher_layer():
    rank = {name: i for i, name in enumerate(LAYERS)}
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        mine = relative.parts[0] if len(relative.parts) > 1 else None
        if mine not in rank:
            continue  # the top: auto, pipeline, cli, bench
        in_type_checking = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("if TYPE_CHECKING"):
                in_type_checking = True  # names for annotations only
                continue
            if in_type_checking and line and not line[0].isspace():
                in_type_checking = False
            match = re.match(r"\s*from \.\.(\w*)(?:\.\w+)* import (\w+)", line)
            if not match or in_type_checking:
                continue
            target = match.group(1) or match.group(2)  # `from ..x import` or `from .. import x`
            if target in rank and rank[target] > rank[mine] and (relative.as_posix(), target) not in ALLOWED:
                found.append(f"{relative}:{number}: {line.strip()}")
            if target in ("auto", "pipeline", "cli", "bench") and mine not in ("training", "serving"):
                found.append(f"{relative}:{number}: {line.strip()}")  # the top, whose Auto classes they use
    assert not found, "imports up the layers:\n" + "\n".join(found)
