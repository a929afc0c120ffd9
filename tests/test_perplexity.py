"""`pyllm perplexity` and pyllm.perplexity on any input size: logits held one step at a time, progress
away from a terminal, Ctrl-C, the logits an LLM returns (logits_to_keep, MAX_LOGITS_BYTES)."""

from __future__ import annotations

import functools
import gc
import io
import os
import weakref

import numpy as np
import pytest

from pyllm import cli
from pyllm.errors import LimitError
from pyllm.perplexity import PerplexityInterrupted, perplexity, scored_rows


def fake_logits(ids, vocab=16):
    """Logits f32 [len(ids), vocab] that depend on the ids (a made-up model)."""
    rng = np.random.default_rng(sum(int(i) * (k + 1) for k, i in enumerate(ids)) % 2**32)
    return rng.standard_normal((len(ids), vocab)).astype(np.float32)


def test_perplexity_holds_one_steps_logits_and_scores_the_kept_rows_alike():
    """perplexity() kept the previous step's logits (every window of the batch, [ctx, vocab] each) while the
    next step ran: two steps' at once. Each call now finds none of the earlier calls' logits alive; logits of
    the scored positions only (logits_to_keep) give the very same result."""
    tokens = list(np.random.default_rng(1).integers(0, 16, 16 * 9))
    alive = []

    def logits_many(group, keep=0):
        gc.collect()
        assert not [r for r in alive if r() is not None], "an earlier step's logits are still held"
        out = [fake_logits(ids)[len(ids) - (keep or len(ids)):] for ids in group]
        alive.extend(weakref.ref(o) for o in out)
        return out

    whole = perplexity(None, tokens, ctx=16, logits_many=logits_many, batch=2)
    assert whole.windows == 9 and len(alive) == 9
    kept = perplexity(None, tokens, ctx=16, logits_many=functools.partial(logits_many, keep=scored_rows(16)), batch=4)
    one = perplexity(fake_logits, tokens, ctx=16)
    assert kept.window_nll == whole.window_nll == one.window_nll and kept.perplexity == whole.perplexity
    with pytest.raises(ValueError, match="have 7 rows; scoring needs its last 8"):
        perplexity(lambda ids: fake_logits(ids)[-7:], tokens, ctx=16)


def test_perplexity_refuses_a_ctx_that_is_not_an_integer_of_at_least_4():
    tokens = list(range(16)) * 8
    for ctx in (3, 0, -8, 64.0, 4.5, True, "16", None):
        with pytest.raises(ValueError, match=r"ctx must be an integer of at least 4 \(tokens per window\), got"):
            perplexity(fake_logits, tokens, ctx=ctx)
    assert perplexity(fake_logits, tokens, ctx=np.int64(16).item()).windows == 8


@pytest.mark.parametrize("ctx", [5, 7, 16])
def test_perplexity_scores_the_second_half_of_odd_windows_as_llama_cpp(ctx):
    """llama.cpp scores positions ctx/2 .. ctx-2 (rounded down) of each window, predicting the next token."""
    tokens = list(np.random.default_rng(2).integers(0, 16, ctx * 3))
    result = perplexity(fake_logits, tokens, ctx=ctx)
    first = ctx // 2
    assert result.scored_tokens == 3 * (ctx - 1 - first)
    logits = fake_logits(tokens[:ctx]).astype(np.float64)[first:ctx - 1]
    nll = np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(logits)), tokens[first + 1:ctx]]
    assert np.isclose(result.window_nll[0], nll.mean(), rtol=1e-12)


