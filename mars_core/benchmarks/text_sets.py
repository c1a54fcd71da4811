"""Harmful and harmless text instruction sets in their published formats -> `list[Record]`.

Loaders: AdvBench `harmful_behaviors.csv`, HarmBench behaviors CSV, JailbreakBench
JBB-Behaviors (`harmful-behaviors.csv` / `benign-behaviors.csv`), StrongREJECT
`strongreject_dataset.csv` (all harmful=True except JBB benign) and Alpaca `alpaca_data.json`
(harmful=False).

Conventions:
* `path` is the file itself or a folder holding it under its published name. Without `path`
  the file is fetched from a Hugging Face dataset repo (`repo_id`, `filename`, `revision`;
  defaults exist where the published file is on the hub) through `hub_download`.
* Texts are stripped of surrounding whitespace; nothing else is changed.
* `Record.id`: the file's own id where it has one (HarmBench `BehaviorID`, JBB
  `"<harmful|benign>-<Index>"`), else the first 12 hex digits of SHA-256 of the UTF-8 text.
  Repeated ids within one file get "-2", "-3", ... in file order.
* A malformed file raises `InputError` naming the path, what was expected and the fix; a loader
  returns either every record or nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import InputError
from .records import Record

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Source:
    """Where a published file lives: its name, a URL for people, and a hub copy if one exists."""

    benchmark: str
    filename: str
    url: str
    columns: tuple[str, ...]
    repo_id: str | None = None
    hub_filename: str | None = None


ADVBENCH = Source("advbench", "harmful_behaviors.csv",
                  "https://github.com/llm-attacks/llm-attacks/blob/main/data/advbench/harmful_behaviors.csv",
                  ("goal", "target"))
HARMBENCH = Source("harmbench", "harmbench_behaviors_text_all.csv",
                   "https://github.com/centerforaisafety/HarmBench/blob/main/data/behavior_datasets/"
                   "harmbench_behaviors_text_all.csv",
                   ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"))
_JBB_COLS = ("Index", "Goal", "Target", "Behavior", "Category", "Source")
JBB = {
    which: Source("jailbreakbench", f"{which}-behaviors.csv",
                  "https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors", _JBB_COLS,
                  "JailbreakBench/JBB-Behaviors", f"data/{which}-behaviors.csv")
    for which in ("harmful", "benign")
}
STRONGREJECT = Source("strongreject", "strongreject_dataset.csv",
                      "https://github.com/alexandrasouly/strongreject/blob/main/strongreject_dataset/"
                      "strongreject_dataset.csv",
                      ("category", "source", "forbidden_prompt"))
ALPACA = Source("alpaca", "alpaca_data.json",
                "https://github.com/tatsu-lab/stanford_alpaca/blob/main/alpaca_data.json",
                ("instruction", "input", "output"))


# ---------------------------------------------------------------------- hub
def hub_download(repo_id: str, filename: str, revision: str | None = None) -> str:
    """Local path of `filename` in the Hugging Face dataset `repo_id` (downloaded or cached).

    The only function here that touches the network; tests replace it.
    """
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", revision=revision)


def _resolve(path: PathLike | None, src: Source, repo_id: str | None, filename: str | None,
             revision: str | None, loader: str) -> Path:
    """The local file to read: `path` (file or folder), else a hub download."""
    if path is not None:
        p = Path(path)
        if p.is_dir():
            for cand in (p / src.filename, p / "data" / src.filename):
                if cand.is_file():
                    return cand
            raise InputError(f"{p} is a folder without {src.filename}; pass the file itself or the folder "
                             f"holding it (download it from {src.url})")
        if not p.is_file():
            raise InputError(f"no file at {p}; download {src.filename} from {src.url} and pass its path: "
                             f"{loader}(path=...)")
        return p
    repo_id = repo_id or src.repo_id
    filename = filename or src.hub_filename or src.filename
    if repo_id is None:
        raise InputError(
            f"{src.benchmark}: no Hugging Face copy of {src.filename} in its published format is known; "
            f"download it from {src.url} and pass its path: {loader}(path=...), or name a hub mirror "
            f"of the same file with repo_id=... and filename=..."
        )
    try:
        local = hub_download(repo_id, filename, revision)
    except InputError:
        raise
    except Exception as e:  # network, auth, missing file: all end the same way for the user
        raise InputError(
            f"could not fetch {filename} from the Hugging Face dataset {repo_id} "
            f"({type(e).__name__}: {str(e)[:200]}); the hub may be unreachable. Download the file "
            f"({src.url}) and pass its path: {loader}(path=...)"
        ) from e
    return Path(local)


# ---------------------------------------------------------------------- readers
def _expect(src: Source) -> str:
    kind = "a JSON list of objects with keys" if src.filename.endswith(".json") else "a CSV with columns"
    return f"the published {src.benchmark} file {src.filename}: {kind} {', '.join(src.columns)}"


def _bad(path: Path, src: Source, problem: str) -> InputError:
    return InputError(f"{path}: {problem}. Expected {_expect(src)}. Fix: pass that file "
                      f"(from {src.url}) unmodified")


def _read_text(path: Path, src: Source) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise _bad(path, src, f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise InputError(f"cannot read {path} ({e}); check the path and permissions") from e
    if not text.strip():
        raise _bad(path, src, "the file is empty")
    return text


def _read_csv(path: Path, src: Source, required: Iterable[str]) -> list[dict[str, str]]:
    """Rows of a CSV with a header holding `required` columns; every value a str."""
    required = list(required)
    try:
        reader = csv.DictReader(io.StringIO(_read_text(path, src)))
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = list(reader)
    except csv.Error as e:
        raise _bad(path, src, f"not readable as CSV ({e})") from e
    missing = [c for c in required if c not in header]
    if missing:
        raise _bad(path, src, f"missing column(s) {missing}; the header has {header}")
    if not rows:
        raise _bad(path, src, "the header has no data rows under it")
    for i, row in enumerate(rows):
        short = [c for c in required if row.get(c) is None]
        if short:
            raise _bad(path, src, f"data row {i + 1} has fewer fields than the header (no {short})")
    return rows


def _text(path: Path, src: Source, row: dict[str, str], col: str, i: int) -> str:
    t = (row.get(col) or "").strip()
    if not t:
        raise _bad(path, src, f"data row {i + 1} has an empty {col!r}")
    return t


def content_id(text: str) -> str:
    """First 12 hex digits of SHA-256 of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _unique(ids: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}-{seen[i]}")
    return out


