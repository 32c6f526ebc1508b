"""What every CLI error test checks: exit status 2 and one `lowbit: error:` line on stderr."""

from __future__ import annotations

from lowbit.compiler.cli import main


def cli_error(capsys, argv: list[str], *, stdout_empty: bool = True) -> str:
    """Run ``lowbit ARGV``; assert it failed with exactly one error line (progress lines aside); that line."""
    code = main(argv)
    captured = capsys.readouterr()
    err = "\n".join(line for line in captured.err.splitlines() if not line.startswith("[lowbit] ")).strip()
    assert code == 2, captured
    assert len(err.splitlines()) == 1 and err.startswith("lowbit: error: "), err
    if stdout_empty:
        assert captured.out == "", captured
    return err
