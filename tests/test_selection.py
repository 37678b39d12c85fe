"""Arditi-style direction selection, the cheap refusal metric and the safety-depth measures."""

import math

import pandas as pd
import pytest
import torch
from conftest import PROMPTS

import hereticlab as hl
from hereticlab.measure.depth import per_position_kl, prefill_refusal, response_logprobs, response_nll
from hereticlab.measure.selection import (
    Selection,
    candidate_directions,
    choose_candidate,
    filter_training_prompts,
    plot_candidates,
    post_instruction_positions,
    refusal_log_odds,
    refusal_metric,
    refusal_token_ids,
    score_candidates,
    select_direction,
    selection_from_frame,
)


def synthetic_frame():
    # layer 3 has the lowest bypass but fails induce; layer 9 is too deep (n_layers=10 → limit 8); layer 5 fails kl.
    return pd.DataFrame(
        [
            {"position": -1, "layer": 3, "bypass": -5.0, "induce": -0.5, "kl": 0.01},
            {"position": -1, "layer": 9, "bypass": -4.0, "induce": 2.0, "kl": 0.01},
            {"position": -2, "layer": 5, "bypass": -3.0, "induce": 1.0, "kl": 0.50},
            {"position": -2, "layer": 4, "bypass": -2.0, "induce": 0.5, "kl": 0.05},
            {"position": -1, "layer": 6, "bypass": -1.0, "induce": 3.0, "kl": 0.02},
        ]
    )


def test_selection_filters_respected():
    frame = synthetic_frame()
    assert choose_candidate(frame, n_layers=10) == 3  # (pos -2, layer 4)
    assert choose_candidate(frame, n_layers=10, induce_min=None) == 0
    assert choose_candidate(frame, n_layers=10, kl_max=1.0) == 2
    assert choose_candidate(frame, n_layers=10, max_layer_frac=None) == 1
    assert choose_candidate(frame, n_layers=10, induce_min=0.6) == 4  # layer 4's induce 0.5 no longer passes
    assert choose_candidate(frame, n_layers=10, induce_min=10.0) is None
    dirs = {p: hl.Directions(torch.randn(11, 8)) for p in (-1, -2)}
    sel = selection_from_frame(frame, dirs, n_layers=10)
    assert (sel.position, sel.layer) == (-2, 4) and torch.equal(sel.direction, dirs[-2].vectors[4])
    assert sel.frame["passes"].tolist() == [False, False, False, True, True]
    assert sel.frame["chosen"].sum() == 1 and bool(sel.frame.loc[3, "chosen"])
    none = selection_from_frame(frame, dirs, n_layers=10, kl_max=0.001)
    assert none.position is None and none.direction is None and not none.frame["chosen"].any()
    fig = plot_candidates(sel)
    assert len(fig.axes) >= 3


def test_training_filter_keeps_refused_harmful_and_answered_harmless():
    bad = torch.tensor([1.5, -0.2, 0.3, -3.0, 2.0])
    good = torch.tensor([-1.0, 0.5, -2.0, 0.0])
    keep_bad, keep_good = filter_training_prompts(bad, good, min_keep=2)
    assert keep_bad.tolist() == [True, False, True, False, True]
    assert keep_good.tolist() == [True, False, True, False]
    # Too few survivors on a side: that side is kept whole instead of averaging over one or two prompts, and said.
    with pytest.warns(UserWarning, match=r"only 1 of 5 harmful training prompts pass \(fewer than min_keep=2\)"):
        keep_bad, keep_good = filter_training_prompts(bad, good, threshold=1.8, min_keep=2)
    assert keep_bad.all() and keep_good.tolist() == [True, True, True, True]