def _records(src: Source, items: list[dict[str, Any]]) -> list[Record]:
    ids = _unique([it.pop("id") for it in items])
    return [Record(id=i, benchmark=src.benchmark, **it) for i, it in zip(ids, items)]


# ---------------------------------------------------------------------- loaders
def load_advbench(path: PathLike | None = None, *, repo_id: str | None = None, filename: str | None = None,
                  revision: str | None = None) -> list[Record]:
    """AdvBench harmful behaviors (`goal` -> text, `target` -> meta["target"]); harmful=True."""
    p = _resolve(path, ADVBENCH, repo_id, filename, revision, "load_advbench")
    items = []
    for i, row in enumerate(_read_csv(p, ADVBENCH, ADVBENCH.columns)):
        t = _text(p, ADVBENCH, row, "goal", i)
        items.append(dict(id=content_id(t), text=t, harmful=True, meta={"target": row["target"].strip()}))
    return _records(ADVBENCH, items)


def load_harmbench(path: PathLike | None = None, *, include_contextual: bool = False,
                   include_copyright: bool = False, repo_id: str | None = None, filename: str | None = None,
                   revision: str | None = None) -> list[Record]:
    """HarmBench behaviors; harmful=True, category = SemanticCategory, id = BehaviorID.

    Keeps FunctionalCategory "standard"; `include_contextual` adds "contextual" rows with the
    text `ContextString + "\\n\\n---\\n\\n" + Behavior`; `include_copyright` adds "copyright" rows.
    """
    p = _resolve(path, HARMBENCH, repo_id, filename, revision, "load_harmbench")
    rows = _read_csv(p, HARMBENCH, ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString",
                                    "BehaviorID"))
    keep = {"standard"} | ({"contextual"} if include_contextual else set()) | (
        {"copyright"} if include_copyright else set())
    items = []
    for i, row in enumerate(rows):
        func = row["FunctionalCategory"].strip()
        if func not in keep:
            continue
        t = _text(p, HARMBENCH, row, "Behavior", i)
        ctx = row["ContextString"].strip()
        if func == "contextual" and ctx:
            t = f"{ctx}\n\n---\n\n{t}"
        bid = _text(p, HARMBENCH, row, "BehaviorID", i)
        items.append(dict(id=bid, text=t, category=row["SemanticCategory"].strip(), harmful=True,
                          meta={"functional_category": func, "tags": (row.get("Tags") or "").strip()}))
    if not items:
        raise _bad(p, HARMBENCH, f"no rows with FunctionalCategory in {sorted(keep)}")
    return _records(HARMBENCH, items)


