"""The house rules, checked from the project's import graph (issue 24's floors).

Floors, bottom to top: pallas_kernels <- attention <- the trainer's generic base (config, task
protocol + registry, data plumbing, mesh) <- models (the families) <- the trainer loop and its
tools <- configs. A floor imports only from the floors below it; the logical-sharding names
(attention/sharding.py) and the layer kit (attention/layers.py) import nothing above
attention/ops; the generic trainer never imports a family (families register their Task;
trainer.task finds them by name).

The redesign is landing in steps. Imports that still break a rule are listed in KNOWN below,
each with where it goes; the tests fail on any *new* violation, and also when a listed one is
gone (so the list only shrinks: delete the entry in the commit that fixes it).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

from conftest import REPO_ROOT

PACKAGES = ("pallas_kernels", "attention", "models", "trainer", "configs")
# the generic pieces of trainer/ a family builds on (one floor below the families)
TRAINER_BASE = ("trainer.config", "trainer.cli", "trainer.task", "trainer.data", "trainer.text",
                "trainer.tokenizer", "trainer.sharding",
                "trainer.hf")
# a family's command-line tools drive a trained run through the loop: they live with their
# family (models/<family>/) but stand on the loop's floor
TOOLS = ("models.lm.prune", "models.lm.act_search", "models.mixformer.track")
# thin aliases keeping documented commands (`python -m trainer.track`, ...) where they were
ALIASES = {"trainer.track": "models.mixformer.track", "trainer.prune": "models.lm.prune",
           "trainer.audio": "models.ast.audio"}


def floor(mod: str) -> int:
    if mod in TRAINER_BASE:
        return 2
    if mod in TOOLS:
        return 4
    return {"pallas_kernels": 0, "attention": 1, "models": 3, "trainer": 4, "configs": 5}[
        mod.split(".")[0]]


# (importer, imported) pairs that break a floor today, and where each is going.
KNOWN_FLOOR_BREAKS: set[tuple[str, str]] = set()
# Modules of trainer/ that still import a family
KNOWN_FAMILY_IMPORTS: set[tuple[str, str]] = set()
# Where trainer/ may name a family at all (a string, not an import): `trainer.generate`, the
# public API since the first release (issue 24 rule 7), is the LM family's sampling, found by
# name on first use
FAMILY_NAMES_ALLOWED = {("trainer/__init__.py", "models.lm")}
# Modules that must not import anything of the project beyond the listed ones.
LEAVES = {
    # the config fields and checks: ml_collections and the rule language only
    "trainer.config": {"attention.fields"},
    "attention.fields": set(),  # the rule language of field bounds (mechanisms and trainer)
    "trainer.sharding": {"trainer.config", "attention.sharding"},  # the mesh over the rules table
    "attention.sharding": set(),
    "attention.layers": {"attention.ops.fusion"},
    "pallas_kernels.platform": set(),
}


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(REPO_ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    mod = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
                    out[mod.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (a.b.c -> a.b if a.b.c is a function)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, dict[str, bool]]:
    """{module: {imported project module: imported at module level}} (function-local imports,
    e.g. optional heavy dependencies or a deferred registry load, are False)."""
    graph: dict[str, dict[str, bool]] = {}
    for mod, path in MODULES.items():
        tree = ast.parse(open(path).read(), path)
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                names = [f"{base}.{a.name}" for a in node.names]
                if not all(n in MODULES for n in names):  # `from pkg import f`: pkg is imported
                    names.append(base)
            for name in names:
                if name.split(".")[0] not in PACKAGES:
                    continue
                target = _resolve(name)
                if target and target != mod:
                    edges = graph.setdefault(mod, {})
                    edges[target] = edges.get(target, False) or id(node) in top_level
    return graph


def test_the_graph_sees_the_imports():
    g = import_graph()
    assert g["models.lm.model"]["attention.sharding"] is True
    assert g["trainer.main"].get("trainer.trainer") is False  # a function-local import


def test_floors():
    """No module imports from a floor above its own (beyond the listed, shrinking exceptions)."""
    breaks = {(mod, t) for mod, edges in import_graph().items() for t in edges
              if floor(t) > floor(mod)}
    new = breaks - KNOWN_FLOOR_BREAKS
    assert not new, ("imports from a higher floor (pallas_kernels <- attention <- trainer base "
                     f"<- models <- trainer loop <- configs): {sorted(new)}")
    gone = KNOWN_FLOOR_BREAKS - breaks
    assert not gone, f"fixed: delete them from KNOWN_FLOOR_BREAKS: {sorted(gone)}"


def test_the_generic_trainer_names_no_family():
    named = {(mod, t) for mod, edges in import_graph().items() if mod.startswith("trainer")
             and mod not in ALIASES for t in edges if t.startswith("models")}
    new = named - KNOWN_FAMILY_IMPORTS
    assert not new, f"trainer/ imports a family (register a Task instead): {sorted(new)}"
    gone = KNOWN_FAMILY_IMPORTS - named
    assert not gone, f"fixed: delete them from KNOWN_FAMILY_IMPORTS: {sorted(gone)}"


def test_aliases_are_thin():
    """An alias module imports its tool's main and nothing else of the project."""
    g = import_graph()
    for alias, target in ALIASES.items():
        assert set(g[alias]) == {target}, (alias, sorted(g[alias]))
        assert len(open(MODULES[alias]).read().splitlines()) <= 10, alias


