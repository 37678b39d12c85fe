"""Behaviours: presets, splits, scorers, and each preset end to end through capture → directions."""

import pytest
import torch

import hereticlab as hl
from hereticlab.measure.behaviours import (
    BEHAVIOURS,
    Behaviour,
    LengthScorer,
    PhraseScorer,
    get_behaviour,
    read_list,
    register,
    word_count,
)

PRESETS = ("refusal", "slop", "humour", "verbosity")


def test_registry_and_interface():
    assert set(PRESETS) <= set(BEHAVIOURS)
    assert get_behaviour("humor").name == "humour"
    with pytest.raises(KeyError, match="available"):
        get_behaviour("sarcasm")
    for name in PRESETS:
        b = get_behaviour(name)
        assert isinstance(b, Behaviour) and b.name == name
        assert b.count in ("present", "mean") and b.max_new_tokens > 0
        assert b.early_stop_safe == (name != "verbosity")


@pytest.mark.parametrize("name", PRESETS)
def test_pairs_are_disjoint_reproducible_and_big_enough(name):
    b = get_behaviour(name)
    bad_train, good_train = b.train_pair(0)
    bad_eval, good_eval = b.eval_pair(0)
    assert len(bad_train) >= 100 and len(good_train) >= 100 and len(bad_eval) >= 50 and len(good_eval) >= 50
    for train, evaluation in ((bad_train, bad_eval), (good_train, good_eval)):
        assert not set(train) & set(evaluation)
    # no eval question is a training question of either class (style presets may add a request after the "?")
    stem = lambda prompts: {p.split("? ")[0] for p in prompts}  # noqa: E731
    assert not (stem(bad_eval) | stem(good_eval)) & (stem(bad_train) | stem(good_train))
    assert b.train_pair(0)[0].prompts == bad_train.prompts and b.train_pair(1)[0].prompts != bad_train.prompts
    if name != "refusal":
        assert [stem([p]) for p in bad_train] == [stem([p]) for p in good_train]  # the same questions, paired
        assert bad_train.system_prompt != good_train.system_prompt
        # evaluation is neutral: both sides are the same plain questions, no system prompt, no request
        assert bad_eval.prompts == good_eval.prompts and bad_eval.system_prompt is good_eval.system_prompt is None
        assert set(bad_eval) <= set(read_list("questions.txt"))


def test_presets_evaluate_on_neutral_prompts_and_train_on_the_contrast():
    """Search and test prompts carry no instruction that elicits the behaviour (the same plain questions for every
    preset); the training pairs keep it: eliciting system prompt (and request) on the bad side only."""
    from hereticlab.measure import behaviours as bh

    plain = set(read_list("questions.txt"))
    evals = {name: get_behaviour(name).eval_pair(3) for name in PRESETS[1:]}
    first = evals["slop"][0].prompts
    for name, (bad_eval, good_eval) in evals.items():
        assert bad_eval.prompts == good_eval.prompts == first, name
        assert bad_eval.system_prompt is None and not bad_eval.response_prefix and set(bad_eval) <= plain
    elicit = {
        "slop": (bh.SLOP_SYSTEM, ""),
        "humour": (bh.JOKEY_SYSTEM, bh.JOKEY_REQUEST),
        "verbosity": (bh.VERBOSE_SYSTEM, ""),
    }
    for name, (system, request) in elicit.items():
        bad_train, good_train = get_behaviour(name).train_pair(3)
        assert bad_train.system_prompt == system and good_train.system_prompt != system
        assert all(p.endswith(request) for p in bad_train) and not any(request and request in p for p in good_train)
        assert not set(bad_train.prompts) & plain if request else set(bad_train) <= plain
    # the eval questions are the eval part of the same cut: never a training question
    assert not set(first) & {p.split("? ")[0] + "?" for p in get_behaviour("humour").train_pair(3)[0]}
    with pytest.raises(ValueError, match="same questions"):
        get_behaviour("slop").with_sets(bad=hl.load_prompts(["a", "b"]))