def test_refusal_log_odds_exact():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    out = refusal_log_odds(probs.log(), [0, 1])
    expected = [math.log(0.3 / 0.7), math.log(0.8 / 0.2)]
    assert torch.allclose(out.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    # Stable when P_ref is tiny or ≈ 1.
    lp = torch.log_softmax(torch.tensor([[60.0, 0.0, 0.0]]), -1)
    assert torch.isfinite(refusal_log_odds(lp, [0])).all() and refusal_log_odds(lp, [0]).item() == pytest.approx(
        60 - math.log(2), abs=1e-4
    )


def test_refusal_tokens_and_positions(tiny_llama):
    model, tok = tiny_llama
    ids = refusal_token_ids(tok)
    assert ids[0] == tok.encode("I", add_special_tokens=False)[0] and len(set(ids)) == len(ids)
    positions = post_instruction_positions(tok)
    tail = "<|im_end|>\n<|im_start|>assistant\n"  # tiny template: specials are single tokens, bytes otherwise
    assert positions == list(range(-len(tok.encode(tail, add_special_tokens=False)), 0))
    metric = refusal_metric(model, tok, PROMPTS)
    lp = hl.first_token_logprobs(model, tok, PROMPTS, progress=False)
    assert torch.allclose(metric, refusal_log_odds(lp, ids))


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_scoring_on_tiny_model(tiny_llama):
    model, tok = tiny_llama
    hooks_before = hook_counts(model)
    dirs = candidate_directions(model, tok, PROMPTS[:3], PROMPTS[3:], positions=[-2, -1])
    assert set(dirs) == {-2, -1} and dirs[-1].vectors.shape == (5, 64)
    frame, baseline = score_candidates(model, tok, dirs, PROMPTS[:3], PROMPTS[3:], layers=[1, 2, 99])
    assert len(frame) == 4 and set(frame.layer) == {1, 2}  # out-of-range layers dropped
    assert frame[["bypass", "induce", "kl"]].notna().all().all() and (frame.kl >= -1e-6).all()
    # The induce score is the metric under ActAdd of the raw direction at that layer.
    r = dirs[-1].vectors[2]
    with hl.activation_addition(model, r, layer=2):
        expected = refusal_metric(model, tok, PROMPTS[3:]).mean()
    got = frame[(frame.position == -1) & (frame.layer == 2)].induce.item()
    assert got == pytest.approx(float(expected), abs=1e-5)
    sel = select_direction(
        model,
        tok,
        PROMPTS[:3],
        PROMPTS[3:],
        PROMPTS[:3],
        PROMPTS[3:],
        positions=[-1],
        layers=[1, 2],
        induce_min=None,
        kl_max=None,
        max_layer_frac=None,
    )
    assert isinstance(sel, Selection) and sel.layer in (1, 2) and sel.direction.shape == (64,)
    assert hook_counts(model) == hooks_before  # transformers may keep its own capture hooks; ours are gone


def last_logprobs_by_hand(model, tok, prompts):
    """First-response-token log-probabilities, one unpadded prompt at a time, in float64: ``[n, vocab]``."""
    rows = []
    for prompt in prompts:
        ids = tok(hl.format_chat(tok, [prompt])[0], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            rows.append(torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1))
    return torch.stack(rows)


def test_bypass_and_kl_of_one_candidate_by_hand(tiny_llama):
    """One candidate's bypass and KL recomputed without the library's hooks, metric or KL code: the direction is
    orthogonalized out of every residual writer's weights (embedding, o_proj, down_proj) of a copy of the model."""
    import copy

    model, tok = tiny_llama
    harmful, harmless = PROMPTS[:3], PROMPTS[3:]
    dirs = candidate_directions(model, tok, harmful, harmless, positions=[-1])
    frame, baseline = score_candidates(model, tok, dirs, harmful, harmless, layers=[1])
    row = frame.iloc[0]
    r = dirs[-1].vectors[1].double()
    r = r / r.norm()
    edited = copy.deepcopy(model)
    assert edited.lm_head.weight is not edited.model.embed_tokens.weight  # untied: the unembedding stays as it is
    with torch.no_grad():
        E = edited.model.embed_tokens.weight
        E.copy_(E.double() - torch.outer(E.double() @ r, r))
        for block in edited.model.layers:
            for W in (block.self_attn.o_proj.weight, block.mlp.down_proj.weight):  # (d, n)
                W.copy_(W.double() - torch.outer(r, r @ W.double()))
    refusal = [tok.encode(w, add_special_tokens=False)[0] for w in ("I", "I'm", "Sorry", "As", "Unfortunately")]
    refusal = sorted(set(refusal))

    def metric(logprobs):  # log P_ref − log(1 − P_ref), P_ref summed over the refusal-opening tokens
        p = logprobs.exp()[:, refusal].sum(-1)
        return (p.log() - (1 - p).log()).mean()

    base_harmful, base_harmless = (
        last_logprobs_by_hand(model, tok, harmful),
        last_logprobs_by_hand(model, tok, harmless),
    )
    abl_harmful, abl_harmless = (
        last_logprobs_by_hand(edited, tok, harmful),
        last_logprobs_by_hand(edited, tok, harmless),
    )
    assert float(metric(base_harmful)) == pytest.approx(baseline["harmful"], abs=2e-5)
    assert float(metric(abl_harmful)) == pytest.approx(row.bypass, abs=2e-5)
    kl = (base_harmless.exp() * (base_harmless - abl_harmless)).sum(-1).mean()
    assert float(kl) == pytest.approx(row.kl, rel=1e-3, abs=1e-7)
    assert float(kl) > 1e-5 and abs(row.bypass - baseline["harmful"]) > 1e-3  # the ablation does something


def test_teacher_forced_logprobs_match_full_forward(tiny_llama):
    model, tok = tiny_llama
    responses = ["Sure, here", "No"]
    lp, valid = response_logprobs(model, tok, PROMPTS[:2], responses, max_tokens=8)
    assert valid.sum(1).tolist() == [8, 2]
    nll = response_nll(model, tok, PROMPTS[:2], responses, max_tokens=8, batch_size=1)
    ids = [tok.encode(r, add_special_tokens=False)[:8] for r in responses]
    manual = [-lp[i, torch.arange(len(t)), torch.tensor(t)].mean() for i, t in enumerate(ids)]
    assert torch.allclose(nll, torch.stack(manual), atol=1e-5)
    for i in range(2):
        text = hl.format_chat(tok, [PROMPTS[i]])[0]
        p_ids = tok.encode(text, add_special_tokens=False)
        r_ids = tok.encode(responses[i], add_special_tokens=False)[:8]
        full = torch.log_softmax(model(input_ids=torch.tensor([p_ids + r_ids])).logits[0].float(), -1)
        for j in range(len(r_ids)):
            assert torch.allclose(lp[i, j], full[len(p_ids) + j - 1], atol=1e-4)


def test_per_position_kl(tiny_llama):
    model, tok = tiny_llama
    same = per_position_kl(model, tok, PROMPTS, "Sure, here is", None, max_tokens=6)
    assert list(same.columns) == ["position", "kl", "kl_std", "n"] and same.kl.abs().max() < 1e-6
    r = torch.randn(64, generator=torch.Generator().manual_seed(0))
    edited = per_position_kl(
        model,
        tok,
        PROMPTS,
        "Sure, here is",
        lambda: hl.ablate(model, r, components=("embed", "attn", "mlp")),
        max_tokens=6,
    )
    hooked = per_position_kl(model, tok, PROMPTS, "Sure, here is", lambda: hl.ablation_hooks(model, r), max_tokens=6)
    assert (edited.kl > 0).all() and len(edited) == 6
    assert edited.attrs["per_prompt"].shape == (5, 6)
    assert (edited.kl - hooked.kl).abs().max() < 1e-5  # hooks ≡ weight orthogonalization of every writer


def test_prefill_refusal(tiny_llama):
    model, tok = tiny_llama
    prefix = "Sure, here is how"
    # A detector that records exactly what it judged: continuations only, never the forced prefix.
    seen = []
    detector = lambda texts: seen.extend(texts) or [t.startswith(" ") for t in texts]  # noqa: E731
    frame = prefill_refusal(model, tok, PROMPTS, prefix, ks=(0, 2), detector=detector, max_new_tokens=3)
    assert frame.k.tolist() == [0, 2] and frame.n.tolist() == [5, 5]
    assert frame.attrs["responses"][0] == hl.generate(model, tok, PROMPTS, max_new_tokens=3, progress=False)
    forced = hl.generate(model, tok, PROMPTS, max_new_tokens=3, progress=False, response_prefix="Su")
    assert frame.attrs["responses"][2] == forced


def test_judge_refusals_is_refusal_rate_with_early_stopping(tiny_llama):
    from hereticlab.measure.metrics import MarkerDetector, refusal_rate
    from hereticlab.measure.selection import judge_refusals

    model, tok = tiny_llama
    full = refusal_rate(model, tok, PROMPTS, max_new_tokens=6, progress=False)
    detector = MarkerDetector(markers=[tok.decode(tok.encode(full["response"][0], add_special_tokens=False)[:1])])
    full = refusal_rate(model, tok, PROMPTS, detector=detector, max_new_tokens=6, progress=False)
    early = judge_refusals(model, tok, PROMPTS, detector=detector, max_new_tokens=6)
    assert early["refused"].tolist() == full["refused"].tolist() and early["refused"].any()
    assert all(full["response"][i].startswith(r) for i, r in enumerate(early["response"]))
    assert len(early["response"][0]) < len(full["response"][0])


def test_selection_adds_at_resid_without_the_deprecated_layer_keyword(tiny_llama):
    import warnings

    from hereticlab.measure.selection import evaluate_direction

    model, tok = tiny_llama
    dirs = candidate_directions(model, tok, PROMPTS[:3], PROMPTS[3:], positions=[-1])
    r = dirs[-1].vectors[2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame, _ = score_candidates(model, tok, dirs, PROMPTS[:3], PROMPTS[3:], layers=[2])
        kw = dict(max_new_tokens=2, batch_size=4)
        last = evaluate_direction(model, tok, r, -1, PROMPTS[:2], PROMPTS[3:], **kw)
        explicit = evaluate_direction(model, tok, r, hl.num_layers(model) - 1, PROMPTS[:2], PROMPTS[3:], **kw)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning) and "layer" in str(w.message)]
    with hl.activation_addition(model, r, resid=2):
        expected = refusal_metric(model, tok, PROMPTS[3:]).mean()
    assert frame.induce.item() == pytest.approx(float(expected), abs=1e-5)
    assert last["metric_added"] == explicit["metric_added"]  # layer=-1 is the input of the last block


