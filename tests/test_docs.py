"""The repository is self-contained: the README and docs point only inside it, the
benchmark data ships with it, and the Grafana dashboard reads series that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
SERIES = re.compile(r"\b(kvstore_[a-z_]+?)(?:_bucket|_count|_sum)?\b")


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_links_point_inside_the_repository() -> None:
    for doc in _docs():
        text = doc.read_text()
        assert "DESIGN.md" not in text and "../shared" not in text, doc
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name}: {target}"


def test_the_mooncake_trace_ships_with_its_attribution() -> None:
    trace = ROOT / "bench" / "data" / "mooncake_conversation_trace.jsonl"
    first = json.loads(trace.open().readline())
    assert {"timestamp", "input_length", "output_length", "hash_ids"} <= first.keys()
    assert "kvcache-ai/Mooncake" in (ROOT / "bench" / "data" / "README.md").read_text()


def test_the_dashboard_reads_series_the_services_export() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exported = "".join(p.read_text() for p in [
        *(ROOT / "engine" / "server").glob("*.py"), *(ROOT / "kvstore" / "daemon").glob("*.py"),
        ROOT / "kvstore" / "tier_metrics.py"])
    names = {n.removesuffix("_total") for panel in dashboard["panels"]
             for target in panel["targets"] for n in SERIES.findall(target["expr"])}
    assert "kvstore_prefix_cache_hits" in names and "kvstore_serve_time_to_first_token_seconds" in names
    for name in names:
        stem = name.removeprefix("kvstore_tier_")
        assert name in exported or f'"{stem}"' in exported, name
