"""The user-facing documents stay true: the README's configuration reference is what the schema renders now,
it covers every section and field of ``RunConfig``, the paths the documents name exist, and no document
narrates how the work went."""

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from services import config_reference as ref
from services.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USER_DOCS = [README, ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REGENERATE = "run `.venv/bin/python -m services.config_reference --write README.md`"


def test_readme_reference_matches_the_schema():
    block = ref.readme_block(README.read_text(encoding="utf-8"))
    assert block == ref.render_reference(), f"README's configuration reference is stale: {REGENERATE}"


def _sections(model: type[BaseModel], path: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub, is_list = ref._model_of(field.annotation)
        if sub is not None:
            spath = f"{path}.{name}" if path else name
            out.append(spath)
            out += _sections(sub, spath + ("[]" if is_list else ""))
    return out


def test_every_section_and_field_of_runconfig_is_in_the_readme():
    block = ref.readme_block(README.read_text(encoding="utf-8"))
    sections = _sections(RunConfig)
    assert {"model", "task", "rollout", "rollout.sde", "reward", "reward.components", "learner", "learner.sync",
            "algorithm", "sft", "tracking", "checkpoint", "cluster"} <= set(sections)
    headings = set(re.findall(r"^### `([^`]+)`$", block, flags=re.M))
    for s in sections:
        if ref._model_of(_field(s).annotation)[1]:  # a list of models: its items' section
            assert f"{s}[]" in headings, s
        else:
            assert s in headings, f"section {s} missing from the README: {REGENERATE}"
    rows = set(re.findall(r"^\| `([^`]+)` \|", block, flags=re.M))
    top_level = [n for n, f in RunConfig.model_fields.items() if ref._model_of(f.annotation)[0] is None]
    assert set(top_level) <= rows
    assert set(ref.field_paths()) <= rows, f"fields missing from the README: {REGENERATE}"


def _field(path: str):
    model: type[BaseModel] = RunConfig
    *parents, last = path.replace("[]", "").split(".")
    for name in parents:
        model = ref._model_of(model.model_fields[name].annotation)[0]
    return model.model_fields[last]


def test_every_field_has_a_description_and_no_doc_entry_is_stale():
    paths = ref.field_paths()
    undocumented = [r.path for s in ref.iter_sections() for r in s.rows if not r.description]
    assert not undocumented, ("fields without a description: add a comment beside the field or an entry "
                              f"in services.config_reference.FIELD_DOCS: {undocumented}")
    stale = sorted(set(ref.FIELD_DOCS) - set(paths))
    assert not stale, f"FIELD_DOCS names fields the schema no longer has: {stale}"
    sections = {s.path for s in ref.iter_sections()}
    assert not sorted(set(ref.SECTION_DOCS) - sections), "SECTION_DOCS names sections the schema no longer has"


def test_reference_renders_types_bounds_and_defaults():
    rows = {r.path: r for s in ref.iter_sections() for r in s.rows}
    assert rows["rollout.group_size"].type == "int >= 2" and rows["rollout.group_size"].default == "`8`"
    assert rows["rollout.top_p"].type == "float in (0, 1]"
    assert rows["rollout.engine"].type == '"hf" | "vllm"'
    assert rows["tracking.uri"].type == "str | null" and rows["tracking.uri"].default == "`null`"
    assert rows["reward.components[].name"].default == "(required)"
    assert rows["learner.betas"].default == "`[0.9, 0.999]`"
    # A comment beside a field in the source is its description when FIELD_DOCS has none.
    assert rows["reward.timeout_s"].description.startswith("One scoring call")


def test_write_readme_replaces_only_the_marked_block(tmp_path):
    doc = tmp_path / "R.md"
    doc.write_text(f"# t\nbefore\n{ref.START}\nold\n{ref.END}\nafter\n", encoding="utf-8")
    assert ref.write_readme(doc) is True
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# t\nbefore\n") and text.endswith(f"{ref.END}\nafter\n")
    assert ref.readme_block(text) == ref.render_reference()
    assert ref.write_readme(doc) is False
    (tmp_path / "none.md").write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="markers"):
        ref.write_readme(tmp_path / "none.md")


# A backticked repository path in a document: a top-level folder, then a file with an extension or a folder
# ending in "/" (metric names such as `reward/total/mean` are not paths).
_TOP = "|".join(["services", "recipes", "rollout", "reward", "learner", "sync", "policy", "tasks", "configs",
                 "deploy", "bench", "tests", "docs"])
_PATH = re.compile(rf"`((?:{_TOP})/(?:[\w./-]*\.\w+|[\w./-]*/)?)`")


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_named_in_docs_exist(doc):
    missing = sorted({m for m in _PATH.findall(doc.read_text(encoding="utf-8"))
                      if "*" not in m and "<" not in m and not (ROOT / m).exists()})
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


# Work-history narration: documents describe the software, not how its making went.
_NARRATION = re.compile(r"\b(session|final commit|this box|on this machine|we tried|round of|"
                        r"before this work|this work|left to do)\b", re.I)


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_do_not_narrate_work_history(doc):
    hits = [line.strip() for line in doc.read_text(encoding="utf-8").splitlines() if _NARRATION.search(line)]
    assert not hits, f"{doc.name} narrates work history: {hits[:5]}"
