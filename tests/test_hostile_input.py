"""Bad input gets exit 2 and one line, fast and torch-free; scenario and runner
text never reaches a terminal as markup or escape codes; an interrupted or
concurrent `explore` keeps its counts. Each case runs the command line in a
subprocess with a time limit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 60

# Runs the CLI, then reports whether torch was imported on the way.
_PROBE = ("import sys, cli\n"
          "code = cli.main(sys.argv[1:])\n"
          "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED', file=sys.stderr)\n"
          "sys.exit(code)\n")


def moe_twin(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str, bool]:
    p = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=LIMIT_S, env={**os.environ, **(env or {})})
    err = p.stderr.replace("TORCH_NOT_IMPORTED\n", "")
    torch = "TORCH_IMPORTED" in err
    return p.returncode, p.stdout, err.replace("TORCH_IMPORTED\n", ""), torch


def assert_bad_input(argv: list[str], needle: str, env: dict[str, str] | None = None) -> None:
    code, out, err, torch = moe_twin(*argv, env=env)
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "c10d" not in err, err
    assert needle in lines[0], lines[0]
    assert not torch, "a one-line error must not import torch"


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    (tmp_path / "dir.toml").mkdir()
    os.mkfifo(tmp_path / "fifo.toml")
    (tmp_path / "empty.toml").write_text("")
    (tmp_path / "comments.toml").write_text("# nothing but a comment\n\n")
    (tmp_path / "latin1.toml").write_bytes('name = "café"\n'.encode("latin-1"))
    (tmp_path / "deep.toml").write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "deep_tables.toml").write_text("a = " + "{b=" * 900 + "1" + "}" * 900 + "\n")
    (tmp_path / "markup.toml").write_text(
        'name = "x[/bold] [link=http://evil.example]click[/link] \\u001b[31mRED \\u001b]8;;http://x\\u0007"\n'
        'summary = "s[/] [bold red]loud"\n[model]\nhidden = 128\n')
    return tmp_path


# ---------------------------------------------------------------- exit 3 -> exit 2, validated before anything starts


@pytest.mark.parametrize("argv,needle", [
    (["run", "r4-gpt-oss-padded", "--timeout=inf"], "--timeout: must be between 1 and 86400 seconds"),
    (["run", "r4-gpt-oss-padded", "--timeout=1e300"], "--timeout: must be between 1 and 86400 seconds"),
    (["check", "r4-gpt-oss-padded", "--timeout=1e-9"], "--timeout: must be between 1 and 86400 seconds"),
    (["check", "r4-gpt-oss-padded", "--timeout=nan"], "--timeout: must be between"),
    (["replay", "--real", "--timeout=-1"], "--timeout: must be between"),
    (["explore", "--timeout=inf"], "--timeout: must be between"),
    (["simulate", "r3-tp-decode", "--sim-timeout=inf"], "--sim-timeout: must be between 0.1 and 3600"),
    (["simulate", "r3-tp-decode", "--max-ops=0"], "--max-ops: must be between 1 and 1,000,000"),
    (["simulate", "r3-tp-decode", "--max-ops=lots"], "--max-ops: expected a whole number"),
    (["simulate", "r3-tp-decode", "--width", "99999999999"], "--width: from 40 to 1000 columns"),
    (["verify", "--max-world", "100000"], "--max-world: must be a number of ranks from 1 to 1024"),
    (["mutate", "--max-world", "99999"], "--max-world: must be a number of ranks from 1 to 1024"),
])
def test_absurd_numbers_are_bad_input(argv, needle):
    assert_bad_input(argv, needle)


def test_deeply_nested_toml_is_bad_input(files):
    assert_bad_input(["simulate", str(files / "deep.toml")], "nests tables or arrays too deeply")
    assert_bad_input(["show", str(files / "deep_tables.toml")], "nests tables or arrays too deeply")


# ---------------------------------------------------------------- files that are not scenario files


def test_empty_scenario_file_is_refused(files):
    assert_bad_input(["simulate", str(files / "empty.toml")], "empty.toml is empty")
    assert_bad_input(["show", str(files / "comments.toml")], "comments.toml is empty")


def test_directory_and_fifo_say_what_they_are(files):
    assert_bad_input(["show", str(files / "dir.toml")], "dir.toml is a directory, not a scenario file")
    t0 = time.monotonic()
    assert_bad_input(["show", str(files / "fifo.toml")], "fifo.toml is a FIFO (named pipe), not a scenario file")
    assert time.monotonic() - t0 < 30  # never blocks waiting for a writer
    assert_bad_input(["show", str(files / "no-such.toml")], "no such file")


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    f = tmp_path / "bom.toml"
    f.write_bytes(b"\xef\xbb\xbf" + (ROOT / "scenarios/catalog/r3-tp-decode.toml").read_bytes())
    p = subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "show", str(f)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_non_utf8_file_is_named(files):
    assert_bad_input(["simulate", str(files / "latin1.toml")], f"{files / 'latin1.toml'} is not UTF-8 text")


# ---------------------------------------------------------------- no torch for a one-line error


@pytest.mark.parametrize("argv,needle", [
    (["simulate", "nope"], "unknown scenario 'nope'"),
    (["simulate", "r1-sp-deepep", "--runner", "bogus"], "unknown runner 'bogus'"),
    (["simulate", "r1-sp-deepep", "--profile", "tpu"], "unknown profile 'tpu'"),
    (["run", "r4-gpt-oss-padded", "--timeout", "0"], "--timeout"),
    (["check", "r4-gpt-oss-padded", "--kernel", "bogus"], "unknown kernel 'bogus'"),
    (["run", "deepseek-v3"], "GiB per rank"),
    (["timeline", "r1-sp-deepep", "--ranks", "0,9"], "--ranks"),
    (["explore", "--budget", "0"], "--budget"),
])
def test_one_line_errors_do_not_import_torch(argv, needle):
    assert_bad_input(argv, needle)


@pytest.mark.parametrize("argv", [
    ["check", "r3-tp-decode"], ["run", "r3-tp-decode"], ["timeline", "r3-tp-decode", "--real"],
])
def test_a_bad_runner_of_a_real_run_is_refused_before_torch_or_calibration(tmp_path, argv):
    # Automatic calibration on (the suite turns it off), no profile yet: the
    # runner is refused first, in a fraction of the seconds torch takes.
    env = {"MOE_TWIN_NO_AUTOCALIBRATE": "0", "MOE_TWIN_HOME": str(tmp_path)}
    assert_bad_input([*argv, "--runner", "bogus"], "unknown runner 'bogus'", env=env)
    assert_bad_input([*argv, "--runner", "no_such_runner_module:X"], "cannot import no_such_runner_module", env=env)
    assert list(tmp_path.iterdir()) == []  # nothing calibrated


def test_a_runner_path_that_is_not_a_file_says_what_it_is(files):
    os.mkfifo(files / "fifo.py")
    (files / "dir.py").mkdir()
    assert_bad_input(["simulate", "r3-tp-decode", "--runner", f"{files / 'fifo.py'}:X"],
                     "fifo.py is a FIFO (named pipe), not a Python file")
    assert_bad_input(["check", "r3-tp-decode", "--runner", f"{files / 'dir.py'}:X"],
                     "dir.py is a directory, not a Python file")
    assert_bad_input(["simulate", "r3-tp-decode", "--runner", f"{files / 'none.py'}:X"], "no such file")


@pytest.mark.skipif(bool([p for p in Path("/dev").glob("nvidia[0-9]*")]), reason="a GPU machine asks torch")
def test_flashinfer_on_a_machine_without_gpu_is_refused_without_torch():
    assert_bad_input(["check", "r4-gpt-oss-padded", "--kernel", "flashinfer"], "needs a CUDA device")


# ---------------------------------------------------------------- scenario text is text


@pytest.mark.parametrize("command", ["show", "simulate"])
def test_markup_and_escapes_in_a_scenario_are_shown_as_text(files, command):
    code, out, err, _ = moe_twin(command, str(files / "markup.toml"), env={"FORCE_COLOR": "1", "COLUMNS": "200"})
    assert code == 0, err
    assert "x[/bold] [link=http://evil.example]click[/link]" in out  # literally, not parsed
    assert "s[/] [bold red]loud" in out
    assert "\x1b]8;" not in out  # no hyperlink
    assert "\x1b[31mRED" not in out and "\\x1b[31mRED" in out  # the scenario's escape is shown, not sent
    assert "\x07" not in out


def test_runner_text_is_escaped_in_reports_and_timelines(files):
    runner = "tests/hostile_runners.py:EvilNames"
    for argv in (["simulate", str(files / "markup.toml"), "--runner", runner],
                 ["timeline", str(files / "markup.toml"), "--runner", runner]):
        code, out, err, _ = moe_twin(*argv, env={"FORCE_COLOR": "1", "COLUMNS": "200"})
        assert code == 0, err
        assert "\x1b[2J" not in out and "\x1b]8;" not in out and "\x07" not in out
        assert "boom [/bold]" in out  # the exception message, as text
        assert "RUNNER_ERROR" in out


def test_error_messages_stay_one_line_and_escaped(tmp_path):
    f = tmp_path / "evil.toml"
    f.write_text('name = "a"\n[model]\nhidden = "\\u001b[2J\\nsecond line"\n')
    code, _, err, _ = moe_twin("show", str(f))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "\x1b" not in err


# ---------------------------------------------------------------- explore keeps its counts


def _explore(out: Path, budget: str, seed: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli", "explore", "--runner", "before-40865",
                             "--no-enumerate", "--budget", budget, "--seed", seed, "--out", str(out), "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_interrupted_explore_prints_what_it_has_and_saves_its_count(tmp_path):
    proc = _explore(tmp_path, "1000000", "0")
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:  # interrupt mid-search, once examples are being counted on disk
        time.sleep(0.5)
        disk = tmp_path / "findings.json"
        if disk.is_file() and json.loads(disk.read_text())["examples_total"] > 0:
            break
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=LIMIT_S)
    assert proc.returncode == 130, err
    d = json.loads(out)
    assert d["interrupted"] is True and d["examples"] > 0 and d["findings"]
    assert json.loads((tmp_path / "findings.json").read_text())["examples_total"] == d["examples"]
    assert "interrupted after" in err.strip().splitlines()[-1]


def test_concurrent_explores_on_one_out_add_their_counts(tmp_path):
    procs = [_explore(tmp_path, "300", "1"), _explore(tmp_path, "200", "2")]
    docs = [json.loads(p.communicate(timeout=LIMIT_S * 4)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    total = json.loads((tmp_path / "findings.json").read_text())["examples_total"]
    assert total == sum(d["examples"] for d in docs) == 500
