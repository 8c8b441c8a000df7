"""`nmt translate` on whatever text users have: one output line per input line, or one error line."""

from __future__ import annotations

import random
import re

import pytest

from tests.reliability.conftest import nmt_process, one_line_error

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it

FAST = ("--greedy", "--max-len-a", "0", "--max-len-b", "3")  # short outputs: these tests are not about quality


def test_empty_input_gives_empty_output(cli, tiny_checkpoint):
    result = cli("translate", "-m", tiny_checkpoint, *FAST, stdin=b"")
    assert result.rc == 0 and result.out == "" and result.err == ""


def test_only_empty_lines_give_as_many_empty_lines(cli, tiny_checkpoint):
    result = cli("translate", "-m", tiny_checkpoint, *FAST, stdin=b"\n\n  \n\t\n\n")
    assert result.rc == 0 and result.out == "\n" * 5, result.err


def test_characters_never_seen_in_training(cli, tiny_checkpoint):
    text = "你好，世界！🎉🚀 ∮ E⋅da = Q, ሰማይ አይታረስ, Ünïcödé\u200b\u2028tail"
    result = cli("translate", "-m", tiny_checkpoint, *FAST, stdin=(text + "\n").encode())
    assert result.rc == 0, result.err
    assert result.out.count("\n") == 1  # U+2028 inside a line does not split it


def test_a_10000_word_line_is_truncated_to_the_model_and_translated(cli, tiny_checkpoint):
    # Documented in nmt.translate: lines over model.max_positions tokens are cut to fit.
    # Default search (the checkpoint's beam 2) and default length limits, which run into max_positions.
    words = random.Random(0).choices("a man woman dog runs in the red street".split(), k=10_000)
    result = cli("translate", "-m", tiny_checkpoint, stdin=f"A dog.\n{' '.join(words)}\nA man.\n".encode())
    assert result.rc == 0, result.err
    assert len(result.out.split("\n")) == 4 and result.out.endswith("\n")


def test_windows_line_endings_and_a_bom_are_ignored(cli, tiny_checkpoint, tmp_path):
    unix = cli("translate", "-m", tiny_checkpoint, *FAST, stdin=b"A man.\n\nTwo dogs.\n")
    windows = cli("translate", "-m", tiny_checkpoint, *FAST, stdin=b"\xef\xbb\xbfA man.\r\n\r\nTwo dogs.\r\n")
    assert unix.rc == windows.rc == 0 and windows.out == unix.out and unix.out.count("\n") == 3
    (tmp_path / "in.txt").write_bytes(b"A man.\r\n\r\nTwo dogs.\r\n")
    from_file = cli("translate", "-m", tiny_checkpoint, *FAST, "-i", tmp_path / "in.txt")
    assert from_file.rc == 0 and from_file.out == unix.out


@pytest.mark.parametrize("beam", ["0", "-1"])
def test_beam_below_one_is_rejected(cli, tiny_checkpoint, beam):
    line = one_line_error(cli("translate", "-m", tiny_checkpoint, "--beam", beam, stdin=b"A man.\n"))
    assert f"beam size must be >= 1, got {beam}" in line


@pytest.mark.parametrize("source", ["stdin", "file"])
def test_non_utf8_input_names_the_line(cli, tiny_checkpoint, tmp_path, source):
    data = b"A man.\ncaf\xe9 au lait\n"  # was a traceback (TypeError from stdin, UnicodeDecodeError from -i)
    if source == "file":
        (tmp_path / "in.txt").write_bytes(data)
        result, name = cli("translate", "-m", tiny_checkpoint, *FAST, "-i", tmp_path / "in.txt"), tmp_path / "in.txt"
    else:
        result, name = cli("translate", "-m", tiny_checkpoint, *FAST, stdin=data), "stdin"
    assert f"{name} line 2: not valid UTF-8 (byte 0xe9)" in one_line_error(result)


def test_unwritable_output_and_missing_input(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out.txt"  # was a FileNotFoundError traceback
    line = one_line_error(cli("translate", "-m", tiny_checkpoint, *FAST, "-o", out, stdin=b"A man.\n"))
    assert f"cannot write {out}: No such file or directory" in line
    line = one_line_error(cli("translate", "-m", tiny_checkpoint, *FAST, "-i", tmp_path / "nope.txt"))
    assert f"input file not found: {tmp_path / 'nope.txt'}" in line


MEASURE = """
import resource, sys
from nmt.checkpoint import load_for_inference
from nmt.cli import run
load_for_inference(sys.argv[1])  # imports and model loaded: the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rc = run(["translate", "-m", *sys.argv[1:]])
sys.stdout.flush()
print(f"peak rss growth kib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}", file=sys.stderr)
sys.exit(rc)
"""


def test_5000_lines_from_stdin_in_order_with_bounded_memory(tiny_checkpoint):
    rng = random.Random(0)
    words = "a man woman dog cat runs walks red blue street in the on with".split()
    lines = [" ".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(5000)]
    result = nmt_process(tiny_checkpoint, *FAST, "--batch-tokens", "1000", python=["-c", MEASURE],
                         input="".join(line + "\n" for line in lines).encode())
    err = result.stderr.decode()
    assert result.returncode == 0, err[-3000:]
    out = result.stdout.decode().split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines)
    assert all((o == "") == (line.strip() == "") for o, line in zip(out[:-1], lines, strict=True))
    growth_kib = int(re.search(r"peak rss growth kib (\d+)", err).group(1))
    assert growth_kib < 64 * 1024, f"translating 5000 short lines grew peak RSS by {growth_kib} KiB"
