"""The model report's measures of whether greedy continuations read as Python."""

from sd2.report.model_report import distinct_4gram_share, parses, writes_body


def test_distinct_4grams():
    assert distinct_4gram_share("def f(x):\n    return x + 1\n") == 1.0
    assert distinct_4gram_share("\n" * 30) < 0.1  # blank lines are a loop too
    assert distinct_4gram_share("a = 1\n" * 10) < 0.2


def test_a_body_is_an_indented_first_line():
    assert writes_body("\n    return x\n")
    assert not writes_body("def g(y):\n    return y\n")  # a new top-level def, not the body
    assert not writes_body("\n\n")


def test_parses_cuts_at_the_last_full_line_unless_the_completion_ended():
    prompt = 'def f(x):\n    """Doc."""\n'
    assert parses(prompt, "    y = x * 2\n    return y\n    if (")
    assert not parses(prompt, "    y = (x *\n")
    assert parses(prompt, "    return x", ended=True)
    assert not parses(prompt, "    return x")  # cut at its last full line: nothing left


def test_a_blank_or_bodyless_completion_does_not_parse():
    prompt = 'def f(x):\n    """Doc."""\n'
    assert not parses(prompt, "")
    assert not parses(prompt, "\n\n\n", ended=True)
    assert not parses(prompt, "def g():\n    pass\n", ended=True)
