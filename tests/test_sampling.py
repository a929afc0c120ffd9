"""Sampling: each filter against a plain numpy reference of the filtered distribution and against
transformers' logits warpers; seeded draws reproducible and distributed as the filtered distribution."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pyllm.errors import PyllmError
from pyllm.sampling import MIN_REPETITION_PENALTY, Sampler, SamplingParams

VOCAB = 50


def _softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def reference(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0):
    """Filtered distribution, spelled out token by token (no vectorized tricks)."""
    probs = _softmax(np.asarray(logits, dtype=np.float64) / temperature)
    ranked = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = set(ranked)
    if top_k:
        keep = set(ranked[:top_k])
        probs = np.array([probs[i] if i in keep else 0.0 for i in range(len(probs))])
        probs /= probs.sum()
    if top_p < 1.0:
        total, kept = 0.0, set()
        for i in ranked:  # smallest most-likely set whose mass reaches top_p
            if i not in keep:
                continue
            kept.add(i)
            total += probs[i]
            if total >= top_p:
                break
        keep = kept
        probs = np.array([probs[i] if i in keep else 0.0 for i in range(len(probs))])
        probs /= probs.sum()
    if min_p > 0.0:
        top = max(probs)
        probs = np.array([p if p >= min_p * top else 0.0 for p in probs])
        probs /= probs.sum()
    if typical_p < 1.0:  # nearest the entropy first, until their mass reaches typical_p (and ties of the last)
        entropy = -sum(p * np.log(p) for p in probs if p > 0)
        distance = {i: abs(-np.log(probs[i]) - entropy) for i in range(len(probs)) if probs[i] > 0}
        total, last = 0.0, None
        for i in sorted(distance, key=lambda i: distance[i]):
            total, last = total + probs[i], i
            if total >= typical_p:
                break
        probs = np.array([p if p > 0 and distance[i] <= distance[last] else 0.0 for i, p in enumerate(probs)])
        probs /= probs.sum()
    return probs


CASES = [
    dict(temperature=1.0, top_k=5),
    dict(temperature=0.7, top_k=1),
    dict(temperature=1.3, top_p=0.9),
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.8, min_p=0.3),
    dict(temperature=1.0, top_k=20, top_p=0.8, min_p=0.05),
    dict(temperature=1.0, typical_p=0.5),
    dict(temperature=0.6, typical_p=0.9),
    dict(temperature=1.2, top_k=30, top_p=0.95, min_p=0.02, typical_p=0.7),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_filtered_distribution_matches_numpy_reference(case):
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = (rng.standard_normal(VOCAB) * 3).astype(np.float32)
        got = Sampler(SamplingParams(**case)).probabilities(logits)
        np.testing.assert_allclose(got, reference(logits, **case), rtol=1e-9, atol=1e-12)
        assert (got > 0).sum() >= 1 and abs(got.sum() - 1) < 1e-12


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_filtered_distribution_matches_transformers(case):
    torch = pytest.importorskip("torch")
    gen = pytest.importorskip("transformers.generation.logits_process")
    warpers = [gen.TemperatureLogitsWarper(case["temperature"])]
    if case.get("top_k"):
        warpers.append(gen.TopKLogitsWarper(case["top_k"]))
    if case.get("top_p", 1.0) < 1.0:
        warpers.append(gen.TopPLogitsWarper(case["top_p"]))
    if case.get("min_p"):
        warpers.append(gen.MinPLogitsWarper(case["min_p"]))
    if case.get("typical_p", 1.0) < 1.0:
        warpers.append(gen.TypicalLogitsWarper(case["typical_p"]))
    rng = np.random.default_rng(1)
    for _ in range(20):
        logits = (rng.standard_normal(VOCAB) * 3).astype(np.float32)
        scores = torch.tensor(logits[None].astype(np.float64))
        for w in warpers:
            scores = w(torch.zeros((1, 1), dtype=torch.long), scores)
        expected = torch.softmax(scores, dim=-1)[0].numpy()
        np.testing.assert_allclose(Sampler(SamplingParams(**case)).probabilities(logits), expected, atol=1e-9)


def test_draws_follow_the_filtered_distribution():
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])).astype(np.float32)
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.85, seed=3))
    probs = sampler.probabilities(logits)
    draws = np.bincount([sampler(logits) for _ in range(20000)], minlength=6) / 20000
    assert draws[probs == 0].sum() == 0
    # binomial standard error at 20000 draws is <= 0.0036; allow 5 sigma
    np.testing.assert_allclose(draws, probs, atol=0.018)


def test_same_seed_same_draws_and_greedy_at_temperature_zero():
    rng = np.random.default_rng(2)
    logits = [(rng.standard_normal(VOCAB)).astype(np.float32) for _ in range(50)]
    params = dict(temperature=0.9, top_k=10, top_p=0.95, seed=1234)
    a = [Sampler(SamplingParams(**params))(x) for x in logits]
    s1, s2 = Sampler(SamplingParams(**params)), Sampler(SamplingParams(**params))
    assert [s1(x) for x in logits] == [s2(x) for x in logits]
    assert len(set(a)) > 1
    greedy = Sampler(SamplingParams(temperature=0.0, top_k=3, seed=1))
    assert [greedy(x) for x in logits] == [int(np.argmax(x)) for x in logits]


def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(3)
    processor = transformers.RepetitionPenaltyLogitsProcessor(penalty=1.7)
    for _ in range(20):
        logits = rng.standard_normal(64).astype(np.float32)
        context = [int(i) for i in rng.integers(0, 64, 12)]
        expected = processor(torch.tensor([context]), torch.tensor(logits[None].copy()))[0].numpy()
        got = Sampler(SamplingParams(repetition_penalty=1.7))(logits, context)
        assert got == int(np.argmax(expected))


def test_invalid_settings_are_refused():
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=-0.1), dict(top_p=1.5), dict(min_p=-0.1),
                dict(repetition_penalty=0.0), dict(presence_penalty=2.5), dict(frequency_penalty=-3),
                dict(logit_bias={1: 101.0}), dict(logit_bias={-1: 1.0}), dict(logit_bias={"1": 1.0}),
                dict(typical_p=0.0), dict(typical_p=1.5), dict(typical_p=float("nan")),
                # numpy's ValueError "expected non-negative integer" and TypeErrors, a bool taken as 1
                dict(seed=-5), dict(seed=1.5), dict(seed="3"), dict(seed=True),
                dict(top_k=1.5), dict(top_k=True), dict(temperature="hot"), dict(top_p=True), dict(min_p=None),
                dict(repetition_penalty="1.1"), dict(presence_penalty=np.bool_(True)), dict(logit_bias={1: "x"}),
                dict(logit_bias={1: True}), dict(logit_bias={1: float("nan")})):
        with pytest.raises(ValueError, match=next(iter(bad))):  # naming the option
            Sampler(SamplingParams(**bad))


def test_presence_and_frequency_penalties_follow_openai_over_generated_tokens():
    """OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence, c counting the sampled tokens only."""
    rng = np.random.default_rng(4)
    prompt = [1, 2, 3, 3]
    for _ in range(10):
        logits = rng.standard_normal(VOCAB).astype(np.float32)
        generated = [int(i) for i in rng.integers(0, 8, 6)]
        sampler = Sampler(SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4), prompt_length=len(prompt))
        expected = logits.astype(np.float64)
        for j in range(VOCAB):
            c = generated.count(j)
            expected[j] -= c * -0.4 + (c > 0) * 0.7
        np.testing.assert_allclose(sampler.processed(logits, prompt + generated), expected, atol=1e-12)


def test_logit_bias_and_caller_processors_run_first_in_order():
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[7] = 5.0
    assert Sampler(SamplingParams(logit_bias={3: 100.0}))(logits) == 3
    assert Sampler(SamplingParams(logit_bias={7: -100.0}))(logits) != 7
    seen = []

    def ban_three(ids, scores):
        seen.append(list(ids))
        scores[3] = -np.inf
        return scores

    sampler = Sampler(SamplingParams(temperature=1.0, logit_bias={3: 100.0}, seed=0), processors=[ban_three])
    assert all(sampler(logits, [1, 2]) != 3 for _ in range(20)) and seen[0] == [1, 2]
    with pytest.raises(ValueError, match="no token"):
        Sampler(SamplingParams(), processors=[lambda ids, s: np.full_like(s, -np.inf)])(logits)


def test_top_p_zero_keeps_only_the_most_likely_token():
    logits = np.random.default_rng(5).standard_normal(VOCAB).astype(np.float32)
    probs = Sampler(SamplingParams(temperature=1.0, top_p=0.0)).probabilities(logits)
    assert probs[int(np.argmax(logits))] == 1.0


def _nucleus_by_full_sort(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The rule as first written: a stable sort of the whole vocabulary."""
    order = np.argsort(-probs, kind="stable")
    return order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=0.8, top_p=0.9)])
