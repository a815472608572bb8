"""The causal-LM formulation on a tiny Llama: masking, verbalizer scoring, prompts, generation."""

from __future__ import annotations

import json
import re

import pytest
import torch

from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.heads import prompting as lm
from loralab.models import load_model, load_tokenizer
from loralab.tasks import get_task

pytestmark = pytest.mark.precision  # run once in bf16 and once in fp32 (conftest.py)

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def tok():
    t = load_tokenizer("tiny-llama", progress=False)
    t.padding_side = "right"
    return t


def _prompting(task, tok, *overrides):
    cfg = build_config(overrides=[f"data.task={task.name}", *overrides])
    return lm.prompting_for(task, cfg.data, tok)


def test_only_target_tokens_carry_loss(tok, sst2_dir):
    task = get_task("sst2")
    p = _prompting(task, tok)
    raw = task.load("train", data_dir=str(sst2_dir)).select(range(4))
    feats = lm.featurize(task, raw, tok, 128, "train", p)
    for row, ex in zip(feats, raw, strict=True):
        prompt = tok(f"Review: {ex['text_a'].strip()}\nSentiment:")["input_ids"]
        target = tok(p.verbalizers[ex["label"]], add_special_tokens=False)["input_ids"]
        target += [tok.eos_token_id]
        assert row["input_ids"] == prompt + target
        assert row["labels"] == [-100] * len(prompt) + target


def test_chat_and_plain_prompts(tok):
    task = get_task("sst2")
    plain = lm.prompt_ids(tok, "Review: ok\nSentiment:", chat=False)
    assert plain == tok("Review: ok\nSentiment:")["input_ids"] and plain[0] == tok.bos_token_id
    tok.chat_template = CHAT
    p = _prompting(task, tok)
    assert p.chat
    chat = lm.prompt_ids(tok, "Review: ok\nSentiment:", chat=True)
    expected = tok("<|user|>Review: ok\nSentiment:</s><|assistant|>", add_special_tokens=False)[
        "input_ids"
    ]
    assert chat == expected
    # After a chat header the verbalizer has no leading space.
    assert (
        lm.target_ids(tok, " positive", chat=True)
        == tok("positive", add_special_tokens=False)["input_ids"]
    )
    assert not _prompting(task, tok, "data.chat_template=false").chat


def test_verbalizer_scoring_picks_highest_summed_log_prob(tok):
    model, _ = load_model(
        "tiny-llama", __import__("transformers").AutoModelForCausalLM, progress=False
    )
    model.eval()
    task = get_task("sst2")
    # Multi-token verbalizers of different lengths.
    p = lm.Prompting("Review: {text_a}\nSentiment:", (" not good at all", " good"), chat=False)
    prompts = [tok(f"Review: {s}\nSentiment:")["input_ids"] for s in ("fine", "a dull film", "xyz")]
    feats = {"input_ids": prompts}
    scores = lm.score_verbalizers(model, tok, feats, p, batch_size=4, progress=False)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for j, word in enumerate(p.verbalizers):
                cand = tok(word, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prompt + cand])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                manual = sum(logp[len(prompt) - 1 + k, c].item() for k, c in enumerate(cand))
                assert scores[i, j] == pytest.approx(manual, abs=1e-4)
    assert task.num_labels == scores.shape[1]


def test_generation_maps_unanswerable_to_empty(tok):
    assert lm.normalise_generation(" unanswerable\nmore") == ""
    assert lm.normalise_generation("Unanswerable.") == ""
    assert lm.normalise_generation(" the Normans \n") == "the Normans"
    model, _ = load_model(
        "tiny-llama", __import__("transformers").AutoModelForCausalLM, progress=False
    )
    feats = {
        "input_ids": [tok("Q: a?")["input_ids"], tok("Q: longer one?")["input_ids"]],
        "example_id": ["a", "b"],
    }
    out = lm.generate_answers(model, tok, feats, batch_size=2, max_new_tokens=3, progress=False)
    assert set(out) == {"a", "b"} and all(isinstance(v, str) for v in out.values())