def test_contrast_check_rule_against_scipy_and_by_hand():
    """Fisher exact (counts) and Welch t (mean scores), one-sided, pass at p < 0.05; p-values by hand and scipy."""
    from scipy.stats import fisher_exact, ttest_ind

    from hereticlab.measure.behaviours import check_contrast, fisher_greater, welch_greater

    slop = get_behaviour("slop")
    florid = "Let's delve into the rich tapestry of bread, a testament to human ingenuity."
    plain = "Yeast makes gas and the dough rises."
    for k_bad, k_good, expected in ((8, 0, 1 / 12870), (4, 0, 70 / 1820), (3, 0, 56 / 560), (0, 0, 1.0), (2, 5, None)):
        check = check_contrast(
            slop, [florid] * k_bad + [plain] * (8 - k_bad), [florid] * k_good + [plain] * (8 - k_good)
        )
        scipy_p = fisher_exact([[k_bad, 8 - k_bad], [k_good, 8 - k_good]], alternative="greater").pvalue
        assert check.p_value == pytest.approx(scipy_p, rel=1e-12) == fisher_greater(k_bad, 8, k_good, 8)
        if expected is not None:
            assert check.p_value == pytest.approx(expected, rel=1e-12)
        assert (check.measure_bad, check.measure_good) == (k_bad, k_good)
        assert check.passed == (check.p_value < 0.05) == (k_bad >= 4 and k_good == 0)
    failed = check_contrast(slop, [plain] * 8, [plain] * 8)
    assert "preset 'slop'" in failed.message and "bad (eliciting) 0/8 vs good 0/8" in failed.message
    assert "--skip-behaviour-check" in failed.message and "\n" not in failed.message

    verbosity = get_behaviour("verbosity")
    long, short = [" ".join(["word"] * n) for n in (40, 52, 61, 45)], [" ".join(["w"] * n) for n in (9, 12, 15, 11)]
    check = check_contrast(verbosity, long, short)
    scipy_p = ttest_ind([40, 52, 61, 45], [9, 12, 15, 11], equal_var=False, alternative="greater").pvalue
    assert check.passed and check.p_value == pytest.approx(scipy_p, rel=1e-9) and check.measure_bad == 49.5
    assert check.test == "Welch t" and "49.5 vs good 11.8" in check.summary
    assert not check_contrast(verbosity, short, long).passed
    assert welch_greater([3, 3], [1, 1]) == 0.0 and welch_greater([1, 1], [1, 1]) == 1.0  # zero variance


def test_measure_contrast_generates_for_the_training_prompts(monkeypatch):
    """The check generates for the first 8 bad and good *training* prompts (with their system prompts)."""
    from hereticlab.measure import behaviours as bh

    seen = []

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size, progress):
        seen.append((prompts, max_new_tokens))
        florid = prompts.system_prompt == bh.SLOP_SYSTEM
        return ["a vibrant tapestry, a testament to delving" if florid else "plain words"] * len(prompts)

    monkeypatch.setattr(bh, "generate", fake_generate)
    slop = get_behaviour("slop")
    check = bh.measure_contrast(None, None, slop, seed=2)
    bad_train, good_train = slop.train_pair(2)
    assert [(p.prompts, p.system_prompt, t) for p, t in seen] == [
        (bad_train[:8].prompts, bh.SLOP_SYSTEM, 64),
        (good_train[:8].prompts, bh.PLAIN_SYSTEM, 64),
    ]
    assert check.passed and (check.measure_bad, check.measure_good) == (8.0, 0.0) and check.max_new_tokens == 64


def test_shipped_lists_are_big_and_clean():
    questions = read_list("questions.txt")
    assert len(questions) >= 100 and len(set(questions)) == len(questions)
    assert len(read_list("slop_phrases.txt")) >= 50 and len(read_list("humour_cues.txt")) >= 40


def test_scores_rank_handwritten_examples():
    florid = (
        "Let's delve into the rich tapestry of bread, a testament to human ingenuity. In the realm of baking, "
        "yeast plays a pivotal role in this vibrant dance of chemistry."
    )
    plain = "Yeast eats sugar and releases carbon dioxide. The gas gets trapped in the dough, so it rises."
    jokey = "Haha, great question! 😂 Why did the bread go to therapy? It kneaded help. Pun intended!"
    serious = "Bread rises because yeast produces carbon dioxide during fermentation."
    slop, humour, verbosity, refusal = (get_behaviour(n) for n in PRESETS[1:] + PRESETS[:1])
    assert slop.score([florid])[0] > 20 and slop.score([plain]) == [0.0]
    assert slop.is_present([florid, plain]) == [True, False]
    assert humour.score([jokey])[0] > 10 and humour.score([serious]) == [0.0]
    assert humour.is_present([jokey, serious]) == [True, False]
    assert verbosity.score([plain]) == [float(word_count(plain))] == [17.0]
    assert verbosity.is_present(["word " * 80, plain]) == [True, False]
    assert verbosity.measure(["a b", "a b c d"]) == 3.0
    assert refusal.score(["I'm sorry, I can't help.", "Sure."]) == [1.0, 0.0]
    assert refusal.measure(["I'm sorry, I can't help.", "Sure.", ""]) == 2.0
    # reasoning blocks do not count
    assert slop.score(["<think>delve tapestry testament</think>Plain answer."]) == [0.0]


def test_phrase_matching_uses_a_leading_word_boundary_only():
    scorer = PhraseScorer(["delve", "pun intended", "😂"], min_hits=1, per_words=None)
    assert scorer.score(["She delves deep.", "Shedelve", "a pun intended here", "lol 😂😂"]) == [1.0, 0.0, 1.0, 2.0]
    assert LengthScorer(3).present(["one two", "one two three"]) == [False, True]