def test_non_finite_logits_are_refused_with_a_clear_error(bad, params):
    logits = np.zeros(VOCAB, np.float32)
    logits[7] = bad
    # pyllm's own error (a ValueError): damaged weights give it, and callers catch PyllmError
    from pyllm.errors import PyllmError

    with pytest.raises(PyllmError, match="logits are not finite"):
        Sampler(SamplingParams(**params))(logits)


def test_draw_is_numpy_choice_bit_for_bit():
    """draw() is rng.choice(n, p=probs) without its checks, over the possible ids: for every seed the
    same ids, from the same random stream, for peaked, flat, tied and mostly-zero (top-k / top-p)
    distributions of 1 to 49152 ids, several draws in a row."""
    from pyllm.sampling import draw

    g = np.random.default_rng(5)
    for n in (1, 2, 7, 64, 1000, 49152):
        for kind in ("peaked", "flat", "zeros", "ties"):
            scores = g.standard_normal(n) * (0.01 if kind == "flat" else 3)
            if kind == "zeros":
                scores[g.random(n) < 0.95] = -np.inf
            if kind == "ties":
                scores = np.round(scores, 1)
            if not np.isfinite(scores).any():
                scores[0] = 0.0
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            # the possible ids, when given: exactly the nonzero ones, or with some zeros among them
            nonzero = np.flatnonzero(probs)
            padded = np.union1d(nonzero, g.choice(n, size=min(n, 5), replace=False))
            for seed in range(40 if n < 49152 else 8):
                expected = [int(choice) for choice in np.random.default_rng(seed).choice(n, size=3, p=probs)]
                for possible in (None, nonzero, padded):
                    ours = np.random.default_rng(seed)
                    got = [draw(ours, probs, possible) for _ in range(3)]
                    assert got == expected, (n, kind, seed, possible is None)
                    assert all(probs[i] > 0 for i in got)


