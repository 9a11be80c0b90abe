"""Progress bars: in place on a terminal, a few plain lines in a log."""

import io

from loratag import progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_bar_writes_few_plain_lines(monkeypatch):
    """A log (CI, nohup) used to get one endless carriage-return line per run; now: plain lines, at most one
    every LOG_INTERVAL_S seconds (plus the last), whatever the number of steps."""
    log = io.StringIO()
    b = progress.bar(20_000, "epoch 1/1", "step", stream=log)
    for _ in range(20_000):
        b.update(1)
    b.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3, lines
    assert "20000/20000" in lines[-1] and lines[-1].startswith("epoch 1/1")


def test_off_a_terminal_lines_come_at_the_interval(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    log = io.StringIO()
    b = progress.bar(5, "predict", "sent", stream=log)
    for _ in range(5):
        b.update(1)
    b.close()
    lines = log.getvalue().splitlines()
    assert len(lines) >= 5 and all("predict" in line for line in lines)


def test_on_a_terminal_the_bar_redraws_in_place():
    tty = Tty()
    b = progress.bar(3, "tokenize", "sent", stream=tty)
    for _ in range(3):
        b.update(1)
    b.close()
    assert "\r" in tty.getvalue()


def test_disabled_bar_writes_nothing(capsys):
    b = progress.bar(3, "x", "step", enabled=False)
    b.update(3)
    b.close()
    assert capsys.readouterr().err == ""
