"""Hand-built examples in a task's canonical columns, for `loralab validate`.

The validation probe trains a few steps on one batch and checks save/load/merge on it: it needs
examples of the task's own shape (its number of labels, one text or a pair, spans with
unanswerable questions), not its real data, so it runs with no data files and no hub.
"""

from __future__ import annotations

# (text_a, text_b): label i of a probe is i % num_labels, so with two labels the sentiment of
# text_a matches (0 negative, 1 positive) and the probe reads as SST-2's.
_PAIRS = (
    ("dull and far too long", "the film drags on and on"),
    ("a wonderful, moving film", "the film moved me"),
    ("a tedious mess", "nothing in it holds together"),
    ("the best acting this year", "the cast is superb"),
    ("i want those two hours back", "a waste of an evening"),
    ("charming from start to end", "it charms throughout"),
    ("flat, lifeless and boring", "there is no life in it"),
    ("clever and funny", "witty writing and real laughs"),
    ("the plot makes no sense", "the story is hard to follow"),
    ("a quiet, lovely surprise", "unexpectedly gentle and fine"),
    ("poorly shot and badly edited", "the camera work is careless"),
    ("warm, sharp and generous", "a kind and clever picture"),
)

# (context, question, answer or None): four answerable, two not.
_QA = (
    (
        "The Amazon river flows through Brazil, Peru and Colombia. It is about 6,400 km long.",
        "Which countries does the Amazon flow through?",
        "Brazil, Peru and Colombia",
    ),
    (
        "Marie Curie won the Nobel Prize in Physics in 1903 and in Chemistry in 1911.",
        "When did Marie Curie win the Nobel Prize in Chemistry?",
        "1911",
    ),
    (
        "The library opens at nine in the morning on weekdays and at ten on Saturdays.",
        "How many books does the library hold?",
        None,
    ),
    (
        "The Eiffel Tower was finished in 1889 for the World's Fair held in Paris.",
        "In which city was the World's Fair of 1889 held?",
        "Paris",
    ),
    (
        "Honey bees live in colonies led by a single queen, who lays all of the eggs.",
        "Who lays the eggs in a honey bee colony?",
        "a single queen",
    ),
    (
        "Mount Kilimanjaro, a dormant volcano in Tanzania, is the highest mountain in Africa.",
        "When was Kilimanjaro first climbed?",
        None,
    ),
)


def classification_rows(num_labels: int, pair: bool) -> dict[str, list]:
    """Canonical classification columns: max(8, 2·num_labels) rows, every label at least
    twice, distinct texts; `text_b` empty unless `pair`."""
    n = max(8, 2 * num_labels)
    rows: dict[str, list] = {"text_a": [], "text_b": [], "label": []}
    for i in range(n):
        a, b = _PAIRS[i % len(_PAIRS)]
        suffix = f" ({i // len(_PAIRS) + 1})" if i >= len(_PAIRS) else ""
        rows["text_a"].append(a + suffix)
        rows["text_b"].append(b + suffix if pair else "")
        rows["label"].append(i % num_labels)
    return rows


def qa_rows() -> dict[str, list]:
    """Canonical QA columns (SQuAD v2): six questions on short contexts, two unanswerable."""
    rows: dict[str, list] = {"id": [], "question": [], "context": [], "answers": []}
    for i, (context, question, answer) in enumerate(_QA):
        rows["id"].append(f"probe-{i}")
        rows["question"].append(question)
        rows["context"].append(context)
        starts = [context.index(answer)] if answer else []
        rows["answers"].append({"text": [answer] if answer else [], "answer_start": starts})
    return rows
