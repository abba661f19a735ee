"""Copies result tables into the READMEs and the docs pages, so their figures come from runs, never typed by hand.

    python benchmarks/readme_tables.py          # rewrite README.md and benchmarks/README.md
    python benchmarks/readme_tables.py --check  # exit 1 if a README is out of date

Between `<!-- include: <path> -->` and `<!-- end include -->` (path relative to the repository
root) the README holds exactly that file's text, as the benchmark or sweep wrote it.
"""

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = ("README.md", os.path.join("benchmarks", "README.md")) + tuple(
    sorted(
        os.path.relpath(p, ROOT)
        for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
        if "assets" not in os.path.relpath(p, ROOT).split(os.sep)
    )
)
BLOCK = re.compile(r"(<!-- include: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)


def render(text: str) -> str:
    def fill(match):
        with open(os.path.join(ROOT, match["path"])) as f:
            body = f.read().rstrip("\n") + "\n"
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(fill, text)


def main(argv) -> int:
    stale = []
    for name in READMES:
        path = os.path.join(ROOT, name)
        with open(path) as f:
            text = f.read()
        new = render(text)
        if new != text:
            stale.append(name)
            if "--check" not in argv:
                with open(path, "w") as f:
                    f.write(new)
    if stale:
        print(("out of date: " if "--check" in argv else "updated: ") + ", ".join(stale))
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
