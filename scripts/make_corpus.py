#!/usr/bin/env python3
"""Build the pf2lora fortune corpus from Debian's fortune databases.

    python3 scripts/make_corpus.py [--out data/corpus] [--seed 0] [--no-install]

1. Installs the Debian fortune packages listed in PACKAGES if they are missing
   (apt-get update once, then apt-get install -y; as root or through sudo).
2. Reads every `%`-separated fortune file under FORTUNE_DIR (regular files only: the
   `.u8` and other symlinks are aliases, `.dat` files are strfile indexes), skipping the
   offensive `off/` folders and the ASCII-art files (see EXCLUDED).
3. Decodes (UTF-8, else CP1252/Latin-1 per entry), repairs doubly-encoded UTF-8 and
   terminal overstrike (`_^Hx`), drops control characters, NFC-normalises and trims
   whitespace lightly (trailing spaces, blank lines at the ends, runs of blank lines).
4. Splits every entry into train/valid/test (80/10/10) by a hash of its normalised
   text and the seed, never by position: the same text lands in the same split in
   every file, so a duplicate of a client's test entry can never leak into the
   pretraining train split. The translated debian-hints are keyed by hint number,
   so the translations of one hint all share its split.
5. Writes, atomically (temp folder + rename; a half-written output is replaced):
     <out>/clients/<client-id>/{train,valid,test}.jsonl   one {"text": ...} per line
     <out>/pretrain/{train,valid,test}.jsonl
     <out>/stats.json
   and prints a Markdown table of the clients.

Pretrain mix: the train split of every category (client and non-client), deduplicated;
its valid/test come from non-client categories only, minus any text that is in a
client's valid or test split. Nothing of any client's valid/test split is in pretrain.

Deterministic: same packages and seed -> byte-identical output (see stats.json "sha256").
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata

FORTUNE_DIR = "/usr/share/games/fortunes"

# Debian packages providing the texts (all checked to exist in Debian 12 bookworm).
# Not used: fortunes-off/es-off/it-off (offensive), fortunes-eo*/ru/bg/zh/pl/cs/ga (other
# scripts/languages that would only dilute a 4096-token vocabulary and a small model).
PACKAGES = [
    "fortunes", "fortunes-min", "fortunes-de", "fortunes-es", "fortunes-it",
    "fortunes-br", "fortunes-bofh-excuses", "fortunes-debian-hints",
    "fortunes-mario", "fortune-anarchism",
]

# Categories (path relative to FORTUNE_DIR) left out entirely: pictures, not language.
EXCLUDED = {"ascii-art", "de/asciiart", "mario.arteascii", "it/banner"}
EXCLUDED_DIRS = {"off"}  # offensive sections (es/off from fortunes-es)

# client id -> (language, description, list of categories or a predicate on category)
def _lang_dir(lang):
    return lambda cat: cat.startswith(lang + "/")

CLIENTS = [
    ("science", "en", "science and mathematics jokes and quotes", ["science"]),
    ("computers", "en", "computing jokes, hacker lore, quotes", ["computers"]),
    ("songs-poems", "en", "verse: poems and song lyrics", ["songs-poems"]),
    ("law", "en", "laws (Murphy-style) and legal humour", ["law"]),
    ("definitions", "en", "dictionary-style definitions (Devil's Dictionary, ...)", ["definitions"]),
    ("bofh-excuses", "en", "formulaic one-line BOFH excuses", ["bofh-excuses"]),
    ("debian", "en", "Debian hints and Debian developer quotes", ["debian-hints", "debian"]),
    ("german", "de", "all German files (quotes, jokes, recipes, computing, ...)", _lang_dir("de")),
    ("spanish", "es", "all Spanish files (proverbs, quotes, ...)", _lang_dir("es")),
    ("italian", "it", "all Italian files (quotes, laws, computing, ...)", _lang_dir("it")),
    ("portuguese", "pt", "Brazilian Portuguese: fortunes-br and fortunes-mario",
     lambda cat: cat == "brasil" or cat.startswith("mario.") or cat.startswith("pt/")),
]

SPLITS = ("train", "valid", "test")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- install

def installed(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                       capture_output=True, text=True)
    return r.returncode == 0 and "install ok installed" in r.stdout


def ensure_packages():
    missing = [p for p in PACKAGES if not installed(p)]
    if not missing:
        log(f"packages: all {len(PACKAGES)} installed")
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"packages: installing {' '.join(missing)}")
    r = subprocess.run(sudo + ["apt-get", "install", "-y", "-q"] + missing, env=env)
    if r.returncode != 0:  # package lists may be missing or stale: update once, retry
        subprocess.run(sudo + ["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-q"] + missing, env=env,
                       check=True)


def package_versions():
    out = {}
    for p in PACKAGES:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", p],
                           capture_output=True, text=True)
        out[p] = r.stdout.strip() if r.returncode == 0 else None
    return out


# ----------------------------------------------------------------------------- read/clean

def list_categories(root):
    cats = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for f in sorted(filenames):
            p = os.path.join(dirpath, f)
            if f.endswith(".dat") or os.path.islink(p) or not os.path.isfile(p):
                continue
            rel = os.path.relpath(p, root)
            cat = re.sub(r"\.fortunes$", "", rel)
            if cat in EXCLUDED:
                continue
            cats.append((cat, p))
    return sorted(cats)


_MOJIBAKE = re.compile(r"[\u0080-\u00ff\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192"
                       r"\u02c6\u02dc\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030"
                       r"\u2039\u203a\u20ac\u2122]{2,}")


def _undo_double_utf8(s):
    """Repair UTF-8 that was decoded as Latin-1/CP1252 and re-encoded (maybe several times)."""
    def fix(m):
        t = m.group(0)
        for _ in range(4):
            try:
                b = t.encode("cp1252")
            except UnicodeEncodeError:
                try:
                    b = t.encode("latin-1")
                except UnicodeEncodeError:
                    break
            try:
                u = b.decode("utf-8")
            except UnicodeDecodeError:
                break
            if u == t:
                break
            t = u
        return t
    prev = None
    while prev != s:
        prev, s = s, _MOJIBAKE.sub(fix, s)
    return s


def _overstrike(line):
    """Render terminal overstrike: `____^H^H^H^Hword` (underline) -> `word`, `_^Hx` -> `x`."""
    if "\b" not in line:
        return line
    buf, pos = [], 0
    for ch in line:
        if ch == "\b":
            pos = max(0, pos - 1)
            continue
        if pos < len(buf):
            old = buf[pos]
            if ch in "_ " or (not ch.isalnum() and old.isalnum()):
                pass  # keep the letter under an underline / accent mark
            else:
                buf[pos] = ch
        else:
            buf.append(ch)
        pos += 1
    return "".join(buf)


_C1 = re.compile(r"[\u0080-\u009f]")
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(text):
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _undo_double_utf8(text)
    # lone C1 controls are CP1252 punctuation read as Latin-1 (e.g. \x92 -> ')
    text = _C1.sub(lambda m: bytes([ord(m.group(0))]).decode("cp1252", "ignore"), text)
    text = "\n".join(_overstrike(l) for l in text.split("\n"))
    text = _CTRL.sub("", text)
    text = unicodedata.normalize("NFC", text)
    lines = [l.rstrip() for l in text.split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text


def decode(raw):
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    # mixed/legacy file: decode entry by entry
    parts, enc = [], "utf-8"
    for chunk in re.split(rb"(\n%[ \t]*\n)", raw):
        try:
            parts.append(chunk.decode("utf-8"))
        except UnicodeDecodeError:
            parts.append(chunk.decode("cp1252", errors="replace").replace("\ufffd", ""))
            enc = "utf-8+cp1252"
    return "".join(parts), enc


def read_entries(path):
    raw = open(path, "rb").read()
    text, enc = decode(raw)
    entries, cur = [], []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.rstrip() == "%":
            entries.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    entries.append("\n".join(cur))
    out = [clean(e) for e in entries]
    return [e for e in out if len(e) >= 2], enc


def norm_key(cat, text):
    if cat.endswith("debian-hints"):  # translations of one hint share its split
        m = re.search(r"\d+", text)
        if m:
            return f"debian-hint-{int(m.group(0))}"
    return " ".join(text.lower().split())


def split_of(key, seed):
    h = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    v = int.from_bytes(h[:8], "big") % 100
    return "train" if v < 80 else ("valid" if v < 90 else "test")


def order_key(key, seed):
    return hashlib.sha256(f"order\x00{seed}\x00{key}".encode("utf-8")).hexdigest()


def language_of(cat):
    top = cat.split("/")[0] if "/" in cat else None
    if top:
        return top
    if cat == "brasil" or cat.startswith("mario."):
        return "pt"
    return "en"


# ----------------------------------------------------------------------------- main

def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def dedup_sorted(items, seed):
    """items: (key, text) -> unique by key (first text wins after sorting), hash-ordered."""
    seen = {}
    for key, text in sorted(items, key=lambda kt: (order_key(kt[0], seed), kt[1])):
        seen.setdefault(key, text)
    return list(seen.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fortune-dir", default=FORTUNE_DIR)
    ap.add_argument("--no-install", action="store_true", help="do not call apt-get")
    args = ap.parse_args()
    t0 = time.time()

    if not args.no_install:
        ensure_packages()
    if not os.path.isdir(args.fortune_dir):
        sys.exit(f"error: {args.fortune_dir} not found (install the fortune packages)")

    cats = list_categories(args.fortune_dir)
    log(f"reading {len(cats)} fortune files under {args.fortune_dir}")

    # category -> list of (key, text, split)
    data, encodings = {}, {}
    for cat, path in cats:
        entries, enc = read_entries(path)
        encodings[cat] = enc
        data[cat] = [(norm_key(cat, e), e) for e in entries]

    # assign categories to clients
    owner = {}
    for cid, lang, desc, sel in CLIENTS:
        assert re.fullmatch(r"[a-z0-9-]+", cid), cid
        chosen = [c for c in data if (c in sel if isinstance(sel, list) else sel(c))]
        if not chosen:
            sys.exit(f"error: client {cid} has no source files")
        for c in chosen:
            if c in owner:
                sys.exit(f"error: category {c} in clients {owner[c]} and {cid}")
            owner[c] = cid

    seed = args.seed
    clients_out = {}
    held_out_keys = set()  # every key in some client's valid or test split
    for cid, lang, desc, sel in CLIENTS:
        srcs = sorted(c for c, o in owner.items() if o == cid)
        items = dedup_sorted([kt for c in srcs for kt in data[c]], seed)
        per = {s: [] for s in SPLITS}
        for key, text in items:
            per[split_of(key, seed)].append((key, text))
        for s in ("valid", "test"):
            held_out_keys.update(k for k, _ in per[s])
        clients_out[cid] = dict(lang=lang, desc=desc, sources=srcs, splits=per)

    pre = {s: [] for s in SPLITS}
    for cat, items in data.items():
        for key, text in items:
            s = split_of(key, seed)
            if s == "train" or cat not in owner:
                pre[s].append((key, text))
    pre = {s: dedup_sorted(v, seed) for s, v in pre.items()}
    for s in ("valid", "test"):
        pre[s] = [kt for kt in pre[s] if kt[0] not in held_out_keys]
    leak = sum(1 for k, _ in pre["train"] if k in held_out_keys)
    assert leak == 0, f"{leak} client valid/test entries in pretrain train"

    # ---- write into a temp folder next to the output, then swap it in
    out = os.path.abspath(args.out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(out)
    for stale in os.listdir(parent):  # leftovers of an interrupted run
        if stale.startswith(f".{base}.tmp-"):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)

    stats = {"seed": seed, "split_rule": "sha256(seed, normalised text) % 100: "
             "<80 train, <90 valid, else test", "packages": package_versions(),
             "excluded": sorted(EXCLUDED) + [f"*/{d}/*" for d in sorted(EXCLUDED_DIRS)],
             "clients": {}, "pretrain": {}, "categories": {}}
    for cid, c in clients_out.items():
        d = os.path.join(tmp, "clients", cid)
        os.makedirs(d)
        st = {"language": c["lang"], "description": c["desc"], "sources": c["sources"]}
        for s in SPLITS:
            texts = [t for _, t in c["splits"][s]]
            write_jsonl(os.path.join(d, f"{s}.jsonl"), texts)
            st[s] = {"entries": len(texts), "chars": sum(len(t) for t in texts)}
        stats["clients"][cid] = st
    d = os.path.join(tmp, "pretrain")
    os.makedirs(d)
    for s in SPLITS:
        texts = [t for _, t in pre[s]]
        write_jsonl(os.path.join(d, f"{s}.jsonl"), texts)
        stats["pretrain"][s] = {"entries": len(texts), "chars": sum(len(t) for t in texts)}
    for cat, items in sorted(data.items()):
        stats["categories"][cat] = {"entries": len(items),
                                    "chars": sum(len(t) for _, t in items),
                                    "language": language_of(cat),
                                    "client": owner.get(cat), "encoding": encodings[cat]}

    # content hash of every jsonl file (stats.json itself excluded)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(tmp)):
        dirnames.sort()
        for f in sorted(filenames):
            p = os.path.join(dirpath, f)
            h.update(os.path.relpath(p, tmp).encode() + b"\0")
            h.update(open(p, "rb").read())
    stats["sha256"] = h.hexdigest()
    with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, ensure_ascii=False, indent=1, sort_keys=True)
        f.write("\n")

    if os.path.lexists(out):
        old = tempfile.mkdtemp(prefix=f".{base}.tmp-old-", dir=parent)
        os.rename(out, os.path.join(old, base))
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)

    # ---- report
    print("| client | source files | language | train | valid | test | characters |")
    print("|---|---|---|---:|---:|---:|---:|")
    tot = [0, 0, 0, 0]
    for cid, st in stats["clients"].items():
        srcs = st["sources"]
        src = ", ".join(srcs) if len(srcs) <= 3 else f"{len(srcs)} files ({srcs[0]}, ...)"
        chars = sum(st[s]["chars"] for s in SPLITS)
        n = [st[s]["entries"] for s in SPLITS]
        print(f"| {cid} | {src} | {st['language']} | {n[0]} | {n[1]} | {n[2]} | {chars:,} |")
        for i, v in enumerate(n + [chars]):
            tot[i] += v
    print(f"| **all clients** | | | {tot[0]} | {tot[1]} | {tot[2]} | {tot[3]:,} |")
    p = stats["pretrain"]
    print(f"| *pretrain mix* | all {len(data)} files | mixed | {p['train']['entries']} "
          f"| {p['valid']['entries']} | {p['test']['entries']} "
          f"| {sum(p[s]['chars'] for s in SPLITS):,} |")
    print()
    print(f"output: {args.out}  sha256: {stats['sha256']}  ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
