"""The progress bar a whole job draws on a terminal (conftest's single_process_run, its stderr on a pty)."""

import re


def test_a_terminal_gets_one_bar_redrawn_in_place(single_process_run):
    terminal = single_process_run.terminal
    assert "progress:" not in terminal
    draws = re.findall(r"\r\[([#.]{30})\] (\d+)/16 rows", terminal)
    assert draws and draws[-1] == ("#" * 30, "16")
    # The bar's line ends once, at the end; a terminal shows "\n" as "\r\n".
    assert re.search(r"\] 16/16 rows, [\d.]+k/[\d.]+k residues \(100%\), [^\r\n]*\r\n", terminal)
