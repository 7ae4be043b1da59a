import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.core.config import WorldConfig
from pipeline.core.errors import UserError
from pipeline.data.formats import check_prompt_lengths, load_corpus, load_preferences, load_prompts, load_sft
from pipeline.data.pairs import expand_pairs
from pipeline.world.datasets import ranked_prompts

FIX = Path(__file__).resolve().parent / "fixtures" / "formats"
SMALL = WorldConfig(
    seed=5,
    n_entities=60,
    corpus_docs=50,
    sft_dialogues=30,
    sft_eval_dialogues=10,
    reward_prompts=20,
    reward_test_prompts=10,
    eval_prompts=10,
    ppo_prompts=20,
)
DOCS = [
    "Bera works as a baker in Dunmere.",
    "Dunmere is a village in the north, famous for its honey.",
    "Tovi is a grey cat that belongs to Bera.",
]


def src(path=None, kind="local", format="auto", **kw):
    return SimpleNamespace(
        kind=kind,
        path=str(path) if path else None,
        name=None,
        split=kw.pop("split", "train"),
        format=format,
        field=kw.pop("field", None),
        on_bad_record=kw.pop("on_bad_record", "error"),
    )


def msg(role, content):
    return {"role": role, "content": content}


# ---- each loader on its fixture ------------------------------------------------------------------------------
def test_corpus_txt_jsonl_csv_parquet(tmp_path):
    docs, skipped = load_corpus(src(FIX / "corpus.txt", format="text"), None, tmp_path)
    assert skipped == 0 and docs == [
        "Bera works as a baker in Dunmere.\nBera's favourite food is plums.",
        "Dunmere is a village in the north,\nfamous for its honey.",
        DOCS[2],
    ]
    assert load_corpus(src(FIX / "corpus.jsonl"), None, tmp_path) == (DOCS, 0)
    assert load_corpus(src(FIX / "corpus.csv"), None, tmp_path) == (DOCS, 0)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS, "n": [1, 2, 3]}), tmp_path / "c.parquet")
    assert load_corpus(src(tmp_path / "c.parquet", field="body"), None, tmp_path) == (DOCS, 0)
    with pytest.raises(UserError, match=r"c\.parquet: field 'text': no such column \(columns: body, n\)"):
        load_corpus(src(tmp_path / "c.parquet"), None, tmp_path)
    globbed, _ = load_corpus(src(FIX / "corpus.*", format="text"), None, tmp_path)  # csv, jsonl, txt: sorted
    assert globbed[:6] == DOCS * 2 and len(globbed) == 9


