#!/usr/bin/env python3
"""Builds the reference fixtures under Tests/PF2LoRATests/Fixtures/ with the Hugging Face libraries.

Each module in Tests/FixtureScripts/fixtures/ defines `make(out: pathlib.Path)` and writes its own subfolder.
Run all:            python3 Tests/FixtureScripts/make_fixtures.py
Run some:           python3 Tests/FixtureScripts/make_fixtures.py tokenizer model
Versions are pinned in Tests/FixtureScripts/requirements-fixtures.txt; the script refuses other versions so that
committed fixtures always come from the same reference.
"""
import importlib
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = ROOT / "Tests" / "PF2LoRATests" / "Fixtures"


def check_versions():
    import importlib.metadata as md
    want = {}
    for line in (HERE / "requirements-fixtures.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==")
            want[name] = ver
    bad = []
    for name, ver in want.items():
        try:
            have = md.version(name).split("+")[0]
        except md.PackageNotFoundError:
            have = None
        if have != ver:
            bad.append(f"{name}=={ver} (have {have})")
    if bad:
        sys.exit("make_fixtures: install the pinned versions first: pip install -r Tests/FixtureScripts/requirements-fixtures.txt\n  " + "\n  ".join(bad))


def main():
    check_versions()
    sys.path.insert(0, str(HERE))
    names = sys.argv[1:] or sorted(p.stem for p in (HERE / "fixtures").glob("*.py") if not p.stem.startswith("_"))
    for name in names:
        mod = importlib.import_module(f"fixtures.{name}")
        print(f"make_fixtures: {name}", file=sys.stderr)
        mod.make(OUT)


if __name__ == "__main__":
    main()