def test_ctrl_c_in_perplexity_keeps_the_windows_scored():
    """Ctrl-C mid-run lost every window scored; perplexity() now raises PerplexityInterrupted (a
    KeyboardInterrupt) with their result, as llama.cpp's per-chunk values stay on screen."""
    tokens = list(np.random.default_rng(3).integers(0, 16, 16 * 6))
    calls = []

    def stopped_at_third(ids):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fake_logits(ids)

    with pytest.raises(PerplexityInterrupted) as stop:
        perplexity(stopped_at_third, tokens, ctx=16)
    assert isinstance(stop.value, KeyboardInterrupt)
    partial, first_two = stop.value.result, perplexity(fake_logits, tokens[:32], ctx=16)
    assert partial.interrupted and partial.windows == 2 and partial.window_nll == first_two.window_nll
    assert partial.perplexity == first_two.perplexity and partial.line().endswith("(interrupted)")
    calls.clear()
    with pytest.raises(PerplexityInterrupted) as stop:  # before any window: nothing to report
        perplexity(lambda ids: (_ for _ in ()).throw(KeyboardInterrupt), tokens, ctx=16)
    assert stop.value.result is None


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit(143)])
def test_pyllm_perplexity_prints_the_windows_scored_when_interrupted(stop, tiny_llama_f32, capsys, monkeypatch):
    """Ctrl-C or SIGTERM (`timeout 1h pyllm perplexity ...`; SystemExit(143) in pyllm's commands) printed
    nothing of the windows scored; their result is printed, marked (interrupted)."""
    import pyllm

    real = pyllm.LLM.logits_many
    calls = []

    def interrupted(self, sequences, logits_to_keep=0):
        calls.append(1)
        if len(calls) == 2:
            raise stop
        return real(self, sequences, logits_to_keep)

    monkeypatch.setattr(pyllm.LLM, "logits_many", interrupted)
    argv = ["perplexity", tiny_llama_f32, "-c", "32", "--windows", "6", "--parallel", "2", "-t", "1"]
    if stop is KeyboardInterrupt:
        assert cli.main(argv) == 130
    else:
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 143
    out = capsys.readouterr().out
    assert "over 2 windows of 32 tokens (30 scored)" in out and out.rstrip().endswith("(interrupted)"), out


def test_llm_logits_to_keep_and_the_limit_on_logits(tiny_llama_f32, monkeypatch):
    """LLM.logits / logits_many returned every position's logits, whatever their size (a long text with a
    large vocabulary: GBs); logits_to_keep (transformers') returns the last positions' only, the same values,
    and more than limits.MAX_LOGITS_BYTES in one call is a LimitError before any work."""
    import pyllm
    import pyllm.limits

    ids = list(range(3, 40))
    with pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=64, n_parallel=2) as llm:
        whole = llm.logits(ids)
        assert whole.shape == (37, llm.config.vocab_size)
        # (the same bits from 24 rows on: below, the engine's float matmul takes another path, whose sums
        # differ in the last bits)
        for keep in (24, 30, 37, 100):
            assert np.array_equal(llm.logits(ids, logits_to_keep=keep), whole[-keep:])
        assert np.allclose(llm.logits(ids, logits_to_keep=1), whole[-1:], rtol=1e-5, atol=1e-5)
        many = llm.logits_many([ids, ids[:5], ids[:30]], logits_to_keep=18)
        assert [m.shape[0] for m in many] == [18, 5, 18]
        assert np.allclose(many[0], whole[-18:], rtol=1e-5, atol=1e-5)
        assert np.allclose(many[1], llm.logits(ids[:5]), rtol=1e-5, atol=1e-5)
        assert np.array_equal(llm.logits_many([ids])[0], whole)
        for bad in (-1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="logits_to_keep must be a non-negative integer"):
                llm.logits(ids, logits_to_keep=bad)
            with pytest.raises(ValueError, match="logits_to_keep"):
                llm.logits_many([ids], logits_to_keep=bad)
        monkeypatch.setattr(pyllm.limits, "MAX_LOGITS_BYTES", 20 * llm.config.vocab_size * 4)
        assert llm.logits(ids, logits_to_keep=20).shape[0] == 20
        with pytest.raises(LimitError, match=r"37 rows of 512 logits take 75,776 bytes, past the limit of 40,960 \(pyllm.limits.MAX_LOGITS_BYTES\)"):
            llm.logits(ids)
        assert len(llm.logits_many([ids, ids], logits_to_keep=10)) == 2
        with pytest.raises(LimitError, match="22 rows"):  # all the lists' rows together
            llm.logits_many([ids, ids], logits_to_keep=11)
        # perplexity asks for the rows it scores: --ctx 32 fits where every position's logits would not
        monkeypatch.setattr(pyllm.limits, "MAX_LOGITS_BYTES", 16 * llm.config.vocab_size * 4)
        tokens = list(range(3, 3 + 64))
        keep = functools.partial(llm.logits, logits_to_keep=scored_rows(32))
        assert perplexity(keep, tokens, ctx=32).windows == 2
        with pytest.raises(LimitError):
            perplexity(llm.logits, tokens, ctx=32)