# ----------------------------------------------------------------------------------------------------------
# The per-seed protocol of notebook 05
# ----------------------------------------------------------------------------------------------------------


def test_filter_choices_and_their_fallbacks():
    from hereticlab.measure.selection import failed_filters, filter_choices, primary_choice

    frame = synthetic_frame()  # row 3 passes all; row 0 fails induce only; row 2 fails kl only; row 1 fails layer
    choices = filter_choices(frame, n_layers=10)
    assert choices == {"arditi": 3, "kl_capped": 0, "relaxed": 2, "layer_only": 0}
    assert choices["arditi"] == choose_candidate(frame, n_layers=10)  # the same rule as choose_candidate
    assert primary_choice(choices) == "arditi"
    strict = filter_choices(frame, n_layers=10, kl_max=0.001)  # nothing passes the KL cap
    assert strict == {"arditi": None, "kl_capped": None, "relaxed": 2, "layer_only": 0}
    assert primary_choice(strict) == "relaxed"
    assert primary_choice({"arditi": None, "kl_capped": None, "relaxed": None, "layer_only": 4}) == "layer_only"
    assert primary_choice(dict.fromkeys(("arditi", "kl_capped", "relaxed", "layer_only"))) is None
    assert failed_filters(frame.loc[3], n_layers=10) == []
    assert failed_filters(frame.loc[2], n_layers=10) == ["KL < 0.1 (0.5)"]
    assert failed_filters(frame.loc[0], n_layers=10) == ["induce > 0 (-0.5)"]
    assert failed_filters(frame.loc[1], n_layers=10) == ["layer < 8 (9)"]
    nan = frame.assign(kl=float("nan"))  # a score that could not be computed never passes
    assert filter_choices(nan, n_layers=10)["arditi"] is None