def test_aliases_run_their_tools():
    for alias in ALIASES:
        p = subprocess.run([sys.executable, "-m", alias, "--help"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "usage: python -m " + alias in p.stdout, (alias, p.stderr)


def test_pallas_kernels_and_attention_stay_below():
    g = import_graph()
    for mod, edges in g.items():
        top = mod.split(".")[0]
        if top == "pallas_kernels":
            assert all(t.startswith("pallas_kernels") for t in edges), (mod, edges)
    for mod, allowed in LEAVES.items():
        assert set(g.get(mod, {})) <= allowed, (mod, sorted(g.get(mod, {})))


def test_layer_kit_has_one_home():
    """The compute-dtype table and the shared layers are defined once (attention/layers.py)."""
    for mod, path in MODULES.items():
        if mod == "attention.layers":
            continue
        tree = ast.parse(open(path).read(), path)
        for node in tree.body:
            if isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                assert not any(n.strip("_").upper() == "DTYPES" for n in names), (
                    f"{mod} defines its own dtype table; use attention.layers.compute_dtype")
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert node.name not in ("dense", "linear", "Mlp", "Dense"), (
                    f"{mod} defines {node.name}; the shared one is in attention/layers.py")


def test_the_trainer_names_no_family_even_in_strings():
    families = sorted({m.split(".")[1] for m in MODULES if m.startswith("models.")} - {"images"})
    found = set()
    for mod, path in MODULES.items():
        if not mod.startswith("trainer") or mod in ALIASES:
            continue
        text = open(path).read()
        rel = os.path.relpath(path, REPO_ROOT)
        for fam in families:
            if f"models.{fam}" in text or f"models/{fam}" in text:
                found.add((rel, f"models.{fam}"))
    assert found == FAMILY_NAMES_ALLOWED, sorted(found ^ FAMILY_NAMES_ALLOWED)


def _mechanism_classes():
    import attention

    seen = {}
    for name in attention.names():
        for klass in attention.get(name).__mro__:
            if "CONFIG_DEFAULTS" in klass.__dict__:
                seen[klass] = name
    return seen


def test_mechanism_options_are_declared_once_and_namespaced():
    """Each class declaring options has its own OPTION_PREFIX; every key starts with it; no two
    classes share a prefix or a key (so two mechanisms cannot collide in config.model)."""
    prefixes, keys = {}, {}
    for klass in _mechanism_classes():
        prefix = klass.__dict__.get("OPTION_PREFIX")
        assert prefix, f"{klass.__name__} declares CONFIG_DEFAULTS without its own OPTION_PREFIX"
        assert prefix not in prefixes, (klass.__name__, prefixes[prefix])
        prefixes[prefix] = klass.__name__
        for key in klass.__dict__["CONFIG_DEFAULTS"]:
            assert key.startswith(prefix + "_"), (klass.__name__, key)
            assert key not in keys, (key, klass.__name__, keys[key])
            keys[key] = klass.__name__
    assert {"softmax_impl", "sparse_impl", "act_heads", "gla_chunk", "hedgehog_distill"} <= set(keys)


def test_mechanisms_read_their_options_only_through_the_registry():
    """No mechanism re-reads a declared option with its own default (cfg.get / getattr):
    attention.registry.read_options is the one reader."""
    import re

    keys = {k for klass in _mechanism_classes() for k in klass.__dict__["CONFIG_DEFAULTS"]}
    pattern = re.compile(r"""(?:\.get\(|getattr\(\w+,\s*)["'](\w+)["']""")
    for mod, path in MODULES.items():
        if mod.startswith(("attention", "models")):
            hits = set(pattern.findall(open(path).read())) & keys
            assert not hits, f"{mod} reads {sorted(hits)} itself; use read_options"


def test_the_registry_answers_capabilities():
    import attention

    both = attention.names(bidirectional=True)
    causal = attention.names(bidirectional=False)
    assert "softmax" in both and "moh" in both and "hip" in causal
    assert sorted(both + causal) == attention.names()
    for name in both:
        assert attention.get(name).BIDIRECTIONAL


def test_importing_the_config_starts_no_trainer():
    """trainer/__init__ is lazy: the config and the attention library load without orbax,
    grain or tensorboardX (a notebook that builds one layer pays for nothing else)."""
    code = ("import sys, trainer.config, trainer.cli, attention.softmax; "
            "heavy = [m for m in ('orbax', 'grain', 'tensorboardX', 'trainer.trainer') "
            "if m in sys.modules]; print(heavy); assert not heavy")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


# Function-local project imports, each for an optional or heavy dependency (issue 24 rule 1: no
# local import dodges a cycle). {(module, imported): why}
LOCAL_IMPORTS = {
    ("attention.ops.block_sparse", "pallas_kernels.block_sparse"): "optional Pallas kernel",
    ("attention.ops.gla", "pallas_kernels.gla"): "optional Pallas kernel",
    # `python -m trainer.main --help` and bad flags answer before jax / orbax start
    ("trainer.main", "trainer.stages"): "heavy (jax, orbax)",
    ("trainer.main", "trainer.trainer"): "heavy (jax, orbax)",
    ("trainer.main", "trainer.checkpoint"): "heavy (jax, orbax)",
    ("trainer.main", "trainer.sharding"): "heavy (jax)",
    # only a config with init_from_config asks the family which source tasks it accepts
    ("trainer.cli", "trainer.task"): "heavy (jax, grain)",
}


def test_no_import_cycles_and_local_imports_only_for_heavy_or_optional_ones():
    g = import_graph()
    local = {(m, t) for m, edges in g.items() for t, top in edges.items() if not top}
    assert local == set(LOCAL_IMPORTS), sorted(local ^ set(LOCAL_IMPORTS))
    # a cycle among module-level imports (packages' __init__ re-exports aside)
    top = {m: {t for t, at_top in edges.items() if at_top and not m.startswith(t + ".")}
           for m, edges in g.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in top.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(top):
        if m not in state:
            visit(m, [m])


# A family's own attention blocks (not registry mechanisms): DETR's BoxRPB cross-attention,
# MixFormer's mixed attention, TokenFormer's Pattention
FAMILY_BLOCKS = {"attention.boxrpb", "attention.mixed", "attention.pattention"}


def test_families_choose_mechanisms_only_from_the_registry():
    """A family's model imports no mechanism module: the self-attention is
    attention.build(config.model.attention, ...), so every mechanism works in every family.
    (The LM's tools, which act on one mechanism's layers, stand on the loop's floor.)"""
    import attention

    mechanisms = {f"attention.{n}" for n in attention.names()}
    for mod, edges in import_graph().items():
        if mod.startswith("models") and mod not in TOOLS:
            named = {t for t in edges if t in mechanisms and t not in FAMILY_BLOCKS}
            assert not named, f"{mod} imports mechanism modules {sorted(named)}; use the registry"
            allowed = {t for t in edges if t.startswith("attention")} - named
            assert allowed <= ({"attention", "attention.registry", "attention.layers",
                                "attention.sharding"} | FAMILY_BLOCKS
                               | {t for t in edges if t.startswith("attention.ops")}), (mod, allowed)