def test_generated_answers_are_the_new_tokens_of_left_padded_prompts(tok):
    # A stub that "generates" known continuations: the answers must be exactly those (not the
    # prompt), from prompts padded on the left so every row continues from its last real token.
    answers = {"a": " the Normans\nand more", "b": " unanswerable."}
    prompts = {
        "a": tok("Q: who?")["input_ids"],
        "b": tok("Q: a much longer question?")["input_ids"],
    }

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.masks = []

        def generate(self, input_ids, attention_mask, **kw):
            self.masks.append(attention_mask)
            rows = []
            for ids, mask in zip(input_ids, attention_mask, strict=True):
                real = ids[mask.bool()].tolist()
                key = next(k for k, p in prompts.items() if p == real)
                rows.append(ids.tolist() + tok(answers[key], add_special_tokens=False)["input_ids"])
            width = max(map(len, rows))
            return torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])

    stub = Stub()
    feats = {"input_ids": list(prompts.values()), "example_id": list(prompts)}
    out = lm.generate_answers(stub, tok, feats, batch_size=2, progress=False)
    assert out == {"a": "the Normans", "b": ""}
    (mask,) = stub.masks
    assert mask[:, -1].all() and not mask[0, 0]  # left padding: the shorter prompt's pads lead


@pytest.mark.parametrize(
    "override, needle",
    [
        ('data.verbalizers=["", " good"]', "tokenises to nothing"),
        ('data.verbalizers=[" good", " good"]', "share a verbalizer"),
        ('data.verbalizers=[" good"]', "2 labels"),
        ("data.prompt='Say {text_b}:'", "{text_a}"),
        # Were tracebacks (ValueError) inside the tokenising, after the model loaded:
        ("data.prompt='Review {text_a} {'", "not a valid template (Single '{' encountered"),
        ("data.prompt='Review {text_a} }'", "literal braces are written twice"),
        ("data.prompt='Review {text_a!x}'", "not a valid template"),
        ("data.prompt='Review {text_a:d}'", "not a valid template"),
        ("data.prompt=''", "data.prompt is empty"),
    ],
)
def test_bad_prompting_is_a_user_error(tok, override, needle):
    with pytest.raises(LoralabError, match=re.escape(needle)):
        _prompting(get_task("sst2"), tok, override)


def test_lm_head_training_run(tmp_path, sst2_dir):
    from loralab.train import train

    cfg = build_config(
        overrides=[
            "model.name=tiny-llama",
            "model.head=lm",
            f"data.data_dir={sst2_dir}",
            f"run.output_dir={tmp_path}",
            "run.name=r",
            "train.max_steps=6",
            "train.batch_size=8",
            "train.lr=1e-2",
            "train.eval_steps=3",  # scored by the head's own loop, not the Trainer's
            "train.save_steps=3",
        ]  # fmt: skip
    )
    result = train(cfg, quiet=True)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["head"] == "lm" and "accuracy" in summary["zero_shot"]
    assert 0 <= summary["metrics"]["accuracy"] <= 1
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {x["step"]: x["eval/accuracy"] for x in lines if "eval/accuracy" in x}
    assert sorted(evals) == [3, 6]  # the last one scored the final weights, as the summary does
    assert evals[6] == summary["metrics"]["accuracy"]
    assert summary["params"]["head"] == 0 and summary["verification"]["base_unchanged"]
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()
    assert (
        json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())["task_type"]
        == "CAUSAL_LM"
    )
    # Interrupted after its step-3 checkpoint (its summary and later files gone): the resume
    # measures nothing at step 0 again and keeps the zero-shot score logged there.
    import shutil

    from loralab.cli import main

    run = result.run_dir
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "checkpoint-6")
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-3")
    assert resumed["zero_shot"] == summary["zero_shot"]


def test_target_loss_uses_only_target_positions(tok):
    model, _ = load_model(
        "tiny-llama", __import__("transformers").AutoModelForCausalLM, progress=False
    )
    ids = torch.tensor([tok("Review: ok\nSentiment: good")["input_ids"]])
    labels = torch.full_like(ids, -100)
    labels[0, -2:] = ids[0, -2:]
    loss = lm.target_loss(
        model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    )
    ref = model(input_ids=ids, labels=labels).loss  # HF's full-vocabulary loss on the same targets
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_zero_shot_scores_the_base_whatever_the_lora_init(tmp_path):
    """init_lora_weights=false starts B non-zero: the wrapped model is not the base, so its
    score was no zero-shot score (0.505 vs 0.43 in a review's run). Both inits now report the
    base's, as an init that starts at the identity does."""
    from conftest import write_sst2

    from loralab.train import train

    data = write_sst2(tmp_path / "sst2", n_train=16, n_dev=200)
    scores = {}
    for init in ("true", "false"):
        cfg = build_config(overrides=[
            "model.name=tiny-llama", "model.head=lm", f"data.data_dir={data}",
            f"run.output_dir={tmp_path / init}", "train.max_steps=1", "train.batch_size=8",
            f"lora.init_lora_weights={init}", "train.precision=fp32",
        ])  # fmt: skip
        scores[init] = train(cfg, quiet=True).summary["zero_shot"]
    assert scores["true"] == scores["false"]


