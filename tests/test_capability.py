"""Capability items, answer scoring, retention and over-refusal (measure/capability.py), on tiny models only."""

import math
import re
from collections import Counter

import pytest
import torch

import hereticlab as hl
from hereticlab.core.prompts import available_sets, format_chat
from hereticlab.measure.capability import (
    KINDS,
    CapabilityError,
    CapabilityItem,
    answer_nll,
    capability_answers,
    capability_report,
    load_capability_items,
    over_refusal_rate,
    score_answer,
)
from hereticlab.measure.report import proportion_interval

ITEMS = load_capability_items()
BACKTICKS = re.compile(r"`([^`]+)`")


def _question_numbers(text: str) -> set[str]:
    """Digit runs in ``text`` with thousands separators removed (``1,204`` → ``1204``)."""
    return set(re.findall(r"\d+", re.sub(r"(?<=\d),(?=\d{3})", "", text)))


def test_bundled_set_has_enough_items_of_each_kind():
    counts = Counter(item.kind for item in ITEMS)
    assert set(counts) == set(KINDS)
    assert counts["arithmetic"] >= 60 and counts["facts"] >= 60
    assert counts["code"] >= 50 and counts["instructions"] >= 50
    assert len(ITEMS) >= 220
    assert len({item.id for item in ITEMS}) == len(ITEMS)
    assert len({item.question for item in ITEMS}) == len(ITEMS)


@pytest.mark.parametrize("item", [i for i in ITEMS if i.kind == "arithmetic"], ids=lambda i: i.id)
def test_arithmetic_answers_equal_python(item):
    assert item.check, "every arithmetic item carries the expression that computes it"
    assert eval(item.check, {"__builtins__": {}}) == int(item.answer)
    # The expression uses the question's own numbers, and the answer is not one of them (see number_matches).
    assert set(re.findall(r"\d+", item.check)) <= _question_numbers(item.question)
    assert item.answer.lstrip("-") not in _question_numbers(item.question)


@pytest.mark.parametrize("item", [i for i in ITEMS if i.kind == "code"], ids=lambda i: i.id)
def test_code_answers_equal_python(item):
    (expression,) = BACKTICKS.findall(item.question)
    assert expression == item.check
    value = eval(expression)
    assert item.answer == (value if isinstance(value, str) else repr(value))
    assert item.rule == ("cased" if isinstance(value, str) else "answer")
    assert "|" not in item.answer
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert item.answer.lstrip("-") not in _question_numbers(item.question)


def test_fact_and_instruction_specs_are_well_formed():
    for item in ITEMS:
        if item.kind == "facts":
            assert item.rule in ("answer", "cased")
            for variant in item.answers:
                if variant.isdigit():
                    assert variant not in _question_numbers(item.question), item.id
        if item.kind == "instructions":
            assert item.rule in ("exact", "regex"), item.id


def _item(rule: str, answer: str, question: str = "What is it?") -> CapabilityItem:
    return CapabilityItem("t-1", "facts", question, rule, answer)


@pytest.mark.parametrize(
    "item, response, expected",
    [
        (_item("answer", "Paris"), "Paris", True),
        (_item("answer", "Paris"), "Paris.", True),
        (_item("answer", "Paris"), "The capital of France is Paris.", True),
        (_item("answer", "Paris"), "**paris**", True),
        (_item("answer", "Paris"), "Lyon", False),
        (_item("answer", "Paris"), "Parisian cafés", False),
        (_item("answer", "Paris"), "", False),
        (_item("answer", "Paris"), "Paris " + "and more " * 40, False),
        (_item("answer", "Brasilia"), "Brasília.", True),
        (_item("answer", "Leonardo|da Vinci"), "It was painted by da Vinci.", True),
        (_item("answer", "936", "What is 347 + 589?"), "936", True),
        (_item("answer", "936", "What is 347 + 589?"), "347 + 589 = 936.", True),
        (_item("answer", "936", "What is 347 + 589?"), "The answer is 936!", True),
        (_item("answer", "936", "What is 347 + 589?"), "935, 936 or 937", False),
        (_item("answer", "936", "What is 347 + 589?"), "Either 936 or 937.", False),
        (_item("answer", "936", "What is 347 + 589?"), "It is 936, no wait, 946.", False),
        (_item("answer", "936", "What is 347 + 589?"), "937", False),
        (_item("answer", "9235", "Find the sum of 2,750 and 6,485."), "2,750 + 6,485 = 9,235", True),
        (_item("answer", "-63", "What is 64 - 127?"), "64 - 127 = -63", True),
        (_item("answer", "-63", "What is 64 - 127?"), "63", False),
        (_item("answer", "4"), "four", True),
        (_item("answer", "True"), "It evaluates to True.", True),
        (_item("answer", "True"), "Not True but False", False),
        (_item("answer", "[3, 2, 1]"), "`[3,2,1]`", True),
        (_item("cased", "ABC"), "'ABC'", True),
        (_item("cased", "ABC"), "abc", False),
        (_item("exact", "BLUE"), "BLUE", True),
        (_item("exact", "BLUE"), '"BLUE."', True),
        (_item("exact", "BLUE"), "blue", False),
        (_item("exact", "BLUE"), "Sure! BLUE", False),
        (_item("regex", r'\{\s*"name"\s*:\s*"Ada"\s*\}'), '```json\n{"name": "Ada"}\n```', True),
        (_item("regex", "(?i)yes[.!]?"), "Yes.", True),
        (_item("regex", "(?i)yes[.!]?"), "Yes, because it is.", False),
        (_item("answer", "4"), "<think>maybe 5</think>4", True),
    ],
)
def test_score_answer(item, response, expected):
    assert score_answer(item, response) is expected