def test_seed_split_is_disjoint_complete_and_reproducible():
    from hereticlab.measure.selection import seed_split

    train, val, test = seed_split(50, n_test=10, n_val=8, seed=3)
    assert (len(train), len(val), len(test)) == (32, 8, 10)
    assert sorted(train + val + test) == list(range(50))
    assert seed_split(50, n_test=10, n_val=8, seed=3) == (train, val, test)
    assert seed_split(50, n_test=10, n_val=8, seed=4)[2] != test
    with pytest.raises(ValueError, match="no training"):
        seed_split(10, n_test=5, n_val=5, seed=0)


def synthetic_seed(frame, seed=0):
    from hereticlab.measure.selection import SeedSelection, filter_choices

    dirs = {p: hl.Directions(torch.randn(11, 8)) for p in (-1, -2)}
    kw = {"n_layers": 10, "induce_min": 0.0, "kl_max": 0.1, "max_layer_frac": 0.8}
    splits = {s: (list(range(20)), list(range(20, 24)), list(range(24, 30))) for s in ("harmful", "harmless")}
    kept = {"harmful": list(range(15)), "harmless": list(range(20))}
    return SeedSelection(seed, splits, kept, dirs, frame, filter_choices(frame, **kw), kw)


def test_seed_selection_arms_and_computed_text():
    frame = synthetic_frame()
    passing = synthetic_seed(frame)
    assert passing.arms() == {"chosen": "arditi"}  # Arditi's filters pass: no fallback is evaluated
    assert torch.equal(passing.vector("arditi"), passing.directions[-2].vectors[4])
    text = passing.describe()
    assert "**2/5 pass all three**" in text and "kept 15/20 harmful, 20/20 harmless" in text
    assert "position -2, layer 4" in text and "passes all three → evaluated on test as **chosen**" in text
    # No candidate passes the KL cap except row 0 (which fails induce): relaxed = chosen, KL-capped beside it.
    failing = synthetic_seed(frame.assign(kl=[0.01, 0.5, 0.5, 0.5, 0.5]))
    assert failing.choices["arditi"] is None and failing.arms() == {"chosen": "relaxed", "KL-capped": "kl_capped"}
    text = failing.describe()
    assert "**0/5 pass all three**" in text and "Arditi's choice (all three filters): none." in text
    assert "fails KL < 0.1 (0.5) → evaluated on test as **chosen**" in text
    assert "fails induce > 0 (-0.5) → evaluated on test as **KL-capped**" in text
    # When the fallback and the KL-capped choice are one candidate, it is evaluated once.
    same = synthetic_seed(frame.assign(induce=-1.0))
    assert same.primary == "layer_only" and same.arms() == {"chosen": "layer_only"}
    assert "**chosen**" in same.describe()
    with pytest.raises(KeyError, match="arditi"):
        same.vector("arditi")
    # A side the training filter kept whole says so, with the count that passed.
    whole = synthetic_seed(frame)
    whole.kept["harmful"] = list(range(20))
    whole.filters.update(min_keep=8, train_passed={"harmful": 3, "harmless": 20})
    expected = "kept 20/20 (**kept whole**: only 3 passed, fewer than min_keep=8) harmful, 20/20 harmless"
    assert expected in whole.describe()


