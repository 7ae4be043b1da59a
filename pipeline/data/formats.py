"""Loaders for the data formats researchers bring, all returning plain Python lists plus a count of skipped records.

A source (`SourceConfig` in pipeline/core/config.py) says where the data is:

    kind    "world"  the built-in synthetic world (generated into the cache; preferences: reward_data/ in the repo)
            "local"  files: .jsonl / .json (JSON lines or one JSON array), .txt, .parquet, .csv; `path` may be a glob
            "hub"    a Hugging Face dataset name in `path` (config `name`), loaded with datasets.load_dataset
    split   the hub split; `{split}` in a local path is replaced by it; for kind "world" it picks the file:
            sft train | eval, preferences train | test, prompts ppo | eval
    format  see below; "auto" takes the loader's default, or tells the formats apart by their fields
    field   the column holding the text (format text), the messages (messages) or the prompt (prompts)
    on_bad_record  "error": stop at the first bad record with `file:line: field 'x': problem`; "skip": drop and count

Formats, one example record each (JSON lines):

  load_corpus, format "text"
      {"text": "Bera works as a baker."}            jsonl / json / parquet / csv: a text column
      a .txt file: one document per paragraph; paragraphs are separated by blank lines (so one file can hold a
      whole corpus, and a long book is cut into paragraph-sized documents rather than one huge one)

  load_sft, format "messages" (TRL conversational; must end with an assistant turn)
      {"messages": [{"role": "user", "content": "How old is Bera?"}, {"role": "assistant", "content": "Bera is 34."}]}
  load_sft, format "prompt_completion" (strings, or message lists as in TRL)
      {"prompt": "How old is Bera?", "completion": "Bera is 34."}
      {"prompt": [{"role": "user", "content": "How old is Bera?"}],
       "completion": [{"role": "assistant", "content": "Bera is 34."}]}

  load_preferences, format "pairs" (TRL preference format; plain strings are read as one user / assistant turn)
      {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
       "rejected": [{"role": "assistant", "content": "bad"}]}
      {"prompt": "Q", "chosen": "good", "rejected": "bad"}
      {"chosen": [user Q, assistant good], "rejected": [user Q, assistant bad]}    implicit prompt: the shared prefix
  load_preferences, format "hh" (Anthropic HH-RLHF transcripts; the shared prefix up to the last user turn is
  the prompt)
      {"chosen": "\\n\\nHuman: Q\\n\\nAssistant: good", "rejected": "\\n\\nHuman: Q\\n\\nAssistant: bad"}
  load_preferences, format "ranked" (what reward_data/ holds: K responses, ranks 0 = best, expanded to all pairs)
      {"id": "train-00000", "prompt": [{"role": "user", "content": "Q"}], "responses": ["a", "b", "c"],
       "ranks": [1, 0, 2], "gold_scores": [0.7, 0.9, 0.2]}                        (id and gold_scores optional)

  load_prompts, format "prompts" (= auto), "messages" or "prompt"; trailing assistant turns are dropped
      {"messages": [{"role": "user", "content": "How old is Bera?"}]}
      {"prompt": "How old is Bera?"}

Preference records come back as {"prompt": [...], "chosen": [...], "rejected": [...], "group": str,
"gold_margin": float | None}: `group` ties together pairs from one prompt, `gold_margin` is gold(chosen) -
gold(rejected) where the data carries gold scores (the synthetic world), else None.

JSON lines are parsed here rather than by `datasets`, so a bad record is reported by file and line; parquet, csv
and hub data go through `datasets.load_dataset`, whose failures are rewrapped into one-line `UserError`s.
"""

from __future__ import annotations

import glob
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pipeline.core.errors import UserError, data_error
from pipeline.core.io import read_utf8
from pipeline.data.pairs import expand_pairs

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLES = ("system", "user", "assistant")
_WORLD_FILE = {
    ("sft", "train"): "sft",
    ("sft", "eval"): "sft_eval",
    ("sft", "validation"): "sft_eval",
    ("sft", "test"): "sft_eval",
    ("prompts", "ppo"): "ppo_prompts",
    ("prompts", "train"): "ppo_prompts",
    ("prompts", "eval"): "eval_prompts",
    ("prompts", "validation"): "eval_prompts",
    ("prompts", "test"): "eval_prompts",
    ("corpus", "train"): "corpus",
}