def load_jailbreakbench(path: PathLike | None = None, *, behaviors: str = "harmful", repo_id: str | None = None,
                        filename: str | None = None, revision: str | None = None) -> list[Record]:
    """JBB-Behaviors `behaviors="harmful"` (harmful=True) or `"benign"` (harmful=False).

    text = Goal, category = Category, id = "<behaviors>-<Index>"; Target, Behavior and Source go
    to meta.
    """
    if behaviors not in JBB:
        raise InputError(f"behaviors={behaviors!r}; use 'harmful' or 'benign'")
    src = JBB[behaviors]
    p = _resolve(path, src, repo_id, filename, revision, "load_jailbreakbench")
    items = []
    for i, row in enumerate(_read_csv(p, src, ("Index", "Goal", "Category"))):
        t = _text(p, src, row, "Goal", i)
        idx = _text(p, src, row, "Index", i)
        meta = {k.lower(): (row.get(k) or "").strip() for k in ("Target", "Behavior", "Source")}
        items.append(dict(id=f"{behaviors}-{idx}", text=t, category=row["Category"].strip(),
                          harmful=behaviors == "harmful", meta=meta))
    return _records(src, items)


def load_strongreject(path: PathLike | None = None, *, repo_id: str | None = None, filename: str | None = None,
                      revision: str | None = None) -> list[Record]:
    """StrongREJECT forbidden prompts; harmful=True, category = `category`, meta["source"]."""
    p = _resolve(path, STRONGREJECT, repo_id, filename, revision, "load_strongreject")
    items = []
    for i, row in enumerate(_read_csv(p, STRONGREJECT, STRONGREJECT.columns)):
        t = _text(p, STRONGREJECT, row, "forbidden_prompt", i)
        items.append(dict(id=content_id(t), text=t, category=row["category"].strip(), harmful=True,
                          meta={"source": row["source"].strip()}))
    return _records(STRONGREJECT, items)


def load_alpaca(path: PathLike | None = None, *, include_with_input: bool = False, repo_id: str | None = None,
                filename: str | None = None, revision: str | None = None) -> list[Record]:
    """Alpaca instructions; harmful=False, reference = `output`.

    Keeps items whose `input` is empty; `include_with_input` keeps the rest too with the text
    `instruction + "\\n\\n" + input`.
    """
    p = _resolve(path, ALPACA, repo_id, filename, revision, "load_alpaca")
    try:
        data = json.loads(_read_text(p, ALPACA))
    except json.JSONDecodeError as e:
        raise _bad(p, ALPACA, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(data, list) or not data:
        raise _bad(p, ALPACA, f"the top level is {type(data).__name__}{'' if data else ' (empty)'}, not a "
                              "non-empty list")
    items = []
    for i, it in enumerate(data):
        if not isinstance(it, dict) or not isinstance(it.get("instruction"), str) \
                or not isinstance(it.get("input", ""), str):
            raise _bad(p, ALPACA, f"item {i} is not an object with string 'instruction' and 'input'")
        inst, extra = it["instruction"].strip(), it.get("input", "").strip()
        if not inst:
            raise _bad(p, ALPACA, f"item {i} has an empty 'instruction'")
        if extra and not include_with_input:
            continue
        t = f"{inst}\n\n{extra}" if extra else inst
        out = it.get("output")
        items.append(dict(id=content_id(t), text=t, harmful=False,
                          reference=out if isinstance(out, str) else None))
    if not items:
        raise _bad(p, ALPACA, "no item has an empty 'input' (pass include_with_input=True to keep them)")
    return _records(ALPACA, items)


# name -> loader of a local copy, for direction prompt sets (`mars evaluate --harmful/--harmless`)
TEXT_SETS = {
    "advbench": load_advbench,
    "harmbench": load_harmbench,
    "jailbreakbench": load_jailbreakbench,
    "jailbreakbench_benign": lambda path: load_jailbreakbench(path, behaviors="benign"),
    "strongreject": load_strongreject,
    "alpaca": load_alpaca,
}


def load_text_set(name: str, path: PathLike) -> list[Record]:
    """Records of the text prompt set `name` (a key of `TEXT_SETS`) from its local copy."""
    if name not in TEXT_SETS:
        raise InputError(f"unknown text prompt set {name!r}; known: {', '.join(sorted(TEXT_SETS))}")
    if not Path(path).exists():
        raise InputError(f"text prompt set {name!r}: path {str(path)!r} does not exist")
    return TEXT_SETS[name](path)
