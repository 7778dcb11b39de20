"""Build a PEP 503 'simple' index in a folder from the wheels in it (CI's stand-in for an index it cannot reach).

usage: python local_index.py FOLDER   (FOLDER holds the wheels; FOLDER/simple/<project>/index.html is written)
"""

import re
import sys
from pathlib import Path

root = Path(sys.argv[1]).resolve()
projects: dict[str, list[Path]] = {}
for wheel in sorted(root.glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    projects.setdefault(name, []).append(wheel)
for name, wheels in projects.items():
    page = root / "simple" / name
    page.mkdir(parents=True, exist_ok=True)
    links = "\n".join(f'<a href="{w.as_uri()}">{w.name}</a><br>' for w in wheels)
    (page / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}\n</body></html>\n")
print(f"{len(projects)} projects indexed in {root / 'simple'}")