# ---- where a record came from --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _At:
    source: str
    line: int | None = None  # a line number where the file has lines (jsonl, txt, csv)
    record: int | None = None  # else a record number (parquet, hub, JSON arrays)

    def error(self, field: str | None, problem: str) -> UserError:
        where = self.source if self.record is None else f"{self.source} record {self.record}"
        return data_error(where, self.line, field, problem)

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line if self.line is not None else self.record}"


def _opt(src, name: str, default=None):
    return getattr(src, name, default) if src is not None else default


# ---- reading rows --------------------------------------------------------------------------------------------
def _files(pattern: str) -> list[Path]:
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(f"data path '{pattern}' matches no files")
    return files


def _lines(text: str) -> list[str]:
    """Lines as a text-mode file reads them (\\n, \\r\\n or \\r end a line; str.splitlines would also split at
    U+2028 and other separators that JSON strings may hold unescaped)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _jsonl(path: Path) -> Iterator[tuple[_At, object]]:
    text = read_utf8(path)
    if path.suffix == ".json" and text[:4096].lstrip().startswith("["):  # one JSON array: records are numbered
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise data_error(path, e.lineno, None, f"malformed JSON: {e.msg}") from None
        if not isinstance(records, list):
            raise data_error(path, None, None, "a .json file must hold one array of records, or JSON lines")
        yield from ((_At(str(path), record=i + 1), rec) for i, rec in enumerate(records))
        return
    for i, line in enumerate(_lines(text)):
        if line.strip():
            at = _At(str(path), i + 1)
            try:
                yield at, json.loads(line)
            except json.JSONDecodeError as e:
                yield at, at.error(None, f"malformed JSON line: {e.msg}")


def _paragraphs(path: Path) -> Iterator[tuple[_At, object]]:
    start, buf = None, []
    for i, line in enumerate(_lines(read_utf8(path)) + [""]):
        if line.strip():
            start = i + 1 if not buf else start
            buf.append(line)
        elif buf:
            yield _At(str(path), start), {"text": "\n".join(buf)}
            buf = []


def _dataset_rows(ds, source: str, first_line: int | None) -> Iterator[tuple[_At, object]]:
    for i, row in enumerate(ds):
        yield (_At(source, i + first_line) if first_line is not None else _At(source, record=i + 1)), row


def _load_dataset(what: str, *args, hub: bool = False, **kwargs):
    import datasets  # heavy; only when needed

    from pipeline.core.hub import offline, offline_hint

    cut_off = hub and offline()  # probed first: offline, the local cache or one line at once instead of retries
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 — datasets raises many types, always deep; one line is what the user needs
        if cut_off:
            raise UserError(f"cannot load {what}: {offline_hint(repr(args[0]))}") from None
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot load {what}: {type(e).__name__}: {msg}") from None


def _rows(src, split: str, required: tuple[str, ...] = ()) -> Iterator[tuple[_At, object]]:
    """(where, record) for every record of a local or hub source; a bad JSON line comes as a UserError record."""
    kind, path = _opt(src, "kind", "local"), _opt(src, "path")
    if kind not in ("local", "hub"):
        raise UserError(f"data source kind '{kind}': expected world, local or hub")
    if not path:
        raise UserError(f"data source of kind '{kind}' needs a path")
    if kind == "hub":
        name = _opt(src, "name")
        ds = _load_dataset(
            f"dataset '{path}'" + (f" config '{name}'" if name else "") + f" split '{split}' (offline?)",
            path,
            name,
            split=split,
            hub=True,
        )
        _check_columns(ds, path, required)
        yield from _dataset_rows(ds, f"{path}[{split}]", None)
        return
    for f in _files(path.replace("{split}", split)):
        suffix = f.suffix.lower()
        if suffix in (".jsonl", ".json"):
            yield from _jsonl(f)
        elif suffix == ".txt":
            yield from _paragraphs(f)
        elif suffix in (".parquet", ".csv"):
            ds = _load_dataset(f"{f}", suffix[1:], data_files=str(f), split="train")
            _check_columns(ds, f, required)
            yield from _dataset_rows(ds, str(f), 2 if suffix == ".csv" else None)  # csv line 1 is the header
        else:
            raise UserError(f"{f}: unsupported file type '{suffix}' (use .jsonl, .json, .txt, .parquet or .csv)")


def _check_columns(ds, source, required: tuple[str, ...]) -> None:
    for col in required:
        if col not in ds.column_names:
            raise data_error(source, None, col, f"no such column (columns: {', '.join(ds.column_names)})")


def _collect(rows, convert: Callable, src, what: str) -> tuple[list, int]:
    """Apply `convert(record, at) -> list` to every row; bad records raise or are counted and skipped."""
    on_bad_record = _opt(src, "on_bad_record", "error")
    if on_bad_record not in ("error", "skip"):
        raise UserError(f"on_bad_record='{on_bad_record}': expected error or skip")
    out, skipped = [], 0
    for at, rec in rows:
        try:
            if isinstance(rec, UserError):
                raise rec
            if not isinstance(rec, Mapping):
                raise at.error(None, f"expected a JSON object, got {type(rec).__name__}")
            out.extend(convert(rec, at))
        except UserError:
            if on_bad_record == "error":
                raise
            skipped += 1
    if not out:
        where = _opt(src, "path") or "the synthetic world"
        raise UserError(f"no usable {what} records in {where}" + (f" ({skipped} bad ones skipped)" if skipped else ""))
    return out, skipped


# ---- validating records --------------------------------------------------------------------------------------
def _get(rec: Mapping, field: str, at: _At):
    if field not in rec or rec[field] is None:
        raise at.error(field, "missing")
    return rec[field]


def _content(value, at: _At, field: str) -> str:
    if not isinstance(value, str):
        raise at.error(field, f"content must be a string, got {type(value).__name__}")
    if not value.strip():
        raise at.error(field, "empty content")
    return value


def _checked_messages(value, at: _At, field: str) -> list[dict]:
    """A validated list of {"role", "content"} (a JSON string is decoded first: csv cells hold messages that way)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise at.error(field, "not a valid JSON list of messages") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise at.error(field, "expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            raise at.error(f, f"expected a message object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise at.error(f"{f}.role", f"unknown role {role!r} (expected system, user or assistant)")
        out.append({"role": role, "content": _content(m.get("content"), at, f"{f}.content")})
    return out


def _turns(value, at: _At, field: str, role: str) -> list[dict]:
    """A plain string is one turn of `role`; a list (or a string holding a JSON list, as in csv) is messages."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.lstrip().startswith("[") else value
        except json.JSONDecodeError:
            pass  # text that merely starts with "["
        if isinstance(value, str):
            return [{"role": role, "content": _content(value, at, field)}]
    return _checked_messages(value, at, field)


def _ends_with(msgs: list[dict], role: str, at: _At, field: str) -> list[dict]:
    if msgs[-1]["role"] != role:
        raise at.error(field, f"must end with a {role} turn, ends with {msgs[-1]['role']}")
    return msgs


# ---- corpus --------------------------------------------------------------------------------------------------
def load_corpus(src, world_cfg, cache_dir) -> tuple[list[str], int]:
    """Pretraining documents (format "text")."""
    _check_format(src, "corpus", ("text",))
    field = _opt(src, "field") or "text"
    rows = (
        _world_rows(src, world_cfg, cache_dir, "corpus", "train")
        if _opt(src, "kind") == "world"
        else _rows(src, _opt(src, "split", "train"), (field,))
    )
    return _collect(rows, lambda rec, at: [_content(_get(rec, field, at), at, field)], src, "corpus")


# ---- SFT -----------------------------------------------------------------------------------------------------
def load_sft(src, world_cfg, cache_dir) -> tuple[list[dict], int]:
    """Demonstrations, normalised to {"messages": [...]} ending with an assistant turn."""
    fmt = _check_format(src, "sft", ("messages", "prompt_completion"))
    field = _opt(src, "field") or "messages"

    def convert(rec, at):
        if fmt == "messages" or (fmt == "auto" and "completion" not in rec):
            return [
                {"messages": _ends_with(_checked_messages(_get(rec, field, at), at, field), "assistant", at, field)}
            ]
        prompt = _ends_with(_turns(_get(rec, "prompt", at), at, "prompt", "user"), "user", at, "prompt")
        completion = _turns(_get(rec, "completion", at), at, "completion", "assistant")
        if any(m["role"] != "assistant" for m in completion):
            raise at.error("completion", "must contain only assistant turns")
        return [{"messages": prompt + completion}]

    split = _opt(src, "split", "train")
    rows = _world_rows(src, world_cfg, cache_dir, "sft", split) if _opt(src, "kind") == "world" else _rows(src, split)
    return _collect(rows, convert, src, "SFT")


# ---- prompts -------------------------------------------------------------------------------------------------
def load_prompts(src, world_cfg, cache_dir) -> tuple[list[dict], int]:
    """Prompts for the policy, [{"messages": [... ending with a user turn]}]."""
    fmt = _check_format(src, "prompts", ("prompts", "messages", "prompt"))
    field = _opt(src, "field")

    def convert(rec, at):
        col = field or (
            "prompt" if fmt == "prompt" or (fmt in ("auto", "prompts") and "messages" not in rec) else "messages"
        )
        msgs = _turns(_get(rec, col, at), at, col, "user")
        while msgs and msgs[-1]["role"] == "assistant":  # a finished dialogue: keep the question, drop the answer
            msgs = msgs[:-1]
        if not msgs:
            raise at.error(col, "has no user turn")
        return [{"messages": _ends_with(msgs, "user", at, col)}]

    split = _opt(src, "split", "ppo")
    rows = (
        _world_rows(src, world_cfg, cache_dir, "prompts", split) if _opt(src, "kind") == "world" else _rows(src, split)
    )
    return _collect(rows, convert, src, "prompt")


# ---- preferences ---------------------------------------------------------------------------------------------
def load_preferences(src, world_cfg, split_name: str | None = None) -> tuple[list[dict], int]:
    """Preference pairs {"prompt", "chosen", "rejected", "group", "gold_margin"} (see the module docstring).

    `split_name` (default: the source's split) picks reward_data/<split>.jsonl for kind "world", the hub split,
    or fills `{split}` in a local path. Kind "world" with a non-default world config regenerates the ranked data
    for that world in memory, so the labels always come from the same world the gold oracle scores.
    """
    fmt = _check_format(src, "preferences", ("pairs", "hh", "ranked"))
    split = split_name or _opt(src, "split", "train")
    if _opt(src, "kind") == "world":
        return world_preferences(src, world_cfg, split)

    def convert(rec, at):
        f = (
            fmt
            if fmt != "auto"
            else "ranked"
            if "responses" in rec
            else "pairs"
            if "prompt" in rec or not isinstance(rec.get("chosen"), str)
            else "hh"
        )
        return {"pairs": _pair, "hh": _hh_pair, "ranked": _ranked_pairs}[f](rec, at)

    return _collect(_rows(src, split), convert, src, "preference")


def _pair(rec, at) -> list[dict]:
    if "prompt" in rec:
        prompt = _ends_with(_turns(_get(rec, "prompt", at), at, "prompt", "user"), "user", at, "prompt")
        chosen = _turns(_get(rec, "chosen", at), at, "chosen", "assistant")
        rejected = _turns(_get(rec, "rejected", at), at, "rejected", "assistant")
        return _checked_pair(prompt, chosen, rejected, at)
    return _split_shared(
        _checked_messages(_get(rec, "chosen", at), at, "chosen"),
        _checked_messages(_get(rec, "rejected", at), at, "rejected"),
        at,
    )


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _hh_turns(text, at: _At, field: str) -> list[dict]:
    if not isinstance(text, str):
        raise at.error(field, f"expected an HH transcript string, got {type(text).__name__}")
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text.lstrip())
    if parts[0].strip() or len(parts) < 3:
        raise at.error(field, "not an HH transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    turns = [
        {"role": "user" if who == "Human" else "assistant", "content": body.strip()}
        for who, body in zip(parts[1::2], parts[2::2])
    ]
    return _checked_messages(turns, at, field)


def _hh_pair(rec, at) -> list[dict]:
    return _split_shared(
        _hh_turns(_get(rec, "chosen", at), at, "chosen"), _hh_turns(_get(rec, "rejected", at), at, "rejected"), at
    )


def _split_shared(chosen: list[dict], rejected: list[dict], at: _At) -> list[dict]:
    """Implicit prompt: the longest shared prefix that ends with a user turn."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k and chosen[k - 1]["role"] != "user":
        k -= 1
    if chosen == rejected:
        raise at.error("rejected", "identical to chosen")
    if not k:
        raise at.error("chosen", "chosen and rejected share no prompt ending with a user turn")
    return _checked_pair(chosen[:k], chosen[k:], rejected[k:], at)


def _checked_pair(prompt, chosen, rejected, at: _At, group: str | None = None, margin=None) -> list[dict]:
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs:
            raise at.error(name, "has no response after the prompt")
        _ends_with(msgs, "assistant", at, name)
    if chosen == rejected:
        raise at.error("rejected", "identical to chosen")
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "group": group or at.id, "gold_margin": margin}]


