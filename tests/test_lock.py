"""The dependency lock (requirements/py<X.Y>-<set>.txt) against pyproject.toml, the installed
environment and the training code.

The lock pins the application; pyproject.toml keeps ranges for library users. These tests make
sure the two cannot drift apart: a stale lock, a pin outside pyproject's range, a dependency the
lock forgot, jax / jaxlib / libtpu out of step, or training code that needs a test-only package
all fail here.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
import tomllib

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location("polyformer_lock",
                                               os.path.join(REPO_ROOT, "requirements", "lock.py"))
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)

PYPROJECT = tomllib.load(open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb"))["project"]
LOCKS = [(py, name) for py in lock.PYTHONS for name in lock.SETS]
HERE_PY = "%d.%d" % sys.version_info[:2]


def pins(python: str, name: str) -> dict[str, Version]:
    """{canonical name: version} of one lock file; every line is an exact `==` pin."""
    out = {}
    with open(lock.lock_file(python, name)) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==" and not req.marker, f"not an exact pin: {line!r}"
            out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def marker_env(python: str, extra: str = "") -> dict[str, str]:
    """The environment a lock is resolved for: CPython `python` on Linux x86-64."""
    env = dict(default_environment())
    env.update(python_version=python, python_full_version=f"{python}.0", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix",
               implementation_name="cpython", platform_python_implementation="CPython",
               extra=extra)
    return env


def applies(req: Requirement, python: str, extra: str = "") -> bool:
    return req.marker is None or req.marker.evaluate(marker_env(python, extra))


def roots(name: str) -> list[Requirement]:
    """What a set is resolved from: pyproject's dependencies (+ its extras, polyformer[x]
    self-references expanded) and requirements/build.in."""
    reqs = [Requirement(r) for r in PYPROJECT["dependencies"]]
    todo, seen = list(lock.SETS[name]["extras"]), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, PYPROJECT["optional-dependencies"][extra]):
            if canonicalize_name(r.name) == "polyformer":
                todo += sorted(r.extras)
            else:
                reqs.append(r)
    with open(lock.BUILD_IN) as f:
        reqs += [Requirement(ln) for ln in map(str.strip, f) if ln and not ln.startswith("#")]
    return reqs


def test_every_lock_file_exists_and_matches_pyproject():
    """A changed dependency table in pyproject.toml (or build.in) without `make lock` fails here."""
    digest = lock.inputs_digest()
    for python, name in LOCKS:
        path = lock.lock_file(python, name)
        assert os.path.exists(path), f"{path} is missing: run `make lock`"
        head = lock.read_header(path)
        assert (head["python"], head["set"]) == (python, name), (path, head)
        glibc = "%d_%d" % lock.SETS[name]["glibc"]
        assert head["platform"] == f"x86_64-manylinux_{glibc}", (path, head)
        assert head["digest"] == digest, (
            f"{os.path.relpath(path, REPO_ROOT)} was made from other requirements than "
            f"pyproject.toml / requirements/build.in now hold: run `make lock` and commit the "
            f"result once `make test` passes on it")


@pytest.mark.parametrize("python,name", LOCKS)
def test_lock_satisfies_pyproject(python, name):
    """Every requirement pyproject.toml states for the set is pinned, inside its range."""
    pinned = pins(python, name)
    for extra in ("",) + lock.SETS[name]["extras"]:
        for req in roots(name):
            if not applies(req, python, extra):
                continue
            key = canonicalize_name(req.name)
            assert key in pinned, f"{req} (pyproject) is not in the py{python}-{name} lock"
            assert req.specifier.contains(pinned[key], prereleases=True), (
                f"the py{python}-{name} lock pins {req.name}=={pinned[key]}, outside "
                f"pyproject's {req}")


@pytest.mark.parametrize("python", lock.PYTHONS)
def test_train_lock_is_part_of_the_test_lock(python):
    """`make test` adds to a `make train` venv without changing what training runs on; and the
    training set carries none of the test tools."""
    train, test = pins(python, "train"), pins(python, "test")
    for key, version in train.items():
        assert test.get(key) == version, (key, version, test.get(key))
    for test_only in ("pytest", "pytest-xdist", "libtpu", "nbclient", "matplotlib",
                      "kaldi-native-fbank", "ipykernel"):
        assert test_only in test and test_only not in train, test_only


@pytest.mark.parametrize("python", lock.PYTHONS)
def test_jax_jaxlib_libtpu_move_together(python):
    """jaxlib is jax's own version; the tpu / tpu-aot / gpu extras pin the locked jax and the
    libtpu that jax release names in its `tpu` extra."""
    test = pins(python, "test")
    jax = test["jax"]
    assert test["jaxlib"] == jax, f"jaxlib {test['jaxlib']} with jax {jax}"
    for extra in ("tpu", "tpu-aot", "gpu"):
        reqs = [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]]
        jax_reqs = [r for r in reqs if r.name == "jax"]
        assert jax_reqs, f"the {extra} extra must pin jax (jax, jaxlib and libtpu move together)"
        for r in jax_reqs:
            assert str(r.specifier) == f"=={jax}", f"extra {extra}: {r} but the lock has jax {jax}"
        for r in reqs:
            if r.name == "libtpu":
                assert r.specifier.contains(test["libtpu"]), (extra, str(r), test["libtpu"])
    # what the locked jax release itself requires of libtpu (its METADATA, installed here)
    if md.version("jax") == str(jax):
        wanted = [Requirement(r) for r in md.requires("jax") or []
                  if r.startswith("libtpu") and applies(Requirement(r), python, "tpu")]
        assert wanted, "the installed jax names no libtpu in its tpu extra"
        for r in wanted:
            assert r.specifier.contains(test["libtpu"]), (
                f"jax {jax} requires {r}; the lock pins libtpu {test['libtpu']}")


def _installed_from_lock():
    if HERE_PY not in lock.PYTHONS:
        pytest.skip(f"Python {HERE_PY} has no lock (installed with LOCK=0)")
    if os.path.exists(os.path.join(sys.prefix, ".unlocked")):
        pytest.skip("this venv was installed with LOCK=0 (unsupported; not from the lock)")


def test_lock_is_closed_under_dependencies():
    """Walks the installed distributions' own requirements from the roots: every one reached is
    pinned (a forgotten transitive dependency would float) and installed at its pin; every pin
    is reached (no stray pins)."""
    _installed_from_lock()
    pinned = pins(HERE_PY, "test")
    reached: set[tuple[str, str]] = set()  # (distribution, extra asked of it)
    # (requirement, the extra under which its marker holds); pyproject's own extras are expanded
    # in roots(), so no `extra` markers there
    todo = [(r, "") for r in roots("test")]
    while todo:
        req, extra = todo.pop()
        if not applies(req, HERE_PY, extra):
            continue
        key = canonicalize_name(req.name)
        assert key in pinned, f"{req} (needed by the environment) is not pinned in the lock"
        installed = Version(md.version(req.name))
        assert installed == pinned[key], f"{req.name} installed {installed}, locked {pinned[key]}"
        for want in sorted(req.extras | {""}):
            if (key, want) not in reached:
                reached.add((key, want))
                todo += [(sub, want) for sub in map(Requirement, md.requires(req.name) or [])]
    stray = set(pinned) - {k for k, _ in reached}
    assert not stray, f"pinned but needed by nothing: {sorted(stray)}"


def test_training_needs_no_test_only_package(tmp_path):
    """`make train` installs the train set only: every project module imports, and the tiny LM
    trains, with every package of the test set that is not in the train set made unimportable."""
    _installed_from_lock()
    test_only = set(pins(HERE_PY, "test")) - set(pins(HERE_PY, "train"))
    blocked = sorted(mod for mod, dists in md.packages_distributions().items()
                     if dists and all(canonicalize_name(d) in test_only for d in dists)
                     and mod.isidentifier())
    assert "pytest" in blocked and "libtpu" in blocked, blocked
    script = f"""
