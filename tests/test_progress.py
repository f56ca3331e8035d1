"""The sampling progress bar shares its line with nothing: auto's --verbose line and an error
raised under the bar (both come in the first step, while the bar is up) each start a line."""
import re

from fastddpm import sessions
from fastddpm.cli import main


def _lines(err: str) -> list[str]:
    """stderr as a terminal shows it: tqdm redraws its line after a carriage return."""
    return re.split(r"[\r\n]", err)


def _argv(model_file, out, num: int) -> list[str]:
    return ["sample", "--model", str(model_file), "--num", str(num), "--sampler", "ddim", "--steps", "2",
            "--device", "cpu", "--out", str(out)]


def test_verbose_lines_print_above_the_bar(tiny_model_file, tmp_path, capsys):
    sessions.clear()  # auto picks (and says so) on this process's first batch of this size
    assert main([*_argv(tiny_model_file, tmp_path / "a.png", 3), "--verbose"]) == 0
    lines = _lines(capsys.readouterr().err)
    assert any(line.startswith("auto: torch for batch 3") for line in lines)
    assert any(line.startswith("sampling:") and "2/2" in line for line in lines)  # the bar was up
    assert not any("sampling" in line and "auto:" in line for line in lines)


def test_an_error_under_the_bar_starts_a_line(tiny_model_file, tmp_path, capsys, monkeypatch):
    sessions.clear()
    monkeypatch.setenv("FASTDDPM_AUTO_ENGINES", "none-such")  # auto refuses in the first step
    out = tmp_path / "b.png"
    assert main(_argv(tiny_model_file, out, 4)) == 2
    lines = _lines(capsys.readouterr().err)
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("fastddpm sample: error: FASTDDPM_AUTO_ENGINES")
    assert any(line.startswith("sampling:") and "0/2" in line for line in lines)  # under the bar
    assert not out.exists()