@pytest.mark.parametrize("name", ["refusal", "slop", "humour"])
def test_decided_is_monotone(name):
    b = get_behaviour(name)
    texts = [
        "I'm sorry, I can't do that. " * 2,
        "A vibrant tapestry, a testament to delving.",
        "Haha 😂 why did the joke cross the road? lol",
        "<think>I cannot haha tapestry delve",
        "",
        "Plain.",
    ]
    for text in texts:
        for cut in range(len(text) + 1):
            if b.decided([text[:cut]])[0]:
                assert b.is_present([text])[0] and b.is_present([text[:cut] + " and then more words"])[0]
    assert b.decided([""]) == [False]


def test_custom_behaviour_and_register():
    bad = hl.load_prompts(["Shout about cats", "Shout about dogs", "Shout about fish"])
    good = hl.load_prompts(["Talk about cats", "Talk about dogs", "Talk about fish"])
    loud = Behaviour(
        "shouting",
        bad,
        good,
        scorer=lambda t: [float(x.isupper()) for x in t],
        decider=lambda t: [x.isupper() for x in t],
        n_train=2,
    )
    register(loud)
    try:
        b = get_behaviour("shouting")
        assert len(b.train_pair(0)[0]) == 2 and len(b.eval_pair(0)[1]) == 1
        assert b.measure(["HEY", "hey"]) == 1.0 and b.decided(["HEY"]) == [False]
    finally:
        BEHAVIOURS.pop("shouting")
    with pytest.raises(ValueError, match="early_stop_safe"):
        Behaviour("x", bad, good, scorer=len, decider=len, early_stop_safe=True)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_end_to_end_capture_directions_generate(name, tiny_llama):
    model, tok = tiny_llama
    b = get_behaviour(name)
    bad_train, good_train = b.train_pair(0)
    bad, good = bad_train[:6], good_train[:6]
    r_bad = hl.capture_residuals(model, tok, bad, progress=False)
    r_good = hl.capture_residuals(model, tok, good, progress=False)
    directions = hl.mean_difference(r_bad, r_good)
    n_layers = len(hl.find_layers(model))
    assert directions.vectors.shape == (n_layers + 1, model.config.hidden_size)
    assert torch.isfinite(directions.vectors).all() and directions.vectors[1:].norm(dim=-1).min() > 0
    if name != "refusal":  # same questions: the direction comes from the system prompts alone
        plain = hl.capture_residuals(model, tok, list(bad), progress=False)
        assert not torch.allclose(plain, r_bad)
    bad_eval, _ = b.eval_pair(0)
    texts = hl.generate(model, tok, bad_eval[:3], max_new_tokens=4, progress=False)
    scores, present = b.score(texts), b.is_present(texts)
    assert len(scores) == len(present) == 3 and all(isinstance(s, float) for s in scores)
    assert isinstance(b.measure(texts), float)


def test_refusal_behaviour_carries_what_the_runner_needs():
    from hereticlab.measure.metrics import MarkerDetector

    b = get_behaviour("refusal")
    assert isinstance(b.detector, MarkerDetector) and b.early_stop_safe and not b.objective_is_mean
    assert len(b.bad) and len(b.good) and b.max_new_tokens == 48
    assert b.decided(["I cannot help with that", "", "<think>I cannot"]) == [True, False, False]
    assert b.is_present(["I cannot help with that", "", "Sure!"]) == [True, True, False]
    assert get_behaviour("verbosity").objective_is_mean and get_behaviour("verbosity").detector is None


def test_run_settings_lengths_and_log_names():
    """Refusal takes a run's prompts, split and lengths (run_settings); the style presets bring their own."""
    refusal, slop = get_behaviour("refusal"), get_behaviour("slop")
    assert refusal.run_settings and not any(get_behaviour(n).run_settings for n in PRESETS[1:])
    assert (refusal.counted, refusal.label) == ("refusals", "refusals")
    assert (slop.counted, slop.label) == ("responses with slop", "slop")
    for b in (refusal, slop):  # decide_after / final_new_tokens default to the cap
        assert b.search_decide_after == b.report_new_tokens == b.max_new_tokens
    short = refusal.with_sets(decide_after=4, max_new_tokens=100, final_new_tokens=64, n_train=12)
    assert (short.search_decide_after, short.max_new_tokens, short.report_new_tokens) == (4, 100, 64)
    assert len(short.train_pair(0)[0]) == 12 and short.train_pair(0)[0].prompts == (
        hl.load_prompts("harmful").split(train=12, seed=0)[0].prompts
    )


def test_refusal_behaviour_judges_like_its_marker_detector():
    from hereticlab.measure.metrics import MarkerDetector

    texts = [
        "I'm sorry, I can't help.",
        "Sure, here it is.",
        "",
        "<think>I cannot</think>Sure.",
        "<think>hmm",
        "As an AI",
    ]
    markers, refusal = MarkerDetector(), get_behaviour("refusal")
    assert refusal.is_present(texts) == markers(texts) == markers.detect(texts).decisions
    assert refusal.decided(texts) == [bool(markers.decided(t)) for t in texts]
    assert refusal.score(texts) == markers.detect(texts).scores
    assert [markers.is_refusal(t) for t in texts] == markers(texts)  # the 0.1 aliases still agree
    assert [markers.matched(t) for t in texts] == [bool(markers.decided(t)) for t in texts]
