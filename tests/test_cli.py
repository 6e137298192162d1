import pytest

from dyncompile.cli import main


def test_cli_inspect_tiny_model(capsys):
    assert main(["inspect", "--model", "mlp", "--batch", "2", "--seq", "4"]) == 0
    out = capsys.readouterr().out
    assert "ffn" in out and "1 ffn, 0 attention, 0 residual" in out


def test_cli_unknown_model():
    with pytest.raises(SystemExit, match="unknown model 'nope'"):
        main(["inspect", "--model", "nope"])


@pytest.mark.slow
def test_cli_default_is_minilm(capsys):
    assert main(["inspect", "--seq", "128"]) == 0
    out = capsys.readouterr().out
    assert "6 ffn, 6 attention, 12 residual" in out and "S=128" in out