def _ranked_pairs(rec, at) -> list[dict]:

    prompt = _ends_with(_turns(_get(rec, "prompt", at), at, "prompt", "user"), "user", at, "prompt")
    responses, ranks = _get(rec, "responses", at), _get(rec, "ranks", at)
    if not isinstance(responses, list) or len(responses) < 2:
        raise at.error("responses", "expected a list of at least 2 responses")
    responses = [_content(r, at, f"responses[{i}]") for i, r in enumerate(responses)]
    if (
        not isinstance(ranks, list)
        or len(ranks) != len(responses)
        or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)
    ):
        raise at.error("ranks", f"expected {len(responses)} integer ranks, one per response")
    gold = rec.get("gold_scores")
    if gold is not None and (
        not isinstance(gold, list) or len(gold) != len(responses) or not all(isinstance(g, (int, float)) for g in gold)
    ):
        raise at.error("gold_scores", f"expected {len(responses)} numbers, one per response")
    group = str(rec.get("id") or at.id)
    return expand_pairs([{"id": group, "prompt": prompt, "responses": responses, "ranks": ranks, "gold_scores": gold}])


def world_preferences(src, world_cfg, split: str) -> tuple[list[dict], int]:
    """reward_data/<split>.jsonl, or the first N records of it: records are drawn one after another from one random
    stream, so a smaller reward_prompts is a prefix of the shipped file. A different world is generated afresh."""
    from pipeline.core.config import WorldConfig
    from pipeline.world.datasets import as_world_config, ranked_prompts

    if split not in ("train", "test"):
        raise UserError(f"world preference split '{split}': expected train or test")
    cfg, shipped = as_world_config(world_cfg), WorldConfig()
    n = cfg.reward_prompts if split == "train" else cfg.reward_test_prompts
    path = Path(_opt(src, "path") or REPO_ROOT / "reward_data" / f"{split}.jsonl")
    same_world = [getattr(cfg, f) == getattr(shipped, f) for f in ("seed", "n_entities", "k", "label_temperature")]
    if _opt(src, "path") or all(same_world):
        if not path.is_file():
            raise UserError(f"{path}: no such file (regenerate with: python -m pipeline.world.datasets reward-data)")
        rows = list(itertools.islice(_jsonl(path), None if _opt(src, "path") else n))
        if _opt(src, "path") or len(rows) == n:
            return _collect(rows, _ranked_pairs, src, f"preference ({path})")
    return expand_pairs(ranked_prompts(cfg, split)), 0


