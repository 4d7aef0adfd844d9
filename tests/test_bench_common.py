"""BENCHMARKS.md keeps one section per benchmark: a rerun replaces its section and leaves the others as they were."""

from scripts.bench import common


def test_record_replaces_the_benchmarks_own_section_and_appends_a_new_one(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro\n\n## A — 2020-01-01\n\nold a\n\n## B — 2020-01-01\n\nkept b\n")
    common.record(common.Entry("A", "cmd a", {"jax": "0"}, "new a"), path)
    common.record(common.Entry("C", "cmd c", {"jax": "0"}, "new c"), path)
    text = path.read_text()
    titles = [line.split(" — ")[0] for line in text.splitlines() if line.startswith("## ")]
    assert titles == ["## A", "## B", "## C"]
    assert "old a" not in text and "new a" in text and "kept b" in text and text.startswith("# Benchmarks\n\nintro\n")
    assert text.index("new c") > text.index("kept b") and "- Command: `cmd c`" in text
