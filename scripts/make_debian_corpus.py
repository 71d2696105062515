#!/usr/bin/env python3
"""Build the data-to-text federation from Debian's package index (issue 13, DESIGN §9).

    apt-get update -o Acquire::Languages=en        # once, as root: fetches Translation-en beside Packages
    python3 scripts/make_debian_corpus.py [--out data/debian] [--lists /var/lib/apt/lists]

The task, like E2E / WebNLG: input = a package's structured fields (name, section, short description,
up to 4 dependencies), target = its long description. Clients are archive sections (CLIENTS below:
13 sections of different styles and sizes). Every example is one text

    Package: python3-foo
    Section: python
    Summary: <short description>
    Depends: python3, python3-bar
    Description:
    <long description, paragraphs separated by blank lines>

written to <out>/clients/<section>/{train,valid,test}.jsonl as {"text", "input", "target", "package"}:
`input` is the text up to and including "Description:\\n" (the prompt of greedy decoding), `target` the
rest. `pf2lora federate` trains the language model on the whole text; scripts/nlg_eval.py decodes
`target` from `input`.

Splits (80/10/10) are fixed by a hash of the **source** package's name (the `Source:` field, else the
package's own name): the binary packages of one source (foo, foo-doc, python3-foo) usually share their
long description, and keying by source keeps such near-copies out of different splits. Within a
client, packages whose long description is identical to one already kept are dropped (the one with
the smallest name stays).

Pretraining data for a base that has never seen the clients: <out>/pretrain/{train,valid,test}.jsonl
holds the same texts of every section that is NOT a client (their own splits), so no client text of
any split is in it.

Reads the index files apt keeps in --lists (any compression apt uses; decompressed with
`/usr/lib/apt/apt-helper cat-file`): every `*_binary-amd64_Packages*` and every
`*_i18n_Translation-en*`. Writes atomically (temp folder, then rename). The text stays out of git
(data/ is ignored). Deterministic: the same index files give byte-identical output (stats.json sha256).
"""
import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

# Clients: archive sections with distinct styles (bindings, crates, Go libraries, games, fonts, ...) and
# natural non-IID sizes (about 300 to 2,600 kept packages).
CLIENTS = ["python", "perl", "rust", "golang", "haskell", "javascript", "games", "science",
           "doc", "fonts", "sound", "net", "admin"]
MIN_PER_SPLIT = {"train": 100, "valid": 10, "test": 10}
MAX_DEPENDS = 4
FETCH = "apt-get update -o Acquire::Languages=en   (as root)"


def die(msg):
    print(f"make_debian_corpus: {msg}", file=sys.stderr)
    sys.exit(1)


def read_index(path):
    helper = "/usr/lib/apt/apt-helper"
    if path.endswith((".lz4", ".xz", ".gz", ".bz2", ".zst", ".lzma")):
        if not os.path.exists(helper):
            die(f"{path} is compressed and {helper} (package apt) is missing to decompress it")
        r = subprocess.run([helper, "cat-file", path], capture_output=True)
        if r.returncode != 0:
            die(f"could not decompress {path}: {r.stderr.decode(errors='replace').strip()}")
        data = r.stdout
    else:
        with open(path, "rb") as f:
            data = f.read()
    return data.decode("utf-8", errors="replace")


def stanzas(text):
    """Deb822 paragraphs as dicts; continuation lines kept (with their leading space) in the value."""
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.split("\n"):
            if not line:
                continue
            if line[0] in " \t" and key is not None:
                fields[key] += "\n" + line
            else:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def long_description(value):
    """Debian's extended description (continuation lines) as plain paragraphs."""
    lines = value.split("\n")[1:]            # line 0 is the short description
    out = []
    for line in lines:
        line = line[1:] if line.startswith(" ") else line
        out.append("" if line.strip() == "." else line.rstrip())
    text = "\n".join(out).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


