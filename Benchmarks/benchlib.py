"""Pieces the small benchmark scripts share: running `pf2lora bench ...` and emitting a Markdown table."""
import json
import pathlib
import subprocess


def bench_json(cmd, env=None):
    """Runs a `pf2lora bench` command and returns the JSON object on its last stdout line."""
    out = subprocess.run([str(c) for c in cmd], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def emit(lines, out=None):
    """Prints the Markdown lines and, with `out`, writes them there too."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        pathlib.Path(out).write_text(text)