def test_draw_index_is_numpys_cumulative_search():
    """_core.draw_index (draw's search) against numpy's cumsum / cumsum[-1] searched from the right:
    the same index for any u, zeros and ties included; refuses what is not a non-empty vector."""
    from pyllm import _core

    g = np.random.default_rng(9)
    for n in (1, 2, 3, 100, 49152):
        probs = g.random(n) ** 8
        probs[g.random(n) < 0.3] = 0.0
        if not probs.any():
            probs[-1] = 1.0
        cdf = np.cumsum(probs)
        cdf /= cdf[-1]
        for u in [0.0, 1e-300, 0.5, 1 - 2**-53, *g.random(20), *cdf[: min(n, 20)]]:
            assert _core.draw_index(probs, u) == int(np.searchsorted(cdf, u, side="right")), (n, u)
    for bad in (np.zeros(0), np.ones((2, 2))):
        with pytest.raises(ValueError):
            _core.draw_index(bad, 0.5)


@pytest.mark.parametrize("params", [dict(temperature=0.8), dict(temperature=0.7, top_k=40),
                                    dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_p=0.95, min_p=0.05),
                                    dict(temperature=1.3, top_k=100, top_p=0.5, min_p=0.2),
                                    dict(temperature=1.0, typical_p=0.6),
                                    dict(temperature=0.9, top_k=50, typical_p=0.8)])
def test_sampler_draws_what_choice_draws_from_its_probabilities(params):
    """Sampler() takes the filters' possible ids straight to draw(): the same token as numpy's
    choice over probabilities() for every seed."""
    g = np.random.default_rng(3)
    for n in (50, 49152):
        logits = (g.standard_normal(n) * 4).astype(np.float32)
        for seed in range(30):
            sampler = Sampler(SamplingParams(seed=seed, **params))
            probs = sampler.probabilities(logits)
            assert sampler(logits) == int(np.random.default_rng(seed).choice(n, p=probs)), (n, seed)