def split_of(key, seed):
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 80 else "valid" if h < 90 else "test"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/debian")
    ap.add_argument("--lists", default="/var/lib/apt/lists")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated archive sections")
    args = ap.parse_args()
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]

    pkg_files = sorted(glob.glob(os.path.join(args.lists, "*_binary-amd64_Packages*")))
    tr_files = sorted(glob.glob(os.path.join(args.lists, "*_i18n_Translation-en*")))
    pkg_files = [p for p in pkg_files if not p.endswith(".diff_Index")]
    if not pkg_files:
        die(f"no Packages index (*_binary-amd64_Packages*) in {args.lists}; fetch it with: {FETCH}")
    if not tr_files:
        die(f"no Translation-en index (*_i18n_Translation-en*) in {args.lists}: the long descriptions are "
            f"missing; fetch them with: {FETCH}")

    # Long descriptions by (package, md5) and by package.
    by_md5, by_name = {}, {}
    for path in tr_files:
        for st in stanzas(read_index(path)):
            name, md5, desc = st.get("Package"), st.get("Description-md5"), st.get("Description-en")
            if not name or desc is None:
                continue
            by_md5[(name, md5)] = desc
            by_name.setdefault(name, desc)

    packages = {}
    for path in pkg_files:   # later files (security, updates) replace earlier entries of the same name
        for st in stanzas(read_index(path)):
            name = st.get("Package")
            if name:
                packages[name] = st
    examples = []
    missing_desc = 0
    for name in sorted(packages):
        st = packages[name]
        section = st.get("Section", "").split("/")[-1]
        short = st.get("Description", "").split("\n")[0].strip()
        desc = by_md5.get((name, st.get("Description-md5"))) or by_name.get(name)
        if desc is None:
            missing_desc += 1
            continue
        target = long_description(desc)
        if not short or len(target) < 20:
            continue
        deps = []
        for alt in st.get("Depends", "").replace("\n", " ").split(","):
            d = alt.split("|")[0].strip().split(" ")[0].split(":")[0]
            if d and d not in deps:
                deps.append(d)
        source = st.get("Source", name).split(" ")[0]
        lines = [f"Package: {name}", f"Section: {section}", f"Summary: {short}"]
        if deps:
            lines.append("Depends: " + ", ".join(deps[:MAX_DEPENDS]))
        inp = "\n".join(lines) + "\nDescription:\n"
        examples.append({"package": name, "section": section, "source": source,
                         "split": split_of(source, args.seed), "input": inp, "target": target})
    if not examples:
        die(f"no package in {args.lists} has a long description; fetch Translation-en with: {FETCH}")

    sections = {}
    for e in examples:
        sections.setdefault(e["section"], []).append(e)
    for c in clients:
        if c not in sections:
            die(f"section '{c}' has no packages in the index files of {args.lists}; choose clients from: "
                + ", ".join(sorted(sections, key=lambda s: -len(sections[s]))[:40]))

    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".debian-", dir=parent)
    stats = {"clients": {}, "seed": args.seed, "index_files": [os.path.basename(p) for p in pkg_files + tr_files],
             "packages": len(packages), "without_long_description": missing_desc}
    digest = hashlib.sha256()
    try:
        for c in clients:
            seen, kept = set(), {"train": [], "valid": [], "test": []}
            for e in sorted(sections[c], key=lambda e: e["package"]):
                if e["target"] in seen:
                    continue
                seen.add(e["target"])
                kept[e["split"]].append(e)
            for s, need in MIN_PER_SPLIT.items():
                if len(kept[s]) < need:
                    die(f"section '{c}' has only {len(kept[s])} {s} packages (at least {need} needed); "
                        f"drop it from --clients or use a fuller index ({FETCH})")
            os.makedirs(os.path.join(tmp, "clients", c))
            for s, rows in kept.items():
                with open(os.path.join(tmp, "clients", c, f"{s}.jsonl"), "w", encoding="utf-8") as f:
                    for e in rows:
                        line = json.dumps({"text": e["input"] + e["target"], "input": e["input"], "target": e["target"],
                                           "package": e["package"]}, ensure_ascii=False)
                        f.write(line + "\n")
                        digest.update(line.encode())
            stats["clients"][c] = {s: len(v) for s, v in kept.items()} | {
                "mean_target_chars": round(sum(len(e["target"]) for v in kept.values() for e in v) / sum(len(v) for v in kept.values()), 1)}
        os.makedirs(os.path.join(tmp, "pretrain"))
        n_pre = {"train": 0, "valid": 0, "test": 0}
        files = {s: open(os.path.join(tmp, "pretrain", f"{s}.jsonl"), "w", encoding="utf-8") for s in n_pre}
        for e in examples:
            if e["section"] in clients:
                continue
            line = json.dumps({"text": e["input"] + e["target"]}, ensure_ascii=False)
            files[e["split"]].write(line + "\n")
            digest.update(line.encode())
            n_pre[e["split"]] += 1
        for f in files.values():
            f.close()
        stats["pretrain"] = n_pre
        stats["sha256"] = digest.hexdigest()
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump(stats, f, indent=1, sort_keys=True)
        if os.path.exists(args.out):
            shutil.rmtree(args.out)
        os.rename(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print("| client | train | valid | test | mean target chars |")
    print("|---|---:|---:|---:|---:|")
    for c, v in stats["clients"].items():
        print(f"| {c} | {v['train']} | {v['valid']} | {v['test']} | {v['mean_target_chars']} |")
    print(f"pretrain (non-client sections): {n_pre}; packages without a long description: {missing_desc}", file=sys.stderr)


if __name__ == "__main__":
    main()
