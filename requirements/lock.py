"""The dependency lock: which files exist, what they cover, how they are made.

The application (every Makefile target and CI) installs exact versions from
``requirements/py<X.Y>-<set>.txt``; ``pyproject.toml`` keeps ranges for library users.

    python requirements/lock.py compile     # `make lock`: regenerate every lock file with uv
    python requirements/lock.py path SET    # the lock for this Python and machine, or a clear error

Sets: ``train`` (the base dependencies: what `make train` needs) and ``test`` (plus the test,
notebook and TPU-compiler extras: what `make test` adds to the same venv). The test lock is
resolved first and the train lock is constrained by it, so both pin the same versions and
`make test` upgrades a `make train` venv in place.

This file runs under whatever Python the Makefile found (before any venv exists): standard
library only.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# What the lock covers. Linux x86-64 only: the platform every developer machine and CI has, and
# the one libtpu (the TPU compiler the test set needs) ships wheels for.
PYTHONS = ("3.12", "3.13")
MACHINE = "x86_64"
# The manylinux (glibc) floor each set is resolved for: libtpu's wheels need glibc 2.31; the
# training set alone installs on glibc 2.28 (e.g. RHEL 8).
SETS = {
    "test": {"extras": ("test",), "glibc": (2, 31)},
    "train": {"extras": (), "glibc": (2, 28)},
}
# Resolve test first: train is constrained by it.
ORDER = ("test", "train")
UV_VERSION = "0.13.9"  # the Makefile installs exactly this uv for `make lock`
BUILD_IN = os.path.join(HERE, "build.in")
HEADER = "# polyformer lock:"


def lock_file(python: str, name: str) -> str:
    return os.path.join(HERE, f"py{python}-{name}.txt")


def inputs_digest() -> str:
    """sha256 over what a lock is computed from: pyproject.toml's dependency tables and build.in.

    Whitespace and comments in pyproject.toml do not count; a changed requirement does.
    """
    try:
        import tomllib
    except ImportError:  # Python < 3.11: cannot check (the Makefile refuses those Pythons anyway)
        return "unknown"
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    parts = [repr(project.get("requires-python")), repr(project.get("dependencies", [])),
             repr(sorted(project.get("optional-dependencies", {}).items()))]
    with open(BUILD_IN) as f:
        parts += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def header(python: str, name: str) -> str:
    glibc = "%d_%d" % SETS[name]["glibc"]
    return (f"{HEADER} python {python}, {MACHINE}-manylinux_{glibc}, set {name}, "
            f"inputs sha256 {inputs_digest()}")


def read_header(path: str) -> dict:
    """The fields of a lock file's first line: python, platform, set, digest."""
    with open(path) as f:
        first = f.readline().strip()
    if not first.startswith(HEADER):
        raise ValueError(f"{path}: first line is not a polyformer lock header; run `make lock`")
    fields = [p.strip() for p in first[len(HEADER):].split(",")]
    python = fields[0].split()[1]
    plat = fields[1]
    name = fields[2].split()[1]
    digest = fields[3].split()[2]
    return {"python": python, "platform": plat, "set": name, "digest": digest}


def unsupported(python: str, system: str, machine: str, libc: tuple[str, str]) -> str | None:
    """Why this interpreter / machine has no lock (None when it has one)."""
    covered = ", ".join(PYTHONS)
    glibc_need = "%d.%d" % SETS["test"]["glibc"]
    what = (f"The lock covers Python {covered} on Linux {MACHINE} (glibc >= {glibc_need} for "
            f"`make test`, >= %d.%d for `make train`)." % SETS["train"]["glibc"])
    how = ("Use a covered Python (`make train PYTHON=/path/to/python3.12`), or install the "
           "unlocked ranges from pyproject.toml with `make train LOCK=0` / `make test LOCK=0` "
           "(unsupported: whatever the index serves that day, which may not resolve).")
    if python not in PYTHONS:
        return f"error: no locked dependencies for Python {python}. {what}\n       {how}"
    if system != "Linux" or machine not in (MACHINE, "AMD64"):
        return (f"error: no locked dependencies for {system} {machine}. {what}\n       {how}")
    if libc[0] != "glibc":
        return (f"error: no locked dependencies for a {libc[0] or 'non-glibc'} Linux "
                f"(musl wheels are not locked). {what}\n       {how}")
    return None


def glibc_short(name: str, libc: tuple[str, str]) -> str | None:
    """Why this glibc is too old for the set's wheels (None when it is new enough or unknown)."""
    need = SETS[name]["glibc"]
    try:
        have = tuple(int(x) for x in libc[1].split(".")[:2])
    except ValueError:
        return None  # unknown version: let pip say
    if have >= need:
        return None
    return (f"error: this machine's glibc {libc[1]} is older than the {need[0]}.{need[1]} the "
            f"`{name}` lock's wheels need (manylinux_{need[0]}_{need[1]}).\n       Install the "
            f"unlocked ranges with `make {name} LOCK=0` (unsupported).")


def cmd_path(name: str) -> int:
    if name not in SETS:
        print(f"error: unknown lock set {name!r}; sets: {', '.join(SETS)}", file=sys.stderr)
        return 2
    python = "%d.%d" % sys.version_info[:2]
    libc = platform.libc_ver()
    why = unsupported(python, platform.system(), platform.machine(), libc) or glibc_short(name, libc)
    if why:
        print(why, file=sys.stderr)
        return 1
    path = lock_file(python, name)
    if not os.path.exists(path):
        print(f"error: {os.path.relpath(path, ROOT)} is missing; run `make lock`", file=sys.stderr)
        return 1
    print(os.path.relpath(path, ROOT))
    return 0


def cmd_compile(uv: str, upgrade: bool) -> int:
    """Every lock file, with uv's resolver, for each covered Python and set."""
    for python in PYTHONS:
        for name in ORDER:
            spec = SETS[name]
            out = lock_file(python, name)
            glibc = "%d_%d" % spec["glibc"]
            cmd = [uv, "pip", "compile", "pyproject.toml", os.path.relpath(BUILD_IN, ROOT),
                   "--python-version", python, "--python-platform", f"{MACHINE}-manylinux_{glibc}",
                   "--only-binary", ":all:", "--annotation-style", "line", "--no-header",
                   "--quiet", "-o", os.path.relpath(out, ROOT)]
            for extra in spec["extras"]:
                cmd += ["--extra", extra]
            if name != "test":
                cmd += ["-c", os.path.relpath(lock_file(python, "test"), ROOT)]
            if upgrade:  # otherwise uv keeps the versions already in `out` where they still fit
                cmd += ["--upgrade"]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
            with open(out) as f:
                body = f.read()
            # uv names the constraint file as a reason; every train pin has one, so it says nothing
            body = re.sub(r"(, )?-c requirements/py[0-9.]+-test\.txt(, )?",
                          lambda m: ", " if m.group(1) and m.group(2) else "", body)
            with open(out, "w") as f:
                f.write(header(python, name) + "\n")
                f.write(f"# Generated by `make lock` (uv {UV_VERSION} pip compile); do not edit.\n")
                f.write(body)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "path":
        return cmd_path(argv[1])
    if argv and argv[0] == "compile":
        uv = os.environ.get("UV", "uv")
        return cmd_compile(uv, upgrade="--upgrade" in argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
