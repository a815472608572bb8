"""SQuAD v2: the JSON loader, windowed features, and post-processing plus scoring end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loralab.errors import LoralabError
from loralab.tasks.squad_v2 import SquadV2Task, postprocess_qa, read_squad_json

TASK = SquadV2Task()

# -- loading ----------------------------------------------------------------------------------

LONG_CONTEXT = (
    "In the north of the valley there is an old mill . The mill was built in 1820 by a "
    "farmer named Tom Hale . Water from the river turns the big wooden wheel every day . "
    "Children visit the mill in summer to watch the wheel and to buy fresh bread . "
    "The bread is baked with flour from the mill and sold at the red door ."
)
SHORT_CONTEXT = "Anna keeps three grey cats in a small flat ."


def _squad_doc() -> dict:
    def qa(qid, question, answer=None, context=LONG_CONTEXT):
        if answer is None:
            plausible = [{"text": "Tom Hale", "answer_start": context.find("Tom Hale")}]
            return {
                "id": qid,
                "question": question,
                "answers": [],
                "plausible_answers": plausible,
                "is_impossible": True,
            }
        start = context.index(answer)
        return {
            "id": qid,
            "question": question,
            "answers": [{"text": answer, "answer_start": start}] * 2,
            "is_impossible": False,
        }

    return {
        "version": "v2.0",
        "data": [
            {
                "title": "Mill",
                "paragraphs": [
                    {
                        "context": LONG_CONTEXT,
                        "qas": [
                            qa("m1", "Where is the old mill ?", "north of the valley"),
                            qa("m2", "Who built the mill ?", "Tom Hale"),
                            qa("m3", "  Where is the bread sold ?", "at the red door"),
                            qa("m4", "Who sold the mill in 1900 ?"),
                        ],
                    }
                ],
            },
            {
                "title": "Cats",
                "paragraphs": [
                    {
                        "context": SHORT_CONTEXT,
                        "qas": [
                            qa("c1", "How many cats does Anna keep ?", "three", SHORT_CONTEXT),
                            qa("c2", "What is the name of the dog ?", None, SHORT_CONTEXT),
                        ],
                    }
                ],
            },
        ],
    }


def _write(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


GOLD = {"m1": "north of the valley", "m2": "Tom Hale", "m3": "at the red door", "c1": "three"}


@pytest.fixture
def raw(tmp_path):
    return TASK.load("eval", file=str(_write(tmp_path / "dev.json", _squad_doc())))


def test_loader_reads_answerable_and_impossible(raw):
    assert raw.column_names == ["id", "question", "context", "answers"]
    assert raw["id"] == ["m1", "m2", "m3", "m4", "c1", "c2"]
    row = raw[1]
    assert row["context"] == LONG_CONTEXT
    assert row["answers"] == {
        "text": ["Tom Hale"] * 2,
        "answer_start": [LONG_CONTEXT.index("Tom Hale")] * 2,
    }
    assert raw[3]["answers"] == {"text": [], "answer_start": []}  # plausible_answers ignored
    assert raw[5]["answers"] == {"text": [], "answer_start": []}
    assert raw[4]["context"] == SHORT_CONTEXT


def test_loader_finds_files_in_data_dir(tmp_path):
    _write(tmp_path / "squad_v2" / "train-v2.0.json", _squad_doc())
    doc = _squad_doc()
    doc["data"] = doc["data"][1:]
    _write(tmp_path / "squad_v2" / "dev-v2.0.json", doc)
    assert len(TASK.load("train", data_dir=str(tmp_path))) == 6
    assert len(TASK.load("eval", data_dir=str(tmp_path))) == 2
    with pytest.raises(LoralabError, match="dev-v2.0.json"):
        TASK.load("eval", data_dir=str(tmp_path / "squad_v2" / "nowhere"))


def test_offline_split_never_evaluates_on_the_dev_superset(tmp_path):
    # eval-offline.json + train-offline.json are a split of dev-v2.0.json: keep them paired.
    full = _squad_doc()
    train = dict(full, data=full["data"][:1])
    evals = dict(full, data=full["data"][1:])
    for name, doc in (
        ("dev-v2.0.json", full),
        ("train-offline.json", train),
        ("eval-offline.json", evals),
    ):
        _write(tmp_path / name, doc)
    assert TASK.load("train", data_dir=str(tmp_path))["id"] == ["m1", "m2", "m3", "m4"]
    assert TASK.load("eval", data_dir=str(tmp_path))["id"] == ["c1", "c2"]
    # With the official training file present, dev-v2.0.json is the evaluation set.
    _write(tmp_path / "train-v2.0.json", train)
    assert len(TASK.load("eval", data_dir=str(tmp_path))) == 6


def test_an_offline_training_file_evaluates_on_its_own_half(tmp_path, monkeypatch):
    """data.train_file=train-offline.json without an evaluation file: the eval-offline.json
    beside it (the dev split, the hub's or a folder's, holds its training questions); none
    beside it is a user error, never the hub. Through the loader every command uses."""
    from loralab.config import build_config
    from loralab.data import eval_split
    from loralab.models import load_tokenizer

    full = _squad_doc()
    train = _write(tmp_path / "a" / "train-offline.json", dict(full, data=full["data"][:1]))
    _write(tmp_path / "a" / "eval-offline.json", dict(full, data=full["data"][1:]))
    _write(tmp_path / "dev" / "dev-v2.0.json", full)
    monkeypatch.setattr(TASK, "_load_hub", lambda split: pytest.fail(f"hub asked for {split}"))
    tok = load_tokenizer("tiny-llama", progress=False)
    for data_dir in ([], [f"data.data_dir={tmp_path / 'dev'}"]):
        cfg = build_config(overrides=["data.task=squad_v2", f"data.train_file={train}", *data_dir])
        raw, _ = eval_split(TASK, cfg.data, tok, causal=True, progress=False)
        assert raw["id"] == ["c1", "c2"]
    explicit = build_config(overrides=["data.task=squad_v2", f"data.train_file={train}",
                                       f"data.eval_file={tmp_path / 'dev' / 'dev-v2.0.json'}"])  # fmt: skip
    assert TASK.eval_file_for(explicit.data.train_file, explicit.data.eval_file).endswith(
        "dev-v2.0.json"
    )
    (tmp_path / "a" / "eval-offline.json").unlink()
    with pytest.raises(LoralabError, match="offline split's training half"):
        eval_split(TASK, build_config(overrides=["data.task=squad_v2", f"data.train_file={train}"]).data, tok, causal=True)  # fmt: skip


def _broken(edit) -> dict:
    doc = _squad_doc()
    edit(doc)
    return doc


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ('{"data": [', "line 1"),
        (_broken(lambda d: d["data"][1]["paragraphs"][0]["qas"][1].pop("question")),
         r"data\[1\]\.paragraphs\[0\]\.qas\[1\] has no 'question'"),
        (_broken(lambda d: d["data"][0]["paragraphs"][0].pop("context")),
         r"data\[0\]\.paragraphs\[0\] has no 'context'"),
        (_broken(lambda d: d["data"][0]["paragraphs"][0]["qas"][1]["answers"][0].update(answer_start=3)),
         r"data\[0\]\.paragraphs\[0\]\.qas\[1\]\.answers\[0\] says the answer 'Tom Hale' starts at character 3"),
        (_broken(lambda d: d["data"][0]["paragraphs"][0]["qas"][3].update(answers=[{"text": "a", "answer_start": 0}])),
         r"qas\[3\] is marked is_impossible"),
        (_broken(lambda d: d["data"][1]["paragraphs"][0]["qas"][0].update(id="m2")),
         r"data\[1\]\.paragraphs\[0\]\.qas\[0\] reuses the id 'm2' of data\[0\]\.paragraphs\[0\]\.qas\[1\]"),
        (_broken(lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(question=7)),
         r"qas\[0\]\.question should be a string but is a number"),
        ({"data": []}, "holds no questions"),
        ([], "top level should be a JSON object"),
    ],
)  # fmt: skip
def test_malformed_files_name_the_file_and_the_place(tmp_path, doc, where):
    path = _write(tmp_path / "bad.json", doc)
    with pytest.raises(LoralabError, match=where) as info:
        TASK.load("train", file=str(path))
    assert str(path) in str(info.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(LoralabError, match="does not exist"):
        TASK.load("eval", file=str(tmp_path / "nope.json"))


# -- features and post-processing ------------------------------------------------------------


def _word_tokenizer(raw):
    """BERT-like fast tokenizer: whole words, [CLS] q [SEP] c [SEP], token_type_ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
    words = sorted(
        {w for text in list(raw["question"]) + list(raw["context"]) for w in text.split()}
    )
    vocab = {w: i for i, w in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="</s>",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _bpe_tokenizer(raw):
    """GPT-2-like fast tokenizer: byte-level BPE trained on the fly, no template, eos only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(list(raw["question"]) + list(raw["context"]), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


TOKENIZERS = {"word": _word_tokenizer, "bpe": _bpe_tokenizer}
WINDOW = {"word": (24, 6), "bpe": (32, 8)}  # (max_length, doc_stride): several windows


def _context_tokens(offsets):
    return [tuple(o) for o in offsets if o[0] >= 0]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_windows_labels_and_null_index(raw, kind, causal):
    tok = TOKENIZERS[kind](raw)
    max_length, stride = WINDOW[kind]
    train = TASK.featurize(raw, tok, max_length, stride, "train", causal)
    evals = TASK.featurize(raw, tok, max_length, stride, "eval", causal)
    assert len(train) == len(evals)  # the same windows, in the same order
    assert set(train.column_names) >= {
        "input_ids",
        "attention_mask",
        "start_positions",
        "end_positions",
        "null_index",
        "length",
    }
    assert ("token_type_ids" in train.column_names) == (kind == "word")
    assert {"example_id", "offset_mapping"} <= set(evals.column_names)
    assert "offset_mapping" not in train.column_names
    contexts = dict(zip(raw["id"], raw["context"], strict=True))
    by_example: dict[str, list[int]] = {}
    for i, row in enumerate(evals):
        by_example.setdefault(row["example_id"], []).append(i)
        trow = train[i]
        n = row["length"]
        assert n == len(row["input_ids"]) == len(row["offset_mapping"]) <= max_length
        assert trow["start_positions"] == row["start_positions"]
        assert trow["end_positions"] == row["end_positions"]
        if causal:
            assert row["input_ids"][-1] == tok.eos_token_id
            assert row["null_index"] == n - 1
            assert row["offset_mapping"][-1] == [-1, -1] and row["attention_mask"][-1] == 1
        else:
            assert row["null_index"] == 0
        null = row["null_index"]
        qid = row["example_id"]
        start, end = row["start_positions"], row["end_positions"]
        covered = _context_tokens(row["offset_mapping"])
        context = contexts[qid]
        if qid in GOLD:
            a = context.index(GOLD[qid])
            b = a + len(GOLD[qid])
            holds = covered[0][0] <= a and covered[-1][1] >= b
        else:
            holds = False
        if not holds:
            assert start == end == null
            continue
        offsets = row["offset_mapping"]
        assert context[offsets[start][0] : offsets[end][1]] == GOLD[qid]
        want = tok(GOLD[qid], add_special_tokens=False)["input_ids"]
        if kind == "word":
            assert row["input_ids"][start : end + 1] == want
        assert tok.decode(row["input_ids"][start : end + 1]).strip() == GOLD[qid]
    # The long context is split into overlapping windows; each answer is whole in some window.
    assert len(by_example["m1"]) >= 3 and len(by_example["c1"]) == 1
    for qid, rows in by_example.items():
        windows = [
            [
                t
                for t, o in zip(evals[i]["input_ids"], evals[i]["offset_mapping"], strict=True)
                if o[0] >= 0
            ]
            for i in rows
        ]
        for prev, nxt in zip(windows, windows[1:], strict=False):
            assert nxt[:stride] == prev[-stride:]  # `stride` tokens of overlap
        first = _context_tokens(evals[rows[0]]["offset_mapping"])
        last = _context_tokens(evals[rows[-1]]["offset_mapping"])
        assert first[0][0] == 0 and last[-1][1] == len(contexts[qid])
        if qid in GOLD:
            assert any(evals[i]["start_positions"] != evals[i]["null_index"] for i in rows)


def _oracle_logits(features, width_extra=3, seed=0):
    """Trainer-like logits: -100 past each feature's length, the maximum at the gold span
    (or at the null index), and a strong null in windows that do not hold the answer."""
    rng = np.random.default_rng(seed)
    width = max(features["length"]) + width_extra
    start = np.full((len(features), width), -100.0, dtype=np.float32)
    end = np.full_like(start, -100.0)
    for i, row in enumerate(features):
        n, null = row["length"], row["null_index"]
        start[i, :n] = rng.uniform(-1, 1, n)
        end[i, :n] = rng.uniform(-1, 1, n)
        s, e = row["start_positions"], row["end_positions"]
        if s == null:
            start[i, null] = end[i, null] = 5.0
        else:
            start[i, s] = end[i, e] = 9.0
            start[i, null] = end[i, null] = -2.0
    return start, end


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_postprocess_and_score_round_trip(raw, kind, causal):
    tok = TOKENIZERS[kind](raw)
    feats = TASK.featurize(raw, tok, *WINDOW[kind], "eval", causal)
    feats = feats.shuffle(seed=1)  # features need not follow raw's order
    start, end = _oracle_logits(feats)
    answers = postprocess_qa(raw, feats, start, end)
    assert answers == {qid: GOLD.get(qid, "") for qid in raw["id"]}
    scores = TASK.score(raw, feats, (start, end))
    assert scores["exact"] == scores["f1"] == 100.0
    assert (scores["total"], scores["HasAns_total"], scores["NoAns_total"]) == (6, 4, 2)
    # A confident null everywhere turns every answer into "no answer".
    for i, null in enumerate(feats["null_index"]):
        start[i, null] = end[i, null] = 50.0
    scores = TASK.score(raw, feats, (start, end))
    assert scores["HasAns_exact"] == 0.0 and scores["NoAns_exact"] == 100.0
    # The spans are still the gold ones: the threshold search finds them (the official script's
    # best_f1), which tells this model apart from one without any span skill.
    assert scores["best_exact"] == scores["best_f1"] == 100.0
    assert scores["f1"] == 100.0 * 2 / 6


def test_featurize_rejects_bad_settings(raw):
    tok = _word_tokenizer(raw)
    with pytest.raises(LoralabError, match="doc_stride"):
        TASK.featurize(raw, tok, 24, 24, "train", False)
    # The question plus special tokens leave too little room for the stride.
    with pytest.raises(LoralabError, match="Raise max_length or lower doc_stride"):
        TASK.featurize(raw, tok, 16, 8, "train", False)


def test_read_squad_json_matches_load(tmp_path):
    path = _write(tmp_path / "d.json", _squad_doc())
    cols = read_squad_json(path)
    assert cols["id"] == ["m1", "m2", "m3", "m4", "c1", "c2"]
    assert cols["question"][2] == "  Where is the bread sold ?"  # stripped only when featurising


@pytest.mark.parametrize(("name", "causal"), [("tiny-bert", False), ("tiny-llama", True)])
def test_builtin_byte_level_tokenizers(raw, name, causal):
    from loralab.models import load_tokenizer

    tok = load_tokenizer(name, progress=False)
    feats = TASK.featurize(raw, tok, 64, 16, "eval", causal)
    start, end = _oracle_logits(feats)
    answers = postprocess_qa(raw, feats, start, end)
    assert answers == {qid: GOLD.get(qid, "") for qid in raw["id"]}