def test_cached_outputs_generates_each_prompt_once():
    from hereticlab.measure.selection import cached_outputs

    calls = []

    def produce(missing):
        calls.append(list(missing))
        return pd.DataFrame({"prompt": missing, "response": [p.upper() for p in missing]})

    cache = {}
    first = cached_outputs(cache, "arm", produce, ["a", "b"])
    again = cached_outputs(cache, "arm", produce, ["c", "b", "a", "c"])
    assert calls == [["a", "b"], ["c"]]
    assert first["response"].tolist() == ["A", "B"] and again["response"].tolist() == ["C", "B", "A", "C"]
    assert cached_outputs(cache, "other", produce, ["a"])["prompt"].tolist() == ["a"] and len(calls) == 3


def test_select_for_seed_and_score_direction_on_tiny_model(tiny_llama):
    from hereticlab.measure.selection import arm_interventions, score_direction, select_for_seed

    model, tok = tiny_llama
    harmful, harmless = hl.PromptSet(tuple(PROMPTS * 2)), hl.PromptSet(tuple(p + "!" for p in PROMPTS * 2))
    harmful = hl.PromptSet(tuple(f"{p} ({i})" for i, p in enumerate(harmful)))
    prompts = {"harmful": harmful, "harmless": harmless}
    positions = [-2, -1]
    residuals = {
        s: hl.capture_residuals(model, tok, p, positions=positions, progress=False) for s, p in prompts.items()
    }
    metrics = {s: refusal_metric(model, tok, p) for s, p in prompts.items()}
    run = select_for_seed(
        model,
        tok,
        residuals,
        metrics,
        prompts,
        seed=1,
        n_test=3,
        n_val=2,
        positions=positions,
        layers=[1, 2],
        min_keep=2,
    )
    train, val, test = run.splits["harmful"]
    assert not set(train) & set(val) and not set(val) & set(test) and len(test) == 3
    assert set(run.kept["harmful"]) <= set(train) and len(run.kept["harmful"]) >= 2
    passed = run.filters["train_passed"]
    assert ("kept whole" in run.describe()) == (min(passed.values()) < 2)
    assert len(run.frame) == 4 and run.frame["seed"].eq(1).all() and run.frame["chosen"].sum() <= 1
    # The directions are the mean difference of the kept training prompts.
    expected = hl.mean_difference(
        residuals["harmful"][run.kept["harmful"], 1], residuals["harmless"][run.kept["harmless"], 1]
    )
    assert torch.allclose(run.directions[-1].vectors, expected.vectors)
    # score_direction gives the candidate's validation scores again.
    row = run.frame.iloc[0]
    r = run.directions[int(row["position"])].vectors[int(row["layer"])]
    val_bad = [harmful[j] for j in val]
    val_good = [harmless[j] for j in run.splits["harmless"][1]]
    scores = score_direction(model, tok, r, int(row["layer"]), val_bad, val_good)
    for key in ("bypass", "induce", "kl"):
        assert scores[key] == pytest.approx(float(row[key]), abs=1e-5)
    basis = torch.linalg.qr(torch.randn(64, 2))[0].T
    assert math.isnan(score_direction(model, tok, basis, 1, val_bad, val_good)["induce"])
    ablate, add = arm_interventions(model, r, 1)
    assert arm_interventions(model, None, 1) == (None, None)
    with ablate():
        ablated = refusal_metric(model, tok, val_bad)
    assert float(ablated.mean()) == pytest.approx(scores["bypass"], abs=1e-5)
    with add():
        added = refusal_metric(model, tok, val_good)
    assert float(added.mean()) == pytest.approx(scores["induce"], abs=1e-5)
