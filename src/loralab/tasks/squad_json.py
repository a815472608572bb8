"""Reading SQuAD v2.0 JSON into the canonical QA columns, with errors that say where."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LoralabError

RAW_COLUMNS = ("id", "question", "context", "answers")
SHAPE_HINT = (
    'A SQuAD v2.0 file is one JSON object {"version": "v2.0", "data": [{"title": ..., '
    '"paragraphs": [{"context": "...", "qas": [{"id": "...", "question": "...", '
    '"is_impossible": false, "answers": [{"text": "...", "answer_start": 0}]}]}]}]}.'
)

# -- reading SQuAD v2.0 JSON --------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


class _Reader:
    """Walks a parsed SQuAD file; every complaint names the file and the place inside it."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, problem: str) -> LoralabError:
        return LoralabError(f"{self.path}: {where} {problem} {SHAPE_HINT}")

    def field(self, obj: Any, key: str, kinds: tuple[type, ...], what: str, where: str) -> Any:
        if not isinstance(obj, dict):
            raise self.fail(where, f"should be a JSON object but is {_json_type(obj)}.")
        if key not in obj:
            raise self.fail(where, f"has no '{key}'.")
        value = obj[key]
        bad_bool = isinstance(value, bool) and bool not in kinds
        if not isinstance(value, kinds) or bad_bool:
            raise self.fail(f"{where}.{key}", f"should be {what} but is {_json_type(value)}.")
        return value

    def read(self) -> dict[str, list]:
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise LoralabError(
                f"{self.path} is not UTF-8 text (byte {exc.start} cannot be decoded). "
                f"Expected a SQuAD v2.0 JSON file."
            ) from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LoralabError(
                f"{self.path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
                f"{SHAPE_HINT}"
            ) from None
        if not isinstance(doc, dict):
            raise self.fail("the top level", f"should be a JSON object but is {_json_type(doc)}.")
        cols: dict[str, list] = {c: [] for c in RAW_COLUMNS}
        seen: dict[str, str] = {}
        articles = self.field(doc, "data", (list,), "a list of articles", "the top level")
        for a, article in enumerate(articles):
            where_a = f"data[{a}]"
            paragraphs = self.field(article, "paragraphs", (list,), "a list", where_a)
            for p, paragraph in enumerate(paragraphs):
                where_p = f"{where_a}.paragraphs[{p}]"
                context = self.field(paragraph, "context", (str,), "a string", where_p)
                qas = self.field(paragraph, "qas", (list,), "a list of questions", where_p)
                for q, qa in enumerate(qas):
                    where_q = f"{where_p}.qas[{q}]"
                    qid, question, answers = self.question(qa, context, where_q)
                    if qid in seen:
                        raise LoralabError(
                            f"{self.path}: {where_q} reuses the id '{qid}' of {seen[qid]}. "
                            f"Every question needs its own id (predictions are matched by id)."
                        )
                    seen[qid] = where_q
                    cols["id"].append(qid)
                    cols["question"].append(question)
                    cols["context"].append(context)
                    cols["answers"].append(answers)
        if not cols["id"]:
            raise LoralabError(f"{self.path} holds no questions. {SHAPE_HINT}")
        return cols

    def question(self, qa: Any, context: str, where: str) -> tuple[str, str, dict]:
        qid = self.field(qa, "id", (str, int), "a string", where)
        question = self.field(qa, "question", (str,), "a string", where)
        impossible = None
        if "is_impossible" in qa:  # absent in SQuAD v1.1-style files: then answers decide
            impossible = self.field(qa, "is_impossible", (bool,), "true or false", where)
        if "answers" not in qa and impossible:
            raw_answers = []
        else:
            raw_answers = self.field(qa, "answers", (list,), "a list", where)
        if impossible and raw_answers:
            raise self.fail(
                where,
                f"is marked is_impossible but lists {len(raw_answers)} answer(s); an unanswerable "
                'question has "answers": [] (guesses belong in "plausible_answers").',
            )
        if impossible is False and not raw_answers:
            raise self.fail(
                where, "is answerable (is_impossible is false) but its answers list is empty."
            )
        texts: list[str] = []
        starts: list[int] = []
        for k, ans in enumerate(raw_answers):
            where_k = f"{where}.answers[{k}]"
            text = self.field(ans, "text", (str,), "a string", where_k)
            if not text.strip():
                # The official script would score it as answerable with gold "" (only an empty
                # prediction matches); there is no span to train on. Almost always a data error.
                raise self.fail(
                    where_k,
                    "is an answer with empty text, but the question is answerable. Give the "
                    'answer\'s text, or mark the question unanswerable ("is_impossible": true, '
                    '"answers": []).',
                )
            start = self.field(ans, "answer_start", (int,), "a character index", where_k)
            if start < 0 or context[start : start + len(text)] != text:
                found = context[max(start, 0) : max(start, 0) + len(text)]
                raise LoralabError(
                    f"{self.path}: {where_k} says the answer {text!r} starts at character {start} "
                    f"of its paragraph's context, but the context there reads {found!r}. "
                    f"answer_start must count characters of the unmodified context from 0."
                )
            texts.append(text)
            starts.append(start)
        return str(qid), question, {"text": texts, "answer_start": starts}


def read_squad_json(path: str | Path) -> dict[str, list]:
    """Parse a SQuAD v2.0 JSON file into the canonical raw columns (checked, with locations)."""
    return _Reader(Path(path)).read()


# -- post-processing ---------------------------------------------------------------------------