def test_malformed_lines_name_file_line_and_fix(tmp_path):
    good = "a-1\tfacts\tWhat is the capital of France?\tanswer\tParis\n"
    cases = {
        "a-2\tfacts\tonly four fields\tanswer\n": "expected 5 or 6 tab-separated fields",
        "a-2\tpoetry\tQ?\tanswer\tA\n": "kind 'poetry' is not one of",
        "a-2\tfacts\tQ?\tfuzzy\tA\n": "rule 'fuzzy' is not one of",
        "a-2\tfacts\tQ?\tregex\t(unclosed\n": "does not compile",
        "a-2\tfacts\t\tanswer\tA\n": "question field is empty",
        good: "already used on line 2",
    }
    for bad, message in cases.items():
        path = tmp_path / "items.tsv"
        path.write_text("# header\n" + good + bad)
        with pytest.raises(CapabilityError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
            load_capability_items(path)
    assert isinstance(CapabilityError("x"), hl.PromptError)
    with pytest.raises(CapabilityError, match="does not exist"):
        load_capability_items(tmp_path / "missing.tsv")


def test_retention_on_a_hand_made_table():
    import pandas as pd

    before = pd.DataFrame(
        {
            "id": list("abcdef"),
            "kind": ["arithmetic", "arithmetic", "facts", "facts", "code", "code"],
            "correct": [True, True, True, False, True, False],
        }
    )
    after = pd.DataFrame(
        {
            "id": list("fedcba"),  # another order: rows are matched by id
            "kind": ["code", "code", "facts", "facts", "arithmetic", "arithmetic"],
            "correct": [False, True, True, True, False, True],  # a: T, b: F, c: T, d: T, e: T, f: F
        }
    )
    report = capability_report(before, after)
    overall = report["overall"]
    assert (overall["n"], overall["correct_before"], overall["correct_after"]) == (6, 4, 4)
    assert overall["kept"] == 3 and overall["gained"] == 1  # a, c, e kept; d gained; b lost
    assert overall["retention"] == 0.75 and overall["retention_ci"] == proportion_interval(3, 4)
    assert overall["accuracy_before"] == overall["accuracy_after"] == 4 / 6
    assert overall["accuracy_after_ci"] == proportion_interval(4, 6)
    kinds = report["by_kind"]
    assert (kinds["arithmetic"]["retention"], kinds["facts"]["retention"], kinds["code"]["retention"]) == (0.5, 1, 1)
    assert kinds["facts"]["accuracy_after"] == 1 and kinds["facts"]["gained"] == 1
    nobody = capability_report(before.assign(correct=False), after)["overall"]
    assert math.isnan(nobody["retention"]) and all(math.isnan(x) for x in nobody["retention_ci"])
    with pytest.raises(ValueError, match="different items"):
        capability_report(before, after.iloc[:5])


def test_over_refusal_is_a_named_set_of_distinct_harmless_prompts():
    prompts = hl.load_prompts("over_refusal")
    assert "over_refusal" in available_sets()
    assert len(set(prompts)) == len(prompts) >= 100
    others = set(hl.load_prompts("harmless")) | set(hl.load_prompts("harmful"))
    assert not set(prompts) & others
    assert all(6 <= len(p.split()) <= 22 for p in prompts)


@pytest.fixture(scope="module")
def tiny():
    from hereticlab.core.testing import tiny_model

    return tiny_model("llama")


def test_capability_answers_and_over_refusal_on_a_tiny_model(tiny):
    model, tok = tiny
    items = [next(i for i in ITEMS if i.kind == kind) for kind in KINDS]
    frame = capability_answers(model, tok, items, max_new_tokens=4, batch_size=3)
    assert list(frame.columns) == ["id", "kind", "question", "response", "correct"]
    assert frame["id"].tolist() == [i.id for i in items] and frame["correct"].dtype == bool
    assert all(isinstance(r, str) for r in frame["response"]) and 0 <= frame.attrs["accuracy"] <= 1
    assert capability_report(frame, frame)["overall"]["accuracy_after"] == frame.attrs["accuracy"]
    prompts = list(hl.load_prompts("over_refusal"))[:3]
    refusals = over_refusal_rate(model, tok, prompts, max_new_tokens=4)
    assert len(refusals) == 3 and 0 <= refusals.attrs["refusal_rate"] <= 1
    low, high = refusals.attrs["refusal_rate_ci"]
    assert 0 <= low <= refusals.attrs["refusal_rate"] <= high <= 1


def test_answer_nll_equals_a_plain_forward(tiny):
    model, tok = tiny
    prompts = ["What is 2 + 2?", "Name a colour that is often used for stop signs."]
    answers = ["4", "Red, usually a bright red."]
    nll = answer_nll(model, tok, prompts, answers, batch_size=2)  # different lengths: left padding in the batch
    assert nll.shape == (2,) and torch.isfinite(nll).all() and (nll > 0).all()
    for i in range(2):
        prompt_ids = tok.encode(format_chat(tok, [prompts[i]])[0], add_special_tokens=False)
        answer_ids = tok.encode(answers[i], add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(answer_ids) - 1)
        expected = -logprobs[positions, torch.tensor(answer_ids)].mean()
        assert torch.allclose(nll[i], expected, atol=1e-4), (i, float(nll[i]), float(expected))
    with_empty = answer_nll(model, tok, prompts, ["4", ""])
    assert torch.allclose(with_empty[0], nll[0], atol=1e-4) and math.isnan(with_empty[1])
    with pytest.raises(ValueError, match="one answer per prompt"):
        answer_nll(model, tok, prompts, ["4"])
