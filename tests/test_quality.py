"""The model report's measures of whether greedy continuations read as Python."""

from sd2.quality import distinct_4gram_share, parses


def test_distinct_4grams():
    assert distinct_4gram_share("def f(x):\n    return x + 1\n") == 1.0
    assert distinct_4gram_share("\n" * 30) < 0.1  # blank lines are a loop too
    assert distinct_4gram_share("a = 1\n" * 10) < 0.2


def test_parses_cuts_at_the_last_full_line():
    prompt = 'def f(x):\n    """Doc."""\n'
    assert parses(prompt, "    y = x * 2\n    return y\n    if (")
    assert not parses(prompt, "    y = (x *\n")
    assert parses(prompt, "")