def test_sft_messages_and_prompt_completion(tmp_path):
    rows, _ = load_sft(src(FIX / "sft_messages.jsonl", format="messages"), None, tmp_path)
    assert rows[0] == {"messages": [msg("user", "How old is Bera?"), msg("assistant", "Bera is 34 years old.")]}
    assert [m["role"] for m in rows[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    rows, _ = load_sft(src(FIX / "sft_prompt_completion.jsonl", format="prompt_completion"), None, tmp_path)
    assert rows == [
        {"messages": [msg("user", "How old is Bera?"), msg("assistant", "Bera is 34 years old.")]},
        {"messages": [msg("user", "Where does Bera live?"), msg("assistant", "Bera lives in Dunmere.")]},
    ]
    assert load_sft(src(FIX / "sft_prompt_completion.jsonl"), None, tmp_path)[0] == rows  # auto


def test_prompts(tmp_path):
    rows, _ = load_prompts(src(FIX / "prompts.jsonl", format="prompts"), None, tmp_path)
    assert rows == [
        {"messages": [msg("user", q)]} for q in ("How old is Bera?", "Where does Bera live?", "What colour is Tovi?")
    ]


@pytest.mark.parametrize(
    "name,fmt", [("pairs_conversational", "pairs"), ("pairs_plain", "pairs"), ("hh", "hh"), ("ranked", "ranked")]
)
def test_preferences(name, fmt):
    pairs, skipped = load_preferences(src(FIX / f"{name}.jsonl", format=fmt), None)
    assert skipped == 0 and pairs
    assert load_preferences(src(FIX / f"{name}.jsonl"), None) == (pairs, 0)  # auto-detected
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "group", "gold_margin"}
        assert p["prompt"][-1]["role"] == "user" and p["chosen"][-1]["role"] == p["rejected"][-1]["role"] == "assistant"
        assert p["chosen"] != p["rejected"]
    assert pairs[0]["prompt"] == [msg("user", "How old is Bera?")]
    assert pairs[0]["chosen"] == [msg("assistant", "Bera is 34 years old.")]
    if name == "hh":  # multi-turn: the shared prefix, up to the last user turn, is the prompt
        assert [m["content"] for m in pairs[1]["prompt"]] == ["What is 2 plus 3?", "5.", "And 2 times 3?"]
    if name == "ranked":  # 3 pairs from 3 responses; then 2 (a tie and a duplicate skipped)
        assert len(pairs) == 5 and pairs[0]["group"] == "q1" and pairs[0]["gold_margin"] == 0.4


def test_world_sources(tmp_path):
    corpus, _ = load_corpus(src(kind="world", format="text"), SMALL, tmp_path)
    sft, _ = load_sft(src(kind="world", format="messages"), SMALL, tmp_path)
    sft_eval, _ = load_sft(src(kind="world", format="messages", split="eval"), SMALL, tmp_path)
    ppo, _ = load_prompts(src(kind="world", format="prompts", split="ppo"), SMALL, tmp_path)
    ev, _ = load_prompts(src(kind="world", format="prompts", split="eval"), SMALL, tmp_path)
    assert (len(corpus), len(sft), len(sft_eval), len(ppo), len(ev)) == (50, 30, 10, 20, 10)
    with pytest.raises(UserError, match="split 'bogus'"):
        load_prompts(src(kind="world", split="bogus"), SMALL, tmp_path)
    # Shipped reward_data/ for the default world; a different world gets its own comparisons.
    shipped, _ = load_preferences(src(kind="world", format="ranked"), WorldConfig(), "test")
    assert len(shipped) == 300 * 6 and shipped[0]["group"] == "test-00000"
    own, _ = load_preferences(src(kind="world", format="ranked"), SMALL, "test")
    assert 0 < len(own) <= 10 * 6 and own[0]["prompt"] != shipped[0]["prompt"]
    # Fewer prompts from the shipped world: a prefix of the file, identical to generating them.
    fewer = WorldConfig(reward_test_prompts=7)
    prefix, _ = load_preferences(src(kind="world", format="ranked"), fewer, "test")
    assert prefix == shipped[: len(prefix)] == expand_pairs(ranked_prompts(fewer, "test"))


# ---- bad input: one line naming file, line and field; or skipped and counted ---------------------------------
BAD = [  # (loader, format, bad line, field named in the error)
    ("sft", "messages", '{"messages": [{"role": "user", "content": "Hi?"}', None),  # malformed JSON
    ("sft", "messages", json.dumps({"msgs": []}), "messages"),  # missing field
    (
        "sft",
        "messages",
        json.dumps({"messages": [msg("human", "Hi?"), msg("assistant", "Hello.")]}),
        "messages[0].role",
    ),
    ("sft", "messages", json.dumps({"messages": [msg("user", "Hi?"), msg("assistant", "  ")]}), "messages[1].content"),
    ("sft", "messages", json.dumps({"messages": [msg("user", "Hi?"), msg("assistant", 42)]}), "messages[1].content"),
    ("sft", "messages", json.dumps({"messages": [msg("user", "Hi?")]}), "messages"),  # no answer to learn
    ("sft", "prompt_completion", json.dumps({"prompt": "Hi?"}), "completion"),
    ("prompts", "prompts", json.dumps({"prompt": ""}), "prompt"),
    ("pairs", "pairs", json.dumps({"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}), "rejected"),
    ("pairs", "pairs", json.dumps({"prompt": "Q?", "chosen": ["x"], "rejected": "No."}), "chosen[0]"),
    ("pairs", "hh", json.dumps({"chosen": "Human says hi", "rejected": "\n\nHuman: Q\n\nAssistant: A"}), "chosen"),
    (
        "pairs",
        "hh",
        json.dumps({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant:"}),
        "rejected[1].content",
    ),
    ("pairs", "ranked", json.dumps({"prompt": "Q?", "responses": ["a", "b"], "ranks": [0]}), "ranks"),
    ("pairs", "ranked", json.dumps({"prompt": "Q?", "responses": ["a", 3], "ranks": [0, 1]}), "responses[1]"),
]
LOADERS = {
    "sft": lambda s, d: load_sft(s, None, d),
    "prompts": lambda s, d: load_prompts(s, None, d),
    "pairs": lambda s, d: load_preferences(s, None),
}
GOOD = {
    "messages": {"messages": [msg("user", "Hi?"), msg("assistant", "Hello.")]},
    "prompt_completion": {"prompt": "Hi?", "completion": "Hello."},
    "prompts": {"prompt": "Hi?"},
    "pairs": {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
    "hh": {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"},
    "ranked": {"prompt": "Q?", "responses": ["a", "b"], "ranks": [1, 0]},
}


@pytest.mark.parametrize("loader,fmt,bad,field", BAD)
def test_bad_record_is_one_clear_line_or_skipped(tmp_path, loader, fmt, bad, field):
    good = json.dumps(GOOD[fmt])
    f = tmp_path / "data.jsonl"
    f.write_text(f"{good}\n\n{bad}\n{good}\n")  # the bad record is on line 3
    with pytest.raises(UserError) as e:
        LOADERS[loader](src(f, format=fmt), tmp_path)
    text = str(e.value)
    assert "\n" not in text and f"{f}:3: " in text, text
    assert field is None or f"field '{field}'" in text, text
    rows, skipped = LOADERS[loader](src(f, format=fmt, on_bad_record="skip"), tmp_path)
    assert skipped == 1 and len(rows) == 2


def test_csv_rows_report_their_line(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("text,n\nfine,1\n,2\nalso fine,3\n")
    with pytest.raises(UserError, match=r"c\.csv:3: field 'text': missing"):
        load_corpus(src(f), None, tmp_path)
    assert load_corpus(src(f, on_bad_record="skip"), None, tmp_path) == (["fine", "also fine"], 1)


def test_source_level_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="matches no files"):
        load_corpus(src(tmp_path / "nope*.jsonl"), None, tmp_path)
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(UserError, match="unsupported file type '.xml'"):
        load_corpus(src(tmp_path / "x.xml"), None, tmp_path)
    with pytest.raises(UserError, match="format 'hh' is not one of"):
        load_sft(src(FIX / "hh.jsonl", format="hh"), None, tmp_path)
    (tmp_path / "all_bad.jsonl").write_text("[1]\n")
    with pytest.raises(UserError, match=r"no usable corpus records in .*all_bad.jsonl \(1 bad ones skipped\)"):
        load_corpus(src(tmp_path / "all_bad.jsonl", on_bad_record="skip"), None, tmp_path)
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as e:
        load_corpus(src("nobody/no-such-dataset", kind="hub"), None, tmp_path)
    assert str(e.value).startswith("cannot load dataset 'nobody/no-such-dataset' split 'train' (offline?)")
    assert "\n" not in str(e.value)


def test_check_prompt_lengths():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "a", "b", "user", "assistant"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    records = [
        {"messages": [msg("user", "a b")]},
        {"messages": [msg("user", "a " * 20), msg("assistant", "b")]},
        {"prompt": [msg("user", "a")], "chosen": [msg("assistant", "b " * 50)]},
    ]
    for template in (
        None,
        "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}assistant{% endif %}",
    ):
        tok.chat_template = template
        kept, skipped = check_prompt_lengths(records, tok, 10, "skip", "sft data")
        assert skipped == 1 and kept == [records[0], records[2]]  # only prompts count, not the answers
        with pytest.raises(UserError, match=r"^sft data: record 2: field 'prompt': (20|22) tokens, longer than"):
            check_prompt_lengths(records, tok, 10, "error", "sft data")


def test_fresh_pairs_repeated_to_their_share_by_hand():
    """iterate.fresh_share: 900 older pairs and 100 fresh ones at a share of 0.5 -> 9 copies (900 of 1800); 0.25 ->
    3 (300 of 1200); no share, or no fresh pairs -> once. Each copy of a ranking is a group of its own."""
    from pipeline.data.pairs import fresh_copies, repeat_pairs

    assert fresh_copies(900, 100, 0.5) == 9 and fresh_copies(900, 100, 0.25) == 3
    assert fresh_copies(900, 100, None) == fresh_copies(900, 0, 0.5) == 1
    assert fresh_copies(100, 900, 0.1) == 1  # already more than the share: never fewer than the pairs themselves
    fresh = [{"prompt": "Q?", "chosen": "a", "rejected": "b", "group": "round2-0"}]
    fresh.append({**fresh[0], "chosen": "c", "group": "round2-1"})
    out = repeat_pairs(fresh, 3)
    assert [p["group"] for p in out] == ["round2-0", "round2-1", "round2-0#1", "round2-1#1", "round2-0#2", "round2-1#2"]
    assert [p["chosen"] for p in out] == ["a", "c"] * 3 and repeat_pairs(fresh, 1) == fresh