def test_progress_is_plain_lines_away_from_a_terminal(monkeypatch):
    """A progress bar written to a file (`2> log.txt`) was every redraw joined by carriage returns; there it
    is now plain lines (first state, at most one per PLAIN_INTERVAL, last), and redrawn in place on a terminal."""
    from pyllm.progress import progress_bar

    log = io.StringIO()
    with progress_bar(1000, "work", "item", log=log) as bar:
        for _ in range(1000):
            bar.set_postfix(x="1", refresh=False)
            bar.update(1)
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and lines[-1] == "" and len(lines) == 3, lines
    assert lines[0].startswith("work:   0%") and lines[1].startswith("work: 100%") and "1000/1000" in lines[1]
    quiet = io.StringIO()
    with progress_bar(5, "work", "item", enabled=False, log=quiet) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""
    leader, follower = os.openpty()
    with open(follower, "w") as terminal:
        with progress_bar(3, "work", "item", log=terminal, mininterval=0) as bar:
            bar.update(3)
    shown = b""
    while True:  # (one read gave only the first redraw at times: the pty hands over what has arrived)
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the follower is closed and everything was read
            break
        if not chunk:
            break
        shown += chunk
    shown = shown.decode()
    os.close(leader)
    assert "\r" in shown and "work: 100%" in shown