def test_nucleus_is_the_full_sort_bit_for_bit():
    """top-p's token set is found among the most likely candidates first (nucleus); against sorting
    the whole vocabulary it must give the same ids in the same order: peaked, flat (the nucleus far
    past the first candidates), tied (equal probabilities at the candidates' edge), zeros (as top-k
    leaves them), tiny vocabularies, top_p from 0 to just below 1."""
    from pyllm.sampling import nucleus

    rng = np.random.default_rng(7)
    cases = []
    for n in (1, 2, 5, 63, 64, 65, 1000, 49152):
        cases.append(rng.standard_normal(n) * 3)  # peaked
        cases.append(rng.standard_normal(n) * 0.01)  # flat
        cases.append(np.round(rng.standard_normal(n), 1))  # many ties
        with_zeros = rng.standard_normal(n) * 2
        with_zeros[rng.random(n) < 0.9] = -np.inf  # top-k's -inf scores: probability 0
        cases.append(with_zeros)
    for scores in cases:
        if not np.isfinite(scores).any():
            scores[0] = 0.0
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        for top_p in (0.0, 0.1, 0.5, 0.9, 0.95, 0.999999, 1 - 1e-15):
            np.testing.assert_array_equal(nucleus(probs, top_p), _nucleus_by_full_sort(probs, top_p),
                                          err_msg=f"n={probs.size} top_p={top_p}")
            np.testing.assert_array_equal(nucleus(probs, top_p, first=1), _nucleus_by_full_sort(probs, top_p))


def test_top_k_probabilities_are_the_plain_formula_bit_for_bit():
    """top-k's exp runs over the kept scores only (the rest stay 0, as exp(-inf)): the same array, so
    the same sum, as exp over every score; with top-p (nucleus over top-k's few possible ids) too."""
    rng = np.random.default_rng(11)
    for n, top_k, top_p in [(49152, 50, 1.0), (49152, 50, 0.9), (1000, 1, 1.0), (1000, 999, 0.5), (300, 40, 0.95),
                            (64, 63, 0.99)]:
        logits = np.round(rng.standard_normal(n), 2).astype(np.float32)  # ties at the k-th score
        params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
        scores = logits.astype(np.float64) / 0.7
        kth = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores >= kth, scores, -np.inf)
        expected = np.exp(scores - scores.max())
        expected /= expected.sum()
        if top_p < 1.0:
            keep = _nucleus_by_full_sort(expected, top_p)
            mask = np.zeros_like(expected)
            mask[keep] = expected[keep]
            expected = mask / mask.sum()
        np.testing.assert_array_equal(Sampler(params).probabilities(logits), expected, err_msg=f"{n} {top_k} {top_p}")


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-300])
@pytest.mark.parametrize("filters", [{}, dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1)])
@pytest.mark.parametrize("shift", [0.0, 1e5, -50.0])  # large scores; every score negative
def test_a_temperature_so_small_that_scores_overflow_draws_the_most_likely_token(temperature, filters, shift):
    """scores / temperature overflowed to inf (inf - inf: NaN probabilities) and the draw gave id
    VOCAB, past the vocabulary: a server request with temperature 1e-310 failed every stream beside
    it (the engine refused the token in the shared step). The limit is greedy: the most likely ids alone."""
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal(VOCAB) * 3 + shift).astype(np.float32)
    for seed in range(5):
        sampler = Sampler(SamplingParams(temperature=temperature, seed=seed, **filters))
        probs = sampler.probabilities(logits)
        assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0)
        assert sampler(logits) == int(np.argmax(logits))
    tied = np.zeros(VOCAB, np.float32)
    tied[[3, 9]] = 2.0  # a tie among the most likely: either, as at any temperature
    for seed in range(10):
        assert Sampler(SamplingParams(temperature=temperature, seed=seed, **filters))(tied) in (3, 9)


@pytest.mark.parametrize("filters", [{}, dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1)])
def test_a_temperature_whose_scaled_scores_overflow_only_below_the_top_warns_nothing(filters):
    """Temperature 1e-308 with scores in (-1, 1): the top scales to a finite ~1e308, a score near -1
    to ~-1e308, and their difference overflows to -inf (exp: 0, its limit). numpy printed
    "RuntimeWarning: overflow encountered in subtract" into `pyllm run --temperature 1e-308`'s output."""
    import warnings

    logits = np.random.default_rng(5).uniform(-1, 1, VOCAB).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(3):
            sampler = Sampler(SamplingParams(temperature=1e-308, seed=seed, **filters))
            probs = sampler.probabilities(logits)
            assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0)
            assert sampler(logits) == int(np.argmax(logits))


