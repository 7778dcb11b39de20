"""Print the shell lines of the README's ```bash blocks in one section, exactly as written (CI runs them)."""

import re
import sys
from pathlib import Path

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
name = sys.argv[1]
start = text.index(f"\n## {name}\n")
end = text.find("\n## ", start + 1)
body = text[start:end if end > 0 else None]
blocks = re.findall(r"```bash\n(.*?)```", body, re.S)
if not blocks:
    sys.exit(f"README section {name!r} has no bash block")
for block in blocks:
    for line in block.strip().splitlines():
        if line.strip():
            print(line)
