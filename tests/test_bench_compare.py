"""bench/compare.py's Markdown tables and bench/all.py's README rewriting, on fake rows (no
training: a smoke test of the plumbing `make bench` relies on)."""
import os

from conftest import load_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_markdown_table_and_results_file(tmp_path):
    compare = load_bench("compare")
    rows = [{"mechanism": "softmax", "kind": "trained", "parameters": 123456,
             "eval bits/byte": 2.345678, "tokens/s": 38000.4, "peak memory MiB": 12.34},
            {"mechanism": "act", "kind": "eval-time on softmax", "eval bits/byte": float("nan"),
             "notes": "heads 0:1|1:2"}]
    text = compare.markdown_table(compare.LM_COLUMNS, rows)
    lines = text.split("\n")
    assert lines[0] == "| " + " | ".join(compare.LM_COLUMNS) + " |"
    assert lines[1] == "|" + "---|" * len(compare.LM_COLUMNS)
    assert lines[2] == "| softmax | trained | 123,456 | 2.3457 | 38,000 | 12.3 |  |"
    assert lines[3] == "| act | eval-time on softmax |  | n/a |  |  | heads 0:1\\|1:2 |"
    # every row has as many cells as the header
    assert {line.count(" | ") for line in lines[2:]} == {len(compare.LM_COLUMNS) - 1}
    path = compare.write_result("compare-lm", text, str(tmp_path))
    assert open(path).read() == text + "\n"
    # every LM mechanism of the issue has a row
    trained = {label for label, _, _ in compare.LM_TRAINED}
    assert {"softmax", "gla", "hedgehog", "routing", "landmark", "ssa", "moh", "complexformer",
            "tokenformer"} <= trained
    assert {"hip", "flexprefill", "dhsa", "landmark retrieval", "act"} <= {
        label for label, _ in compare.LM_EVAL_TIME}


def test_readme_markers(tmp_path, monkeypatch):
    all_ = load_bench("all")
    readme = tmp_path / "README.md"
    before = ("# x\n\n<!-- bench:compare-lm -->\nold lm\n<!-- /bench:compare-lm -->\n"
              "between\n<!-- bench:compare-vision -->\nold vision\n<!-- /bench:compare-vision -->\n"
              "tail\n")
    new, done = all_.replace_markers(before, {"compare-lm": "| a |\n|---|\n| 1 |\n"})
    assert done == ["compare-lm"]
    assert new == before.replace("old lm\n", "| a |\n|---|\n| 1 |\n")
    # from results files: only blocks with a file are rewritten, the rest stays byte for byte
    results = tmp_path / "results"
    results.mkdir()
    (results / "compare-vision.md").write_text("vision table\n")
    monkeypatch.setattr(all_, "RESULTS", str(results))
    readme.write_text(before)
    assert all_.update_readme(str(readme)) == ["compare-vision"]
    assert readme.read_text() == before.replace("old vision\n", "vision table\n")
    assert all_.update_readme(str(readme), since=1e12) == []  # nothing written since
    # every benchmark of `make bench` is known, with a quick and a full command
    assert {"compare", "train", "attention", "tokenformer", "vision", "ast", "detr",
            "mixformer"} <= set(all_.BENCHMARKS)
    for script, quick, full, t_quick, t_full in all_.BENCHMARKS.values():
        assert os.path.exists(os.path.join(ROOT, script)) and 0 < t_quick <= t_full


def test_all_md_records_only_runs_of_every_benchmark(tmp_path, monkeypatch):
    """`bench/all.py --only X` refreshes X's results file but leaves all.md, the summary of the
    last run of every benchmark, as it was."""
    all_ = load_bench("all")
    results = tmp_path / "results"
    results.mkdir()
    (results / "all.md").write_text("the last full run\n")
    monkeypatch.setattr(all_, "RESULTS", str(results))

    def fake_run_one(name, script, args, timeout):
        (results / f"{name}.md").write_text(f"{name} table\n")
        return {"name": name, "status": "ok", "seconds": 1.0, "command": script}

    monkeypatch.setattr(all_, "run_one", fake_run_one)
    assert all_.main(["--only", "attention", "--no_readme"]) == 0
    assert (results / "attention.md").read_text() == "attention table\n"
    assert (results / "all.md").read_text() == "the last full run\n"
    monkeypatch.setattr(all_, "BENCHMARKS", {"attention": all_.BENCHMARKS["attention"]})
    assert all_.main(["--no_readme"]) == 0  # now every benchmark ran
    assert "| attention | ok | 1 |" in (results / "all.md").read_text()


def test_a_failed_benchmark_leaves_its_readme_table(tmp_path, monkeypatch):
    """A benchmark that fails or times out keeps its README block as it was (its results file
    holds the error, not a table); one that ran refreshes its block."""
    all_ = load_bench("all")
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(all_, "RESULTS", str(results))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:sparse -->\nold sparse\n<!-- /bench:sparse -->\n"
                      "<!-- bench:input -->\nold input\n<!-- /bench:input -->\n")

    def fake_run_one(name, script, args, timeout):
        (results / f"{name}.md").write_text(f"new {name}\n")
        return {"name": name, "status": "ok" if name == "input" else "failed (exit 1)",
                "seconds": 1.0, "command": script}

    monkeypatch.setattr(all_, "run_one", fake_run_one)
    assert all_.main(["--only", "sparse,input", "--readme", str(readme)]) == 1
    text = readme.read_text()
    assert "old sparse" in text and "new sparse" not in text and "new input" in text


def test_readme_only_never_copies_a_failed_results_file(tmp_path, monkeypatch):
    all_ = load_bench("all")
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(all_, "RESULTS", str(results))
    (results / "sparse.md").write_text("`python -m bench.sparse` (2026-12-07 21:31 UTC, 234 s, "
                                       "failed (exit 1))\n\ntraceback\n")
    (results / "input.md").write_text("`python -m bench.input` (2026-12-07 21:31 UTC, 9 s, ok)\n")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:sparse -->\nold\n<!-- /bench:sparse -->\n"
                      "<!-- bench:input -->\nold\n<!-- /bench:input -->\n")
    assert all_.update_readme(str(readme)) == ["input"]
    assert "traceback" not in readme.read_text()