@pytest.mark.parametrize("chat", [False, True])
def test_an_over_long_pair_is_cut_inside_its_sentences_from_their_ends(tok, chat):
    """Each sentence of an over-long pair keeps its start (the longer one loses most) and the
    instruction stays whole. Cutting the rendered prompt in its middle joined the start of
    sentence 2 to its end: a sentence the data never said."""
    from datasets import Dataset

    if chat:
        tok.chat_template = CHAT
    task = get_task("mrpc")
    p = _prompting(task, tok)
    a = " ".join(f"a{i}" for i in range(60))
    b = " ".join(f"b{i}" for i in range(40))
    raw = Dataset.from_dict({"text_a": [a], "text_b": [b], "label": [1]})
    for split, budget in (("eval", 160), ("train", 160)):
        feats = lm.featurize(task, raw, tok, budget, split, p)
        ids = feats["input_ids"][0]
        assert len(ids) <= budget
        text = tok.decode(ids, skip_special_tokens=True)
        assert "Do both sentences say the same thing? Answer yes or no:" in text
        kept_a = text.split("Sentence 1: ", 1)[1].split("\nSentence 2: ", 1)[0]
        kept_b = text.split("Sentence 2: ", 1)[1].split("\nDo both", 1)[0]
        assert a.startswith(kept_a) and b.startswith(kept_b), (kept_a, kept_b)
        assert kept_b.startswith("b0 b1") and "b39" not in kept_b  # cut, from its end
        assert len(kept_a) < len(a) and len(kept_b) > 20  # the longer one cut first
        if split == "train":  # the answer follows the prompt, whole
            target = [t for t, y in zip(ids, feats["labels"][0], strict=True) if y != -100]
            assert target and ids[-len(target) :] == target


def test_an_over_long_squad_prompt_keeps_its_question(tok):
    """SQuAD's context is the field cut: the question and the instruction stay (the old cut
    kept 24 tokens of the end, the instruction alone)."""
    from datasets import Dataset

    task = get_task("squad_v2")
    p = _prompting(task, tok)
    context = " ".join(f"c{i}" for i in range(200))
    raw = Dataset.from_dict({"id": ["q1"], "context": [context], "question": ["Who built the mill?"],
                             "answers": [{"text": [], "answer_start": []}]})  # fmt: skip
    ids = lm.featurize(task, raw, tok, 128, "eval", p)["input_ids"][0]
    text = tok.decode(ids, skip_special_tokens=True)
    assert len(ids) <= 128 and "Question: Who built the mill?\nAnswer with words" in text
    assert text.split("Context: ", 1)[1].startswith("c0 c1 c2")


def test_the_chat_template_text_is_in_the_feature_cache_key(tok):
    """Two tokenizers with one tokenizer.json (a base and an instruct model) can differ in their
    chat template alone: their prompts must not share cached features."""
    task = get_task("sst2")
    tok.chat_template = CHAT
    one = _prompting(task, tok).key()
    tok.chat_template = CHAT.replace("<|assistant|>", "<|assistant|>\n")
    assert _prompting(task, tok).key() != one
    assert _prompting(task, tok, "data.chat_template=false").key()[3] is None  # unused: no part


def test_a_cut_inside_a_character_leaves_no_replacement_mark(tok):
    """Byte-level tokens: cutting a field inside a multi-byte character decoded to U+FFFD."""
    from datasets import Dataset

    task = get_task("squad_v2")
    p = _prompting(task, tok)
    context = "東京 " * 80  # 3-byte characters, a token per byte in the tiny tokenizer
    raw = Dataset.from_dict({"id": ["q"], "context": [context], "question": ["Where?"],
                             "answers": [{"text": [], "answer_start": []}]})  # fmt: skip
    for budget in range(100, 106):  # each of the three byte offsets in a character
        ids = lm.featurize(task, raw, tok, budget, "eval", p)["input_ids"][0]
        text = tok.decode(ids, skip_special_tokens=True)
        assert len(ids) <= budget and "\ufffd" not in text and "Question: Where?" in text