# ---- the synthetic world -------------------------------------------------------------------------------------
def _world_rows(src, world_cfg, cache_dir, what: str, split: str) -> Iterator[tuple[_At, object]]:
    from pipeline.world.datasets import materialise

    name = _WORLD_FILE.get((what, split))
    if name is None:
        options = sorted(s for w, s in _WORLD_FILE if w == what)
        raise UserError(f"world {what} split '{split}': expected one of {', '.join(options)}")
    yield from _jsonl(materialise(world_cfg, cache_dir)[name])


def _check_format(src, loader: str, formats: tuple[str, ...]) -> str:
    fmt = _opt(src, "format") or "auto"
    if fmt != "auto" and fmt not in formats:
        raise UserError(f"{loader} data: format '{fmt}' is not one of auto, {', '.join(formats)}")
    return formats[0] if fmt == "auto" and len(formats) == 1 else fmt


# ---- token lengths (called by the stages, which own the tokenizer) ------------------------------------------
def check_prompt_lengths(
    records: list[dict], tokenizer, max_len: int, on_bad_record: str, where: str
) -> tuple[list[dict], int]:
    """Keep records whose prompt (chat-templated, with the generation prompt) fits in `max_len` tokens.

    A record's prompt is its "prompt" (preferences) or its "messages" up to the last user turn (SFT, prompts).
    Too long: a UserError naming `where`, the record number and the length, or with on_bad_record="skip", dropped
    and counted.
    """
    kept, skipped = [], 0
    for i, rec in enumerate(records):
        msgs = rec.get("prompt") or rec["messages"]
        last_user = max(j for j, m in enumerate(msgs) if m["role"] == "user")
        n = _n_tokens(tokenizer, msgs[: last_user + 1])
        if n <= max_len:
            kept.append(rec)
        elif on_bad_record == "skip":
            skipped += 1
        else:
            raise UserError(
                f"{where}: record {i + 1}: field 'prompt': {n} tokens, longer than the limit of "
                f"{max_len} (raise the limit, shorten the data, or set on_bad_record=skip)"
            )
    return kept, skipped


def _n_tokens(tokenizer, msgs: list[dict]) -> int:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
    else:
        ids = tokenizer("\n".join(m["content"] for m in msgs), add_special_tokens=True)["input_ids"]
    return len(ids)