def test_a_distribution_with_nan_is_refused_not_drawn_past_the_vocabulary():
    """draw_index gives n when no cumulative sum passes the draw (NaN): draw() raises ValueError
    instead of returning a token id past the vocabulary."""
    from pyllm.sampling import draw

    probs = np.full(VOCAB, np.nan)
    for possible in (None, np.arange(5)):
        with pytest.raises(ValueError, match="not finite"):
            draw(np.random.default_rng(0), probs, possible)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_processor_that_changes_the_vocabulary_size_is_refused(temperature):
    """A logits processor returning more (or fewer) scores than the vocabulary could make greedy
    choose a token past it."""
    logits = np.zeros(VOCAB, np.float32)
    for bad in (lambda ids, s: np.append(s, 99.0), lambda ids, s: s[:-1], lambda ids, s: None):
        with pytest.raises(ValueError, match="logits processor"):
            Sampler(SamplingParams(temperature=temperature), [bad])(logits)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_processor_s_scores_must_be_real_numbers_and_are_read_as_f64(temperature):
    """Scores of strings or objects failed inside numpy (UFuncTypeError: "ufunc 'maximum' did not
    contain a loop"), bools and complex numbers were sampled from in silence (True as 1, the
    imaginary part dropped with a ComplexWarning), and a torch tensor (what a transformers processor
    returns) failed at the draw with "'<' not supported". Now anything not real numbers is a
    ValueError naming the processor, and a tensor or an f32/int array is read as the f64 the next
    processor and the draw are documented to get."""
    torch = pytest.importorskip("torch")
    logits = np.arange(VOCAB, dtype=np.float32) / VOCAB
    for bad in (lambda ids, s: s.astype(str), lambda ids, s: s.astype(object), lambda ids, s: s > 0.5,
                lambda ids, s: s.astype(complex)):
        with pytest.raises(ValueError, match="logits processor.*not real numbers"):
            Sampler(SamplingParams(temperature=temperature, seed=3), [bad])(logits)
    expected = Sampler(SamplingParams(temperature=temperature, seed=3))(logits)
    seen = []

    def record(ids, scores):
        seen.append(scores.dtype)
        return scores
    for convert in (torch.from_numpy, lambda s: s.astype(np.float32)):
        sampler = Sampler(SamplingParams(temperature=temperature, seed=3), [lambda ids, s: convert(s), record])
        assert sampler(logits) == expected
    integers = Sampler(SamplingParams(temperature=temperature, seed=3), [lambda ids, s: np.arange(VOCAB), record])
    assert integers(logits) == Sampler(SamplingParams(temperature=temperature, seed=3))(np.arange(VOCAB) * 1.0)
    assert seen == [np.float64] * 3