def test_pyllm_perplexity_progress_in_a_file_has_no_carriage_returns(tiny_llama_f32, capsys):
    assert cli.main(["perplexity", tiny_llama_f32, "-c", "32", "--windows", "5", "--parallel", "2", "-t", "1"]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err and "perplexity: 100%" in err and "5/5" in err
    assert "over 5 windows of 32 tokens (75 scored)" in out


@pytest.mark.parametrize("ctx", [16, 128])
def test_perplexity_is_the_same_bits_whatever_parallel_and_threads(ctx, tiny_llama_f32, capsys):
    """Each window's value is the same, bit for bit, scored alone or with others in a step, on 1 or 2
    threads, and `pyllm perplexity` prints the same line. (Asked for its 8 scored rows alone, a window of
    16 tokens scored differently alone than with others: the engine's float matmuls take another path
    under 12-24 rows; logits_to_keep(ctx) asks for every row of windows that small.)"""
    import pyllm
    from pyllm.perplexity import default_text, leading_tokens, logits_to_keep

    seen = {}
    for parallel, threads in ((1, 1), (3, 1), (3, 2)):
        with pyllm.LLM(tiny_llama_f32, n_threads=threads, context_length=ctx, n_parallel=parallel) as llm:
            tokens = leading_tokens(lambda t: llm.tokenize(t, add_special_tokens=False, parse_special=False),
                                    default_text(), 5 * ctx)
            keep = logits_to_keep(ctx)
            assert keep == (0 if ctx == 16 else 64)
            result = perplexity(functools.partial(llm.logits, logits_to_keep=keep), tokens, ctx=ctx, windows=5,
                                logits_many=functools.partial(llm.logits_many, logits_to_keep=keep), batch=parallel)
            seen[parallel, threads] = (result.window_nll, result.perplexity, result.uncertainty)
        assert cli.main(["perplexity", tiny_llama_f32, "-c", str(ctx), "--windows", "5", "--parallel", str(parallel),
                         "-t", str(threads)]) == 0
        seen[parallel, threads, "cli"] = capsys.readouterr().out.split(", ")[0]
    assert seen[1, 1] == seen[3, 1] == seen[3, 2], seen
    assert seen[1, 1, "cli"] == seen[3, 1, "cli"] == seen[3, 2, "cli"], seen


@pytest.mark.parametrize("model", ["tiny", "default"])
def test_a_long_text_is_tokenized_a_piece_at_a_time_into_the_same_ids(model, tiny_llama_f32, request, tmp_path,
                                                                       capsys, monkeypatch):
    """`pyllm perplexity --text FILE` without --windows gave the whole file to the tokenizer at once: ~180
    bytes a character (a 22 MB text took 4 GB; the 1 GiB a text file may hold, ~190 GB). text_tokens hands
    it pieces cut where tokenization splits alike (the same ids: tests/test_names.py checks them on English,
    code, CJK and emoji, a text without line ends), the command the same perplexity; a tokenizer that marks
    a text's start gets the text whole."""
    import pyllm
    import pyllm.perplexity
    from pyllm.perplexity import default_text, text_tokens

    path = tiny_llama_f32 if model == "tiny" else request.getfixturevalue("default_model_file")
    docs = default_text()[:5000]  # (the ids of longer texts and others: test_names' test of leading_tokens)
    marked = lambda text: [0] + [ord(c) for c in text]  # noqa: E731 - a start marker: no cut splits alike
    assert list(text_tokens(marked, docs, piece_chars=1000)) == marked(docs)
    done = []
    assert list(text_tokens(lambda t: [ord(c) for c in t], docs, 1000, done.append)) == [ord(c) for c in docs]
    assert len(done) > 2 and done == sorted(done) and done[-1] == len(docs)  # progress after each piece
    file = tmp_path / "docs.txt"
    file.write_text(docs)
    real, longest = pyllm.LLM.tokenize, []

    def tokenize_recorded(self, text, *args, **kwargs):
        longest.append(len(text))
        return real(self, text, *args, **kwargs)

    results = []
    for piece in (10**9, 1000):
        monkeypatch.setattr(pyllm.perplexity, "PIECE_CHARS", piece)
        monkeypatch.setattr(pyllm.LLM, "tokenize", tokenize_recorded)
        longest.clear()
        assert cli.main(["perplexity", path, "-t", "1", "--text", str(file), "-c", "128"]) == 0
        out, err = capsys.readouterr()
        results.append(out.split(", ")[0])
        assert ("tokenizing: 100%" in err) == (piece == 1000), err  # a bar for a text of more than 4 pieces
    assert max(longest) < 3 * 1000, max(longest)
    assert results[0] == results[1] and " windows of 128 tokens" in results[0], results


def test_pyllm_perplexity_scores_fewer_windows_per_call_where_their_logits_pass_the_limit(tiny_llama_f32, capsys,
                                                                                           monkeypatch):
    """--parallel windows' logits in one call past limits.MAX_LOGITS_BYTES (--parallel 64 --ctx 4096: 25 GB
    for SmolLM2) were a LimitError; the command now asks for as many windows per call as fit, same result."""
    import pyllm.limits

    argv = ["perplexity", tiny_llama_f32, "-c", "128", "--windows", "4", "--parallel", "4", "-t", "1"]
    assert cli.main(argv) == 0
    before = capsys.readouterr().out.split(", ")[0]
    monkeypatch.setattr(pyllm.limits, "MAX_LOGITS_BYTES", 100 * 512 * 4)  # one window's 64 rows, not two
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.split(", ")[0] == before


def test_pyllm_perplexity_says_when_the_text_holds_fewer_windows_than_asked(tiny_llama_f32, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert cli.main(["perplexity", tiny_llama_f32, "-t", "1", "--text", str(text), "-c", "64", "--windows", "50"]) == 0
    out, err = capsys.readouterr()
    held = int(out.split(" over ")[1].split()[0])
    assert 1 <= held < 50 and f"warning: --windows 50: the text holds {held} window(s) of --ctx 64" in err, err
    assert cli.main(["perplexity", tiny_llama_f32, "-t", "1", "--text", str(text), "-c", "64", "--windows", "1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_an_error_while_scoring_is_said_on_its_own_line_after_the_bar(tiny_llama_f32, capsys, monkeypatch):
    """An error raised while windows were scored was written after the bar's unfinished line (on a
    terminal, on the same line); the bar is closed first."""
    import pyllm.limits

    import sys

    monkeypatch.setattr(pyllm.limits, "MAX_LOGITS_BYTES", 10 * 512 * 4)  # less than one window's 64 rows
    argv = ["perplexity", tiny_llama_f32, "-c", "128", "--windows", "2", "-t", "1"]
    assert cli.main(argv) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[-2].startswith("perplexity:   0%|") and lines[-1].startswith("pyllm perplexity: error: logits of"), lines
    leader, follower = os.openpty()
    with open(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert cli.main(argv) == 1
        terminal.flush()
    shown = os.read(leader, 16384).decode()
    os.close(leader)
    assert "\r\npyllm perplexity: error: logits of" in shown, shown  # (pty line ends: \r\n)


def test_pyllm_perplexity_reads_a_fifo_as_a_file(tiny_llama_f32, tmp_path, capsys):
    """`--text <(zcat corpus.gz)` (a pipe) or a FIFO is read to its end, as a file: the same result."""
    import threading

    text = "The quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "text.txt").write_text(text)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(text), daemon=True)
    writer.start()
    results = []
    for source in (fifo, tmp_path / "text.txt"):
        assert cli.main(["perplexity", tiny_llama_f32, "-t", "1", "--text", str(source), "-c", "64"]) == 0
        results.append(capsys.readouterr().out.split(", ")[0])
    writer.join(5)
    assert results[0] == results[1] and "windows of 64 tokens" in results[0], results