import importlib, importlib.util, pkgutil, runpy, sys
BLOCKED = set({blocked!r})
class Hide:  # every finder, blind to the blocked packages: as if they were not installed
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
assert importlib.util.find_spec("pytest") is None
for pkg in ("attention", "pallas_kernels", "models", "trainer", "configs"):
    for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
sys.argv = ["trainer.main", "--config=configs/lm.py:tiny", "--workdir={tmp_path / 'run'}",
            "--config.train.steps=2", "--config.model.num_layers=1", "--config.data.seq_len=32",
            "--config.eval.every=0", "--config.eval.batches=1", "--config.sample.max_new_tokens=4"]
runpy.run_module("trainer.main", run_name="__main__")
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]


def test_uncovered_python_or_platform_gets_a_clear_error():
    ok = ("glibc", "2.36")
    assert lock.unsupported("3.12", "Linux", "x86_64", ok) is None
    assert lock.glibc_short("test", ok) is None and lock.glibc_short("train", ("glibc", "2.28")) is None
    for why in (lock.unsupported("3.14", "Linux", "x86_64", ok),
                lock.unsupported("3.12", "Darwin", "arm64", ("", "")),
                lock.unsupported("3.12", "Linux", "aarch64", ok),
                lock.unsupported("3.12", "Linux", "x86_64", ("", ""))):
        assert why and why.startswith("error: no locked dependencies"), why
        assert "3.12, 3.13" in why and "Linux x86_64" in why and "LOCK=0" in why, why
    why = lock.glibc_short("test", ("glibc", "2.28"))
    assert why and "2.28" in why and "2.31" in why and "LOCK=0" in why, why
    p = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "requirements", "lock.py"),
                        "path", "nosuch"], capture_output=True, text=True)
    assert p.returncode == 2 and "sets: test, train" in p.stderr, p.stderr


def test_make_train_installs_the_train_set_and_test_adds_to_it():
    """The Makefile's targets, as make reads them (dry run, no venv touched)."""
    def dry(target):
        p = subprocess.run(["make", "-n", target, "VENV=/nonexistent-venv"], cwd=REPO_ROOT,
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return p.stdout
    train, test = dry("train"), dry("test")
    assert "lock.py path train" in train and "lock.py path test" not in train, train
    assert "lock.py path test" in test and "/nonexistent-venv/bin/python -m venv" not in test
    assert "-m venv /nonexistent-venv" in test  # the same single venv, created only if missing
