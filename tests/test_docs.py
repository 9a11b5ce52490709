"""The documentation against the code: the result-format page's standalone reader runs on a fresh result,
the lists of plugins, methods, node types, pages and command-line options are complete."""

import re
from pathlib import Path

import pytest
import torch
from conftest import make_plan, tiny_model

import atpframework as af
from atpframework.io.results import RESULT_SCHEMA_VERSION

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def read(relative: str) -> str:
    return (REPO / relative).read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The Markdown of one ``## heading`` section (up to the next ``## ``)."""
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def entry_points(group: str) -> dict[str, str]:
    """``name = "target"`` lines of one entry-point group of pyproject.toml."""
    text = read("pyproject.toml")
    body = text.split(f'[project.entry-points."{group}"]\n', 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^(\w+) = "([^"]+)"$', body, flags=re.M))


# ------------------------------------------------------------------------------ result-format.md
def test_reading_without_atpframework_runs_on_a_freshly_written_result(tmp_path, monkeypatch):
    sae_lens = pytest.importorskip("sae_lens")
    sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=32, d_sae=40))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
    nodes = [{"kind": "attn_head", "name": "heads"}, {"kind": "sae_latent", "name": "latents", "sae": "s", "keep_top": 3}]
    plan = make_plan(nodes, saes=[{"name": "s"}])
    result = af.run(plan, model=tiny_model(), saes={"s": sae}).with_token_strings(lambda ids: [f"<{i}>" for i in ids])
    result.save(tmp_path / "ioi.safetensors")
    assert result["latents"].per_pair.is_sparse, "the file must hold a sparse selection too"

    blocks = python_blocks(section(read("docs/result-format.md"), "Reading without atpframework"))
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "result-format.md", "exec"), namespace)

    assert namespace["name"] == "heads"
    torch.testing.assert_close(torch.as_tensor(namespace["mean_abs"]), result["heads"].aggregate("mean_abs"))
    torch.testing.assert_close(torch.as_tensor(namespace["scores"]["latents"]), result["latents"].per_pair.to_dense())
    assert namespace["clean"] == result.clean_tokens
    assert namespace["strings"] == [[f"<{i}>" for i in ids] for ids in result.clean_tokens]
    assert namespace["plan"] == result.plan


def test_the_result_format_page_names_the_current_schema_version_only():
    text = read("docs/result-format.md")
    stated = re.findall(r"version (\d+) of the schema|currently `(\d+)`|schema_version\"\]\) <= (\d+)", text)
    numbers = {int(n) for match in stated for n in match if n}
    assert len(stated) == 3 and numbers == {RESULT_SCHEMA_VERSION}, stated
    assert re.search(rf"\b{RESULT_SCHEMA_VERSION} added", text), "the version history must reach the current version"


# --------------------------------------------------------------------------- lists that must be complete
@pytest.mark.parametrize("group", ["atpframework.backends", "atpframework.nodes", "atpframework.methods"])
def test_the_plugin_page_lists_every_built_in_entry_point(group):
    block = read("docs/plugins.md").split("```toml\n", 1)[1].split("```", 1)[0]
    listed = block.split(f'[project.entry-points."{group}"]\n', 1)[1].split("\n[", 1)[0]
    assert dict(re.findall(r'^(\w+) = "([^"]+)"$', listed, flags=re.M)) == entry_points(group)


def test_every_method_is_listed_where_methods_are_listed():
    for method in entry_points("atpframework.methods"):
        assert f"`{method}`" in read("docs/methods.md"), method
        assert f"| `{method}`" in section(read("docs/plans.md"), "method"), method
        assert f"`{method}`" in read("docs/plans.md").split("## model", 1)[0], f"plans.md's field table lacks {method}"
        assert f"`{method}`" in read("docs/index.md") and f"`{method}`" in read("README.md"), method


def test_every_node_type_is_listed_in_the_node_page():
    table = section(read("docs/nodes.md"), "Built-in node types")
    for kind in entry_points("atpframework.nodes"):
        assert re.search(rf"^\| `{kind}`", table, flags=re.M), kind


def test_every_page_is_in_the_nav_and_linked_from_the_index_and_the_readme():
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    nav = re.findall(r"^\s*- (?:[^:\n]+: )?([\w-]+\.md)$", read("mkdocs.yml"), flags=re.M)
    assert sorted(nav) == pages, "every page of docs/ once in mkdocs.yml's nav"
    index, readme = read("docs/index.md"), read("README.md")
    for page in pages:
        if page != "index.md":
            assert f"]({page}" in index, f"docs/index.md does not link {page}"
            assert f"](docs/{page}" in readme, f"README.md does not link docs/{page}"


def test_the_command_line_synopsis_lists_every_command_and_option():
    """The synopsis at the top of cli.md against the options each command's --help shows."""
    import click

    from atpframework.cli import main

    synopsis = read("docs/cli.md").split("```text\n", 1)[1].split("```", 1)[0]
    lines: dict[str, str] = {}
    current = None
    for line in synopsis.splitlines():
        words = line.split()
        if line.startswith(" ") and current is not None:  # a continuation of the command above
            lines[current] += " " + line
        elif words[:1] == ["atpf"] and len(words) > 1:
            current = "run" if words[1] == "PLAN.json" else words[1]
            lines[current] = lines.get(current, "") + " " + line
        else:
            current = None
    for name, command in main.commands.items():
        assert name in lines, f"cli.md's synopsis has no line for atpf {name}"
        options = [param.opts for param in command.params if isinstance(param, click.Option)]
        missing = [opts[-1] for opts in options if not any(re.search(rf"(?<![\w-]){re.escape(o)}\b", lines[name]) for o in opts)]
        assert not missing, f"atpf {name}: the synopsis lacks {missing}"