@pytest.mark.parametrize("penalty", [1e-320, 5e-324, 1e-251, 1e308])
def test_a_repetition_penalty_that_overflows_the_scores_is_named(penalty):
    """Dividing a positive score by 1e-320 overflows: such a penalty is refused when the sampler is made,
    naming it (it was a ValueError at the first token seen, after tokens had gone out); multiplying a
    negative one by 1e308 overflows to -inf, that token out, without a RuntimeWarning."""
    logits = np.array([2.0, -3.0, 1.0, 0.5], dtype=np.float32)
    if penalty > 1:  # only the negative score seen overflows, to -inf: that token is out, the others stay
        sampler = Sampler(SamplingParams(temperature=0.7, repetition_penalty=penalty, seed=1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert sampler(logits, [1]) in (0, 2, 3)
        return
    with pytest.raises(ValueError, match="repetition_penalty must be a finite number >= 1e-250"):
        Sampler(SamplingParams(temperature=0.7, repetition_penalty=penalty, seed=1))
    # the smallest one taken divides the largest float32 logit (plus logit_bias's 100) to a finite score
    big = np.array([np.finfo(np.float32).max, 0.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(repetition_penalty=MIN_REPETITION_PENALTY, logit_bias={0: 100.0}))
    assert np.isfinite(sampler.processed(big, [0])).all()
    # a processor's overflow is still named, and one that rules every token out is still told apart
    with pytest.raises(ValueError, match="infinite or NaN.*repetition_penalty"), np.errstate(over="ignore"):
        Sampler(SamplingParams(repetition_penalty=0.5), [lambda ids, s: s * 1e308]).processed(logits, [0])
    with pytest.raises(ValueError, match="left no token possible"):
        Sampler(SamplingParams(), processors=[lambda ids, s: np.full_like(s, -np.inf)]).processed(logits)


def test_greedy_without_processors_is_the_argmax_of_the_processed_scores():
    """Greedy decoding with no processor skips the float64 copy (Sampler.__call__'s short path): the
    same token as processed()'s argmax, ties included (the first), for peaked, flat and tied logits."""
    rng = np.random.default_rng(3)
    cases = [rng.standard_normal(VOCAB).astype(np.float32) for _ in range(20)]
    cases += [np.zeros(VOCAB, np.float32), np.full(VOCAB, -3e38, np.float32)]
    tied = rng.standard_normal(VOCAB).astype(np.float32)
    tied[[5, 9, 40]] = tied.max() + 1
    cases.append(tied)
    sampler = Sampler(SamplingParams(temperature=0))
    for logits in cases:
        assert sampler(logits) == int(np.argmax(sampler.processed(logits)))
    assert sampler(tied) == 5


def test_most_likely_is_the_stable_argsort_s_head():
    """most_likely (top logprobs) gives what np.argsort(-x, kind="stable")[:k] gives, ties in id order,
    for k from 0 past the vocabulary, on random, tied, constant and -inf-holding values."""
    from pyllm.sampling import most_likely

    rng = np.random.default_rng(5)
    cases = [rng.standard_normal(VOCAB), rng.integers(0, 4, VOCAB).astype(np.float64), np.zeros(VOCAB),
             rng.standard_normal(VOCAB).astype(np.float32)]
    with_inf = rng.standard_normal(VOCAB)
    with_inf[::3] = -np.inf
    cases.append(with_inf)
    for x in cases:
        for k in (0, 1, 2, 5, 20, VOCAB - 1, VOCAB, VOCAB + 3):
            np.testing.assert_array_equal(most_likely(x, k), np.argsort(-x, kind="stable")[:k])


def test_greedy_with_logit_bias_alone_equals_the_full_path():
    """Greedy decoding with logit_bias as its only processor (a server's client banning the end token)
    takes a shortcut past _processed's float64 copy: the same token as argmax of the processed scores,
    ties (lowest id), a biased id that is the best logit, ids past the logits and NaN included."""
    rng = np.random.default_rng(0)
    for trial in range(400):
        vocab = int(rng.integers(2, 300))
        logits = rng.normal(0, 3, vocab).astype(np.float32)
        if trial % 4 == 0:  # ties: a few distinct values only
            logits = rng.integers(-2, 3, vocab).astype(np.float32)
        ids = rng.choice(vocab, size=int(rng.integers(1, min(vocab, 6) + 1)), replace=False)
        values = rng.choice([-100.0, -3.0, -0.5, 0.0, 0.5, 3.0, 100.0], size=ids.size)
        if trial % 5 == 0:  # a bias that makes a biased score equal another logit exactly
            values[0] = float(logits[(int(ids[0]) + 1) % vocab]) - float(logits[ids[0]])
        bias = {int(i): float(v) for i, v in zip(ids, values)}
        sampler = Sampler(SamplingParams(logit_bias=bias))
        expected = int(np.argmax(sampler.processed(logits, [])))
        assert sampler(logits, []) == expected, (trial, bias)
    logits = np.arange(10, dtype=np.float32)
    sampler = Sampler(SamplingParams(logit_bias={2: 100.0, 9: -100.0}))
    assert sampler._greedy_with_bias(logits, sampler.processors[0]) is None  # the best logit is biased
    assert sampler._greedy_with_bias(logits[::-1].copy(), sampler.processors[0]) == 2  # the shortcut's answer
    sampler = Sampler(SamplingParams(logit_bias={3: -100.0}))
    with pytest.raises(ValueError, match="vocabulary has 3"):
        sampler(np.zeros(3, np.float32), [])
    with pytest.raises(PyllmError, match="not finite"):
        sampler(np.array([0.0, np.nan, 1.0, 2.0], np.float32), [])
