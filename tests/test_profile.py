"""`edgemtp profile`: the documented JSON schema, skipped rows, trace and plot."""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgemtp.cli import cli
from edgemtp.errors import ArgumentError

from .cli_errors import assert_one_line_error

ROW_CONFIG = {"draft_k", "batch", "prompt_tokens", "gen_tokens", "provider", "drafter", "head", "adaptive",
              "draft_p_min", "skipped"}
ROW_MEASURES = {"pp_tokens_per_s", "tg_tokens_per_s", "ttft_s", "acceptance_rate", "tokens_per_round",
                "acceptance_by_position", "split_ms_per_round", "peak_rss_mb"}


def profile(*args):
    r = CliRunner().invoke(cli, ["profile", *[str(a) for a in args]])
    assert r.exit_code == 0, r.output
    return r


def test_json_schema(tiny_gemma3):
    r = profile(tiny_gemma3[2], "--prompt-tokens", "8,60", "--gen-tokens", 6, "--repetitions", 2,
                "--draft-k", "0,2", "--batch", "1,2", "--format", "json")
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["schema_version"] == 2
    assert {"bundle", "bundle_bytes", "threads", "repetitions", "fast_verify", "packed_cache", "drafter_provider",
            "peak_rss", "ceiling", "rows", "speedups"} <= set(out)
    assert out["peak_rss"] in ("row", "process")
    assert {"bandwidth_gb_s", "weight_bytes", "tg_tokens_per_s", "by_prompt_tokens"} == set(out["ceiling"])
    assert [c["prompt_tokens"] for c in out["ceiling"]["by_prompt_tokens"]] == [8, 60]
    rows = out["rows"]
    assert len(rows) == 8
    ran = [r for r in rows if not r["skipped"]]
    skipped = [r for r in rows if r["skipped"]]
    assert {r["prompt_tokens"] for r in skipped} == {60}  # 60 + 6 - 1 > capacity 64
    assert all("KV capacity" in r["skipped"] for r in skipped)
    for row in ran:
        assert ROW_CONFIG | ROW_MEASURES == set(row)
        assert row["tg_tokens_per_s"]["mean"] > 0 and row["pp_tokens_per_s"]["std"] >= 0
        assert set(row["split_ms_per_round"]) == {"draft", "verify", "other"}
        if row["draft_k"] == 0:
            assert row["tokens_per_round"] == 1.0 and row["drafter"] == "none"
        else:
            assert row["drafter"] == "lookup" and len(row["acceptance_by_position"]) <= 2
    assert {(s["batch"], s["draft_k"]) for s in out["speedups"]} == {(1, 2), (2, 2)}


def test_the_json_records_fast_verify_and_the_drafter_provider(tiny_gemma3):
    """--fast-verify and --drafter-provider change how the rows run: the JSON says which were given, as it does
    the threads and repetitions (two files made with and without them looked alike)."""
    r = profile(tiny_gemma3[2], "--prompt-tokens", "8", "--gen-tokens", 2, "--repetitions", 1, "--draft-k", "0",
                "--format", "json")
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert (out["fast_verify"], out["drafter_provider"]) == (False, None)
    r = profile(tiny_gemma3[2], "--prompt-tokens", "8", "--gen-tokens", 2, "--repetitions", 1, "--draft-k", "0,2",
                "--draft", "mtp", "--batch", "1,2", "--fast-verify", "--drafter-provider", "cpu", "--format", "json")
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert (out["fast_verify"], out["drafter_provider"]) == (True, "cpu")


def test_adaptive_rows(tiny_gemma3):
    """--adaptive adds one row per drafter drafting adaptively up to the largest K, labelled as such."""
    r = profile(tiny_gemma3[2], "--prompt-tokens", "8", "--gen-tokens", 12, "--repetitions", 1,
                "--draft-k", "0,2,3", "--adaptive", "--format", "json")
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert [(row["draft_k"], row["adaptive"]) for row in out["rows"]] == [(0, False), (2, False), (3, False),
                                                                        (3, True)]
    assert all(not row["skipped"] and row["tg_tokens_per_s"]["mean"] > 0 for row in out["rows"])
    assert [s["adaptive"] for s in out["speedups"]] == [False, False, True]
    md = profile(tiny_gemma3[2], "--prompt-tokens", "8", "--gen-tokens", 4, "--repetitions", 1,
                 "--draft-k", "0,2", "--adaptive", "--format", "md").stdout
    assert "lookup adaptive k=2" in md and "| 2 | 1 | 8 | 4 | cpu | lookup |  | yes |" in md


def test_unavailable_provider_row_is_skipped(tiny_gemma3):
    """The skipped row is in the table, and a run where no row ran exits non-zero saying so."""
    r = CliRunner().invoke(cli, ["profile", str(tiny_gemma3[2]), "--prompt-tokens", "8", "--gen-tokens", "4",
                                 "--repetitions", "1", "--draft-k", "0", "--provider", "qnn", "--format", "csv"])
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("draft_k,batch,prompt_tokens")
    assert "provider 'qnn' is not available" in lines[1]
    assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1] == \
        "error: no row ran: every row was skipped (the table gives each row's reason)", r.output


def test_the_table_shows_a_provider_as_typed(tiny_gemma3):
    """The table's cells went to rich as markup: a provider's options holding [/] (a path, a value) ended the
    command with rich's MarkupError traceback, [bold] was swallowed and :smile: became an emoji."""
    from edgemtp.runtime import profile_report as report

    r = CliRunner().invoke(cli, ["profile", str(tiny_gemma3[2]), "--prompt-tokens", "8", "--gen-tokens", "4",
                                 "--repetitions", "1", "--draft-k", "0", "--provider", "openvino:a=[/]"])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "openvino:a=[/]" in r.stdout and r.exit_code == 2, r.output
    typed = "x [bold]y[/bold] :smile:"
    row = {**_measured_row(provider=typed, drafter="none", draft_k=0), "skipped": f"why {typed}"}
    result = {"bundle": "b", "bundle_bytes": 1, "peak_rss": "row", "rows": [row],
              "ceiling": {"bandwidth_gb_s": 12.5, "weight_bytes": 1, "tg_tokens_per_s": 10.0}}
    shown = report.render(result, "table", [])
    # a cell wraps at its spaces: each word as typed, in both cells
    assert shown.count("[bold]y[/bold]") == shown.count(":smile:") == 2 and "\U0001f604" not in shown, shown


def test_the_md_table_keeps_its_columns_with_a_pipe_in_a_cell():
    """A provider's options (and the skip reason naming them) can hold '|', which split a Markdown row into more
    cells than its header has: escaped, as GitHub's tables read '\\|'."""
    from edgemtp.runtime import profile_report as report

    typed = "openvino:a=x|y"
    row = {**_measured_row(provider=typed, drafter="none", draft_k=0), "skipped": f"why {typed}"}
    result = {"bundle": "b", "bundle_bytes": 1, "peak_rss": "row", "rows": [row],
              "ceiling": {"bandwidth_gb_s": 12.5, "weight_bytes": 1, "tg_tokens_per_s": 10.0}}
    header, _, line = report.render(result, "md", []).splitlines()[:3]
    cells = lambda text: re.split(r"(?<!\\)\|", text.strip())[1:-1]  # noqa: E731
    assert len(cells(line)) == len(cells(header)) == len(report.COLUMNS), line
    assert "openvino:a=x\\|y" in line


def test_csv_has_one_number_per_cell(tiny_gemma3):
    import csv
    import io

    r = profile(tiny_gemma3[2], "--prompt-tokens", "8,62", "--gen-tokens", 4, "--repetitions", 2,
                "--draft-k", "0,2", "--format", "csv")
    table = r.stdout[r.stdout.index("draft_k"):]
    records = list(csv.reader(io.StringIO(table)))  # no empty record at the end, one kind of line ending
    assert len({len(rec) for rec in records}) == 1 and "\r" not in table and not table.endswith("\n\n")
    rows = list(csv.DictReader(io.StringIO(table)))
    ran = [row for row in rows if not row["skipped"]]
    assert len(ran) == 2 and len(rows) == 4 and all("KV capacity" in row["skipped"] for row in rows if row["skipped"])
    assert {row["adaptive"] for row in rows} == {"false"}  # as json writes it, not Python's False
    for row in ran:
        assert float(row["tg_tokens_per_s_mean"]) > 0 and float(row["tg_tokens_per_s_std"]) >= 0
        assert float(row["tokens_per_round"]) >= 1 and float(row["peak_rss_mb"]) > 0


def test_trace_and_plot(tiny_gemma3, tmp_path):
    trace, png = tmp_path / "t.json", tmp_path / "p.png"
    r = profile(tiny_gemma3[2], "--prompt-tokens", "8", "--gen-tokens", 4, "--repetitions", 1,
                "--draft-k", "0,2", "--trace", trace, "--plot", png)
    events = json.loads(trace.read_text())
    assert isinstance(events, list) and all({"name", "ph", "ts"} <= set(e) for e in events[:50])
    assert "GroupQueryAttention" in r.output  # the top-ops table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plot_or_trace_cut_off_midway_leaves_the_old_file(tmp_path):
    """--plot and --trace wrote straight to their path: a kill or a full disk midway left a partial file. They are
    written beside it and renamed into place; a failed write leaves the old file and no temporary one."""
    from edgemtp.runtime.profile_report import into_place

    out = tmp_path / "p.png"
    out.write_bytes(b"old")

    def partial(path):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        into_place(out, partial)
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"] and out.read_bytes() == b"old"
    into_place(out, lambda path: Path(path).write_bytes(b"new"))
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"] and out.read_bytes() == b"new"
    assert out.stat().st_mode & 0o777 != 0o600  # as open() makes it, not mkstemp's owner-only mode


def test_bad_profile_flags(tiny_gemma3):
    r = CliRunner().invoke(cli, ["profile", str(tiny_gemma3[2]), "--draft-k", "two"])
    assert_one_line_error(r, exact="--draft-k 'two' must be comma-separated integers, e.g. 0,2,4")


def test_profile_mistakes_are_named_before_the_run(tiny_gemma3, tmp_path, monkeypatch):
    """--head without any MTP row, an empty --text-file and an unwritable --plot are refused before any row runs."""
    from edgemtp.runtime import profile as prof

    monkeypatch.setattr(prof, "run_row", lambda *a: pytest.fail("a row ran"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "afile").write_text("x")
    for args, message in (
            (("--head", "full"),
             "--head 'full' applies to MTP and hybrid rows only (they have a head), and the drafter auto runs "
             "lookup here"),
            # the MTP drafter's options where no row runs it were taken silently (the rows' draft_p_min said 0.0)
            (("--draft-p-min", 0.3),
             "--draft-p-min 0.3 applies to MTP and hybrid rows only (they run the MTP drafter), and the drafter auto "
             "runs lookup here"),
            (("--drafter-provider", "cpu"),
             "--drafter-provider 'cpu' applies to MTP and hybrid rows only (they run the MTP drafter), and the "
             "drafter auto runs lookup here"),
            (("--draft-k", "0", "--draft-p-min", 0.3),
             "--draft-p-min 0.3 applies to MTP and hybrid rows only (they run the MTP drafter), and draft K 0 runs "
             "plain rows only"),
            (("--draft-k", "0", "--head", "full"),
             "--head 'full' applies to MTP and hybrid rows only (they have a head), and draft K 0 runs plain rows "
             "only"),
            # a --draft given beside plain rows only changed nothing, silently (generate refuses it too)
            (("--draft", "mtp", "--draft-k", "0"),
             "--draft mtp with --draft-k 0: plain rows only, which draft nothing"),
            (("--draft", "hybrid", "--draft-k", "0", "--head", "full"),
             "--draft hybrid with --draft-k 0: plain rows only, which draft nothing"),
            # an unknown drafter is the more basic mistake: named before --draft-k's conflict with it
            (("--draft", "bogus", "--draft-k", "0"),
             "--draft 'bogus' is unknown (choose from auto, lookup, mtp, hybrid)"),
            (("--draft", "mpt", "--adaptive", "--draft-k", "0"), "--draft 'mpt' is unknown"),
            # one prompt a row never runs the batched verify graph (Target.forward_outputs): the flag did nothing
            (("--fast-verify",), "--fast-verify needs rows of a batch above 1 (only they run the batched verify "
                                 "graph), and batch 1 has none"),
            (("--text-file", tmp_path / "empty.txt"), f"--text-file {tmp_path / 'empty.txt'}: the file is empty"),
            (("--plot", tmp_path / "afile" / "p.png"),
             f"--plot {tmp_path / 'afile' / 'p.png'}: {tmp_path / 'afile'} is a file, not a directory"),
            (("--gen-tokens", 1), "--gen-tokens 1 must be at least 2 (the first token comes from the prefill)"),
            (("--repetitions", 0), "--repetitions 0 must be at least 1"),
            (("--prompt-tokens", "8,0"), "--prompt-tokens 0 must be at least 1"),
            (("--draft-k", "1,,2"), "--draft-k '1,,2' must be comma-separated integers"),
            (("--prompt-tokens", "8,"), "--prompt-tokens '8,' must be comma-separated integers"),
            (("--threads", -1), "--threads -1 must be between 0 and"),
            # os.access says yes to root even there: the check tries to write
            *([(("--trace", "/proc/t.json"), "--trace /proc/t.json: cannot write in /proc")]
              if Path("/proc/self").is_dir() else [])):
        r = CliRunner().invoke(cli, ["profile", str(tiny_gemma3[2]), *map(str, args)])
        assert_one_line_error(r, message)
    # from Python the same refusal names the argument as Python writes it: the CLI's flags were never passed there
    with pytest.raises(ArgumentError) as caught:
        prof.profile(tiny_gemma3[2], (8,), 4, 1, (0, 2), batches=(1,), fast_verify=True)
    assert str(caught.value) == ("fast_verify=True needs rows of a batch above 1 (only they run the batched verify "
                                 "graph), and batch 1 has none")
    for kwargs, message in (
            ({"head": "full"}, "head='full' applies to MTP and hybrid rows only (they have a head), and the drafter "
                               "auto runs lookup here"),
            ({"p_min": 0.3, "draft_ks": (0,)}, "p_min=0.3 applies to MTP and hybrid rows only (they run the MTP "
                                               "drafter), and draft K 0 runs plain rows only"),
            ({"drafter_provider": "cpu", "drafter": "lookup"},
             "drafter_provider='cpu' applies to MTP and hybrid rows only (they run the MTP drafter), and the drafter "
             "lookup runs lookup here")):
        with pytest.raises(ArgumentError) as caught:
            prof.profile(tiny_gemma3[2], (8,), 4, 1, **{"draft_ks": (0, 2), **kwargs})
        assert str(caught.value) == message


def test_a_trace_or_plot_onto_a_file_of_the_bundle_is_refused(tiny_gemma3, tmp_path):
    """--trace BUNDLE/tokenizer.json replaced the profiled bundle's own file with the trace: the bundle no longer
    loaded. A file of the bundle (its manifest, or one it lists, by whatever path) is refused before the run; a
    new file in the bundle's directory is not one of its files, and is written."""
    import shutil

    from edgemtp import bundle

    b = shutil.copytree(tiny_gemma3[2], tmp_path / "b")
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    for flag, path in (("--trace", b / "tokenizer.json"), ("--trace", b / ".." / "b" / "edgemtp.json"),
                       ("--trace", tmp_path / "link" / "target.onnx.data")):
        (tmp_path / "link").unlink(missing_ok=True)
        (tmp_path / "link").symlink_to(b)
        r = CliRunner().invoke(cli, ["profile", str(b), "--prompt-tokens", "8", "--gen-tokens", "4",
                                     "--repetitions", "1", "--draft-k", "0", flag, str(path)])
        assert_one_line_error(r, exact=f"{flag} {path}: is a file of the bundle {b} (write it elsewhere)")
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before
    bundle.load(b)  # whole
    profile(b, "--prompt-tokens", "8", "--gen-tokens", 4, "--repetitions", 1, "--draft-k", "0",
            "--trace", b / "trace.json")
    assert json.loads((b / "trace.json").read_text())
    assert bundle.load(b).manifest == bundle.load(tiny_gemma3[2]).manifest


def test_a_trace_or_plot_onto_the_text_file_or_each_other_is_refused(tiny_gemma3, tmp_path):
    """--trace F --text-file F replaced the user's prompt text with the trace, and --trace F --plot F left one of
    the two outputs: refused before the run, by whatever path, the text file kept."""
    text = tmp_path / "prompt.png"
    text.write_text("def main():\n    return 1\n" * 8)
    base = ["profile", str(tiny_gemma3[2]), "--prompt-tokens", "8", "--gen-tokens", "4", "--repetitions", "1",
            "--draft-k", "0", "--text-file", str(text)]
    for args, message in (
            (["--trace", str(text)], f"--trace {text}: is --text-file's (write it elsewhere)"),
            (["--plot", str(tmp_path / ".." / tmp_path.name / text.name)],
             f"--plot {tmp_path / '..' / tmp_path.name / text.name}: is --text-file's (write it elsewhere)"),
            (["--trace", str(tmp_path / "out.png"), "--plot", str(tmp_path / "out.png")],
             f"--plot {tmp_path / 'out.png'}: is --trace's too (give each its own file)")):
        r = CliRunner().invoke(cli, [*base, *args])
        assert_one_line_error(r, exact=message)
    assert text.read_text() == "def main():\n    return 1\n" * 8
    assert not (tmp_path / "out.png").exists()


def test_a_generation_past_the_kv_capacity_is_skipped_at_once(tiny_gemma3, monkeypatch):
    """--gen-tokens 100000000 on a 64-token bundle: every row is skipped, but the ceiling's mean cache read summed
    every step of the generation, one at a time (minutes of CPU at 1e8 steps before the table). Only the steps
    the cache holds are counted (a row reaching past it is skipped); the rows that fit read as before."""
    from edgemtp import bundle
    from edgemtp.runtime import bandwidth
    from edgemtp.runtime import profile as prof

    b = bundle.load(tiny_gemma3[2], verify=False)
    monkeypatch.setattr(bandwidth, "measure_bandwidth", lambda threads: 1e10)
    calls, real = [0], bandwidth.decode_bytes

    def counted(*args):
        calls[0] += 1
        assert calls[0] < 1000, "a step past the KV capacity counted"
        return real(*args)

    monkeypatch.setattr(bandwidth, "decode_bytes", counted)
    fits = prof.ceiling(b, None, (8,), 40)["by_prompt_tokens"]
    assert prof.ceiling(b, None, (8,), 10**8)["by_prompt_tokens"][0]["prompt_tokens"] == 8
    monkeypatch.setattr(bandwidth, "decode_bytes", real)
    assert fits == prof.ceiling(b, None, (8,), 40)["by_prompt_tokens"]


def test_repeated_values_run_once_and_a_batch_beyond_memory_is_skipped(tiny_gemma3, monkeypatch):
    """--draft-k 2,2 runs K = 2 once; a batch whose KV cache and logits exceed half this machine's memory is
    a skipped row saying so (it would otherwise hang building its prompts, then run out of memory)."""
    from edgemtp.runtime import profile as prof

    monkeypatch.setattr(prof, "physical_memory", lambda: 2**30)
    r = profile(tiny_gemma3[2], "--prompt-tokens", "8,8", "--gen-tokens", 4, "--repetitions", 1,
                "--draft-k", "0,2,2", "--draft", "lookup", "--batch", "1,1,100000", "--format", "json")
    rows = json.loads(r.stdout[r.stdout.index("{"):])["rows"]
    assert [(x["draft_k"], x["batch"], bool(x["skipped"])) for x in rows] == \
        [(0, 1, False), (2, 1, False), (0, 100000, True), (2, 100000, True)]
    assert "batch 100000 needs about" in rows[2]["skipped"] and "the memory here is 1.0 GiB" in rows[2]["skipped"]


def test_mtp_rows_without_a_drafter_are_skipped(tiny_gemma3):
    r = profile(tiny_gemma3[2], "--prompt-tokens", "8", "--gen-tokens", 4, "--repetitions", 1,
                "--draft-k", "0,2", "--draft", "lookup,mtp", "--format", "json")
    rows = json.loads(r.stdout[r.stdout.index("{"):])["rows"]
    assert [(x["drafter"], bool(x["skipped"])) for x in rows] == [("none", False), ("lookup", False), ("mtp", True)]
    assert "no MTP drafter" in rows[2]["skipped"]


def test_gemv_head_stores_the_table_once(tiny_gemma3, tmp_path):
    """--gemv-head stores the tied table transposed, once, under two names (the packed MatMul's constant and
    the GEMV's overridable alias): the data file is no bigger, and a plain step reads it once."""
    import onnx

    from edgemtp import bundle as bundle_mod
    from edgemtp.exporters import export
    from edgemtp.runtime.bandwidth import decode_bytes

    _, model_dir, plain = tiny_gemma3
    gemv = export(model_dir, tmp_path / "gemv", capacity=64, gemv_head=True)
    plain_b, gemv_b = bundle_mod.load(plain), bundle_mod.load(gemv)
    data = [b.manifest["files"]["target.onnx.data"]["bytes"] for b in (plain_b, gemv_b)]
    assert abs(data[1] - data[0]) < 64 * 64  # alignment padding at most
    assert decode_bytes(gemv_b) == whole_bytes(gemv) and decode_bytes(plain_b) == whole_bytes(plain)
    assert gemv_b.manifest["graphs"]["target"]["gemv_head"] == {"kept_table": False}
    graph = onnx.load(str(gemv / "target.onnx"), load_external_data=False).graph
    stored = {t.name: [(e.key, e.value) for e in t.external_data] for t in graph.initializer}
    table = "model.embed_tokens.weight"
    assert table not in stored and stored[table + ".T"] == stored[table + ".T.gemv"]
    assert table + ".T.gemv" in {i.name for i in graph.input} and table + ".T" not in {i.name for i in graph.input}
    # a bundle of the old layout (both tables, the [V, H] one read by the If's branch of several rows: manifest
    # value true); a table kept for a drafter is read by no node of the target (test_a_step_reads_rows_of...)
    gemv_b.manifest["graphs"]["target"]["gemv_head"] = True
    vocab, hidden = plain_b.model["vocab_size"], plain_b.model["hidden_size"]
    assert decode_bytes(gemv_b) == whole_bytes(gemv) - 4 * vocab * hidden


def test_decode_bytes_add_the_kv_cache_attention_reads(tiny_gemma3):
    """A step at context c also reads the cached keys and values its attention covers: all c positions on a
    full-attention layer, the last window - 1 on a sliding one (counted from the checkpoint's config)."""
    from edgemtp import bundle as bundle_mod
    from edgemtp.runtime.bandwidth import decode_bytes

    model, _, bundle_dir = tiny_gemma3
    b = bundle_mod.load(bundle_dir)
    cfg = model.config
    assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
    per_position = 2 * 4 * cfg.num_key_value_heads * cfg.head_dim  # keys and values, fp32
    for context in (0, 5, 40):
        read = sum(min(context, cfg.sliding_window - 1) if kind == "sliding_attention" else context
                   for kind in cfg.layer_types)
        assert decode_bytes(b, context) - decode_bytes(b) == per_position * read


def rows_read(graph_path) -> dict:
    """{(data file, offset, length): initializer names} of the external initializers a step reads at most rows
    of, found with the onnx package: each node that reads one (in the If's branches too) gathers rows of it
    (Gather's and GatherElements' data, GatherBlockQuantized's data, scales and zero points, GroupQueryAttention's
    cos / sin caches), or reads it through an Unsqueeze that only those read (the session folds it), or none
    reads it. Bytes that an initializer read whole shares (an alias) are left out of it."""
    import onnx

    from .test_onnx_wire import read_at_rows

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    found, whole = defaultdict(set), set()
    for t in graph.initializer:
        e = {x.key: x.value for x in t.external_data}
        if e:
            place = (e["location"], int(e.get("offset", 0)), int(e["length"]))
            if read_at_rows(graph, t.name):
                found[place].add(t.name)
            else:
                whole.add(place)
    return {place: names for place, names in found.items() if place not in whole}


def whole_bytes(bundle_dir) -> int:
    """The bytes of the target's data file a step reads whole: all but the initializers it reads rows of (the RoPE
    cos / sin caches, read at the step's positions, at least: GraphBuilder.table)."""
    files = json.loads((Path(bundle_dir) / "edgemtp.json").read_text())["files"]
    return files["target.onnx.data"]["bytes"] - sum(n for _, _, n in rows_read(Path(bundle_dir) / "target.onnx"))


def assert_rows_left_out(bundle_dir, want: set) -> None:
    """decode_bytes is the target's data file less the initializers a step reads rows of, `want` among them."""
    from edgemtp import bundle as bundle_mod
    from edgemtp.runtime.bandwidth import decode_bytes

    rows = rows_read(bundle_dir / "target.onnx")
    assert want <= set().union(*rows.values()), sorted(set().union(*rows.values()))
    b = bundle_mod.load(bundle_dir)
    assert decode_bytes(b) == b.manifest["files"]["target.onnx.data"]["bytes"] - sum(n for _, _, n in rows)


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "gemma3_text"])
def test_a_step_reads_one_row_of_the_embedding_table(kind, tmp_path):
    """A step gathers one row of its input embedding: an untied model's table (Qwen2, Mistral), fp32 or packed by
    int8 / int4 (GatherBlockQuantized's table and scales, int4's zero points for the gather), is left out of the
    bytes it reads; decode_bytes counted it whole. A tied table (Gemma 3) is the head's and read whole: only int4's
    gather zero points are left out."""
    from edgemtp.exporters import export
    from edgemtp.exporters.quantize import quantize_bundle

    from .reference import save_tiny
    from .test_parity import tiny

    fp32 = export(save_tiny(tiny(kind), tmp_path / "model"), tmp_path / "fp32", capacity=64, gemv_head=False)
    tied = kind == "gemma3_text"
    table = "model.embed_tokens.weight"
    assert_rows_left_out(fp32, set() if tied else {table})
    if tied:  # the RoPE tables only
        assert {name[:8] for names in rows_read(fp32 / "target.onnx").values() for name in names} == \
            {"rope_cos", "rope_sin"}
    for quant in ("int8", "int4"):
        out = quantize_bundle(fp32, tmp_path / quant, quant, calibration=None)
        packed = f"{table}.q{quant[3]}b32"
        want = {packed + ".gather_zero_points"} if quant == "int4" else set()
        assert_rows_left_out(out, want if tied else want | {packed, packed + ".scales"})


def test_gemma4s_per_layer_table_and_a_table_kept_for_the_drafter_are_not_read_whole(tmp_path):
    """Gemma 4's per-layer embeddings (9.4 GB in fp32 for E2B) are gathered one row a step, as is the main
    table; a --gemv-head target that keeps the [V, H] table for its assistant drafter reads none of it (its
    head reads the transposed table, its embedding gathers that one's columns). Both counted whole before;
    the kept table was taken off by the manifest's `kept_table`, which the graph now shows."""
    from edgemtp.exporters import export
    from edgemtp.exporters.quantize import quantize_bundle

    from .reference import save_tiny
    from .test_assistant import tiny_assistant
    from .test_parity_gemma4 import tiny as tiny4

    model_dir = save_tiny(tiny4("gemma4_text"), tmp_path / "model")
    tiny_assistant(False).save_pretrained(tmp_path / "assistant")
    kept = export(model_dir, tmp_path / "kept", capacity=64, drafter=tmp_path / "assistant", gemv_head=True)
    assert json.loads((kept / "edgemtp.json").read_text())["graphs"]["target"]["gemv_head"] == {"kept_table": True}
    ple, table = "model.embed_tokens_per_layer.weight", "model.embed_tokens.weight"
    assert_rows_left_out(kept, {ple, table})
    assert not {table + ".T", table + ".T.gemv"} & set().union(*rows_read(kept / "target.onnx").values())
    plain = export(model_dir, tmp_path / "plain", capacity=64, gemv_head=False)
    assert_rows_left_out(plain, {ple})
    int4 = quantize_bundle(plain, tmp_path / "int4", "int4", calibration=None, block_size=16, two_pass="none")
    assert_rows_left_out(int4, {ple + ".q4b16", ple + ".q4b16.scales", ple + ".q4b16.gather_zero_points",
                                table + ".q4b16.gather_zero_points"})


def test_bandwidth_probe_kernels_each_read_the_whole_weight():
    """The ceiling's three readers (ORT's Gemm and GEMV, numpy's OpenBLAS GEMV) compute their products over
    every byte of the weight: a kernel that skipped some would read faster than the memory allows."""
    import numpy as np

    from edgemtp.runtime.bandwidth import BandwidthProbe

    probe = BandwidthProbe(threads=1, mbytes=8)
    n, k = probe.weights.shape
    ones = np.ones((1, k), np.float32)
    want = [ones @ probe.weights.T, ones @ probe.weights.reshape(k, n), ones @ probe.weights.reshape(k, n)]
    got = probe.products()
    assert len(got) == 3
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)
    assert len(probe.times()) == 3 and min(probe.times()) > 0


def test_importing_edgemtp_before_numpy_stops_openblas_spinning():
    """OpenBLAS's threads spinning after the probe's product would slow the decode step measured next."""
    import subprocess
    import sys

    code = ("import os; os.environ.pop('OPENBLAS_THREAD_TIMEOUT', None); import edgemtp, numpy; "
            "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))")
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert run.stdout.split() == ["4"]
    code = code.replace("import edgemtp, numpy", "import numpy, edgemtp")  # too late: left alone
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert run.stdout.split() == ["None"]


def test_rows_run_on_the_engine_generate_loads_for_them(tiny_gemma3, monkeypatch):
    """Plain and lookup rows on a target whose threads spin between runs, MTP and hybrid rows on one whose
    threads sleep (as `edgemtp generate` loads it for each): one engine for all made one kind slower.
    The rows come back in their configuration order, and only one engine is held at a time."""
    import weakref

    from edgemtp.runtime import profile as prof

    loads, alive = [], []

    class FakeEngine:
        capacity = 64

        def __init__(self, mtp):
            self.mtp = mtp

        @classmethod
        def load(cls, *args, mtp=None, provider=None, **kwargs):
            assert not any(e() for e in alive), "the previous engine is still held"
            assert provider == "azure", "the engine runs on the rows' --provider"  # was always the CPU
            loads.append(mtp)
            engine = cls(mtp)
            alive.append(weakref.ref(engine))
            return engine

    monkeypatch.setattr(prof, "Engine", FakeEngine)
    monkeypatch.setattr(prof, "skip_reason", lambda *a: "")
    monkeypatch.setattr(prof, "run_row", lambda engine, c, *a: prof.Row(c, skipped=f"mtp={engine.mtp}"))
    out = prof.profile(tiny_gemma3[2], (8,), 4, 1, (0, 2), drafter="lookup,mtp,hybrid", provider="azure")
    assert [(r["drafter"], r["skipped"]) for r in out["rows"]] == [
        ("none", "mtp=False"), ("lookup", "mtp=False"), ("mtp", "mtp=True"), ("hybrid", "mtp=True")]
    assert loads == [False, True]


def test_a_rows_peak_rss_is_its_own(tiny_gemma3):
    """peak_rss_mb is the peak while the row ran on its engine: not an earlier, larger allocation's (such
    as the first engine's, for the MTP rows loaded after it). Where the system cannot reset the peak (no
    /proc, or a sandbox ignoring clear_refs, as CI's did) the result says the peaks are the process's."""
    from edgemtp.runtime import profile as prof
    from edgemtp.runtime import profile_report as report

    before = _touch_and_free(400)
    out = prof.profile(tiny_gemma3[2], (8,), 4, 1, (0, 2), drafter="lookup", reset_peak=True)
    peaks = [r["peak_rss_mb"] for r in out["rows"]]
    if out["peak_rss"] == "row":
        assert all(0 < p < before - 300 for p in peaks), (before, peaks)
        assert "process's peak" not in report.ceiling_line(out)
    else:
        assert out["peak_rss"] == "process" and all(p >= before - 1 for p in peaks), (before, peaks)
        assert "peak rss MiB is the process's peak so far" in report.ceiling_line(out)


def test_profile_leaves_the_callers_peak_rss_alone(tiny_gemma3, monkeypatch):
    """An app calling profile() in its own process keeps its own peak RSS (VmHWM, getrusage's ru_maxrss): the
    reset before each row, through /proc/self/clear_refs, dropped it to the current size. Unasked, profile()
    resets nothing and says its peaks are the process's; `edgemtp profile`, a process of its own, asks."""
    import resource

    from edgemtp.runtime import profile as prof

    monkeypatch.setattr(prof, "ceiling", lambda *a: {})  # its bandwidth probe's 512 MB would raise the peak
    before = _touch_and_free(400)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = prof.profile(tiny_gemma3[2], (8,), 4, 1, (0, 2), drafter="lookup")
    assert prof.peak_rss_mb() >= before - 1 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >= maxrss
    assert out["peak_rss"] == "process" and all(r["peak_rss_mb"] >= before - 1 for r in out["rows"])


def test_the_profile_command_resets_the_peak_per_row(tiny_gemma3, monkeypatch):
    """The command's process is its own: it asks profile() for each row's own peak."""
    from edgemtp.runtime import profile as prof

    calls = []
    monkeypatch.setattr(prof, "reset_peak_rss", lambda: calls.append(1) or False)
    profile(tiny_gemma3[2], "--prompt-tokens", "8", "--gen-tokens", 4, "--repetitions", 1, "--draft-k", "0,2",
            "--draft", "lookup", "--format", "json")
    assert len(calls) == 2  # one per row


def test_reset_peak_rss_says_whether_it_took(monkeypatch):
    """True only when the peak really restarted; a refused or ignored reset is False (the profile then
    labels its peaks the process's)."""
    from edgemtp.runtime import profile as prof

    before = _touch_and_free(300)
    took = prof.reset_peak_rss()
    assert (prof.peak_rss_mb() < before - 200) == took, (before, prof.peak_rss_mb(), took)

    real_write = prof.Path.write_text

    def refuse(path, *a, **k):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError(13, "Permission denied", str(path))
        return real_write(path, *a, **k)

    monkeypatch.setattr(prof.Path, "write_text", refuse)
    assert prof.reset_peak_rss() is False

    def ignore(path, *a, **k):
        if str(path) != "/proc/self/clear_refs":
            return real_write(path, *a, **k)

    _touch_and_free(300)
    monkeypatch.setattr(prof.Path, "write_text", ignore)
    assert prof.reset_peak_rss() is False


def _touch_and_free(mb: int) -> float:
    """Raises the process's peak by `mb` MB and gives the memory back to the system for certain (an
    anonymous mapping, unmapped: no allocator keeping it); returns the peak."""
    import mmap

    import numpy as np

    from edgemtp.runtime import profile as prof

    m = mmap.mmap(-1, mb * 2**20)
    a = np.frombuffer(m, dtype=np.uint8)
    a[:] = 1
    peak = prof.peak_rss_mb()
    del a
    m.close()
    return peak


def test_profile_imports_without_the_resource_module():
    """Windows has no `resource` module (nor /proc): the profile module imported it at the top, so `edgemtp
    profile` failed at once there. Off Windows, with no /proc either, the peak is unknown: 0."""
    code = ("import sys; sys.modules['resource'] = None\n"
            "import edgemtp.runtime.profile as prof\n"
            "def no_proc(): raise FileNotFoundError(2, 'No such file or directory', '/proc/self/status')\n"
            "prof._proc_status_kib = no_proc\n"
            "print(prof.peak_rss_mb(), prof.reset_peak_rss())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["0.0", "False"], r.stderr


def test_the_default_text_where_the_standard_library_has_no_source(monkeypatch, tmp_path):
    """The default profile text is the standard library's source: an embedded Python (Windows' embeddable
    package: .pyc files in python3XX.zip) has none to read, and profile stopped with a FileNotFoundError
    traceback after loading the bundle. It names --text-file instead."""
    import json.decoder

    from edgemtp.errors import EdgemtpError
    from edgemtp.runtime import profile as prof

    monkeypatch.setattr(json.decoder, "__file__", str(tmp_path / "python311.zip" / "json" / "decoder.pyc"))
    with pytest.raises(EdgemtpError, match="give --text-file"):
        prof.prompt_ids(None, 8, None)


def test_a_trace_needs_no_temporary_directory(tiny_gemma3, tmp_path, monkeypatch):
    """--trace's directory is checked writable before the run; ONNX Runtime's own trace file went to the
    system's temporary directory, which a container with a read-only file system may not have (tempfile's
    FileNotFoundError, a traceback after the whole profile). It goes beside the trace."""
    import tempfile

    from edgemtp.cli.measure import _traced_engine
    from edgemtp.runtime import profile_report as report

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    out = tmp_path / "trace.json"
    table = report.write_trace(lambda prefix: _traced_engine(tiny_gemma3[2], "cpu", None, prefix),
                               lambda e: e.generate("t1 t2", max_new_tokens=2), out)
    assert "GroupQueryAttention" in table and isinstance(json.loads(out.read_text()), list)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.json"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")
def test_peak_rss_whatever_the_process_is_named():
    """/proc/self/status names the process by its bytes (an app's name, cut to 15 bytes, maybe within a
    character): one that is not UTF-8 stopped the profile with a UnicodeDecodeError."""
    code = ("import ctypes; ctypes.CDLL(None).prctl(15, b'caf\\xe9')  # PR_SET_NAME\n"
            "from edgemtp.runtime import profile as prof\n"
            "print(prof.reset_peak_rss() in (True, False), prof.peak_rss_mb() > 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["True", "True"], r.stderr


def test_windows_peak_is_the_peak_working_set():
    """Windows has neither /proc nor getrusage: the peak is K32GetProcessMemoryInfo's PeakWorkingSetSize (the
    profile read 0.0 there). A stand-in for kernel32 checks the call: the process's handle, the struct's size."""
    from edgemtp.runtime import profile as prof

    calls = []

    def get_current_process():
        return 2**64 - 1  # the pseudo-handle -1, as the c_void_p restype reads it

    def memory_info(handle, counters, size):
        calls.append((handle, size))
        counters._obj.PeakWorkingSetSize = 765 * 2**20
        return 1

    kernel32 = type("Kernel32", (), {})()
    kernel32.GetCurrentProcess, kernel32.K32GetProcessMemoryInfo = get_current_process, memory_info
    assert prof.windows_peak_mb(kernel32) == 765.0
    assert calls == [(2**64 - 1, ctypes.sizeof(prof._MemoryCounters))] and ctypes.sizeof(prof._MemoryCounters) in (
        40, 72)  # psapi.h's PROCESS_MEMORY_COUNTERS on 32- / 64-bit Windows
    kernel32.K32GetProcessMemoryInfo = lambda handle, counters, size: 0  # the call failed
    assert prof.windows_peak_mb(kernel32) == 0.0
    if sys.platform != "win32":
        assert prof.windows_peak_mb() == 0.0  # no kernel32 to ask


def test_a_rows_measures_from_its_generations_counts_and_times(monkeypatch):
    """Each timed run's counts and times, as the speculative loop reports them, become the row's measures: pp
    over every row's prompt, tg over every row's tokens after the first, per row-round splits. A batch's rows
    are prefilled one after the other and none has its first token before all are: ttft is the whole prefill
    (it was prefill_s / batch, 4x shorter than any row waited at batch 4)."""
    from edgemtp.runtime import profile as prof

    runs = iter([(9.0, 9.0), (0.4, 2.0), (0.8, 4.0)])  # (prefill_s, decode_s): the warm-up, then two timed runs

    class FakeSpeculative:
        def __init__(self, target, drafter, k, adaptive=False, p_min=0.0):
            pass

        def generate(self, prompts, n, sampling, stop_ids=(), stats=None):
            stats.prefill_s, stats.decode_s = next(runs)
            stats.prefill_tokens, stats.decode_tokens = 8 * len(prompts), (n - 1) * len(prompts)
            stats.rounds, stats.draft_s, stats.verify_s, stats.other_s = 10, 0.1, 0.2, 0.3

    engine = type("FakeEngine", (), {"encode": lambda self, text: list(range(300)), "target": None})()
    monkeypatch.setattr(prof, "Speculative", FakeSpeculative)
    row = prof.run_row(engine, prof.RowConfig(0, 4, 8, 11, "cpu", "none"), 2, None)
    assert row.pp_tokens_per_s == [32 / 0.4, 32 / 0.8] and row.tg_tokens_per_s == [40 / 2.0, 40 / 4.0]
    assert row.ttft_s == [0.4, 0.8]
    assert row.tokens_per_round == 80 / 20 and row.split_s == pytest.approx({"draft": 10, "verify": 20, "other": 30})


def test_the_plain_one_prompt_row_runs_the_loop_generate_runs(tiny_gemma3, monkeypatch):
    """generate decodes one prompt without drafting in Engine's own loop. The plain row ran the speculative loop
    with no drafter (~55 us a step more of bookkeeping), so every speedup over it read slightly high."""
    from edgemtp.runtime import profile as prof
    from edgemtp.runtime.engine import Engine

    engine = Engine.load(tiny_gemma3[2])
    engine.stop_ids = frozenset(range(engine.target.contract.vocab_size))  # every token is a stop: none is used
    runs = []
    plain = engine._plain

    def recording(prompt, n, sampling, stats, stops):
        yield from plain(prompt, n, sampling, stats, stops)
        runs.append((len(prompt), stats.decode_tokens, stats.decode_s))

    monkeypatch.setattr(engine, "_plain", recording)
    monkeypatch.setattr(prof, "Speculative", lambda *a, **k: pytest.fail("the speculative loop ran"))
    row = prof.run_row(engine, prof.RowConfig(0, 1, 16, 9, "cpu", "none"), 1, None)
    assert [r[:2] for r in runs] == [(16, 8), (16, 8)]  # the warm-up, then the timed run: 9 tokens, 8 decoded
    assert row.tg_tokens_per_s == [8 / runs[1][2]] and row.tokens_per_round == 1.0
    # verify: the target's passes; other: sampling and stop checks (see the next test); together decode_s
    assert row.split_s["draft"] == 0 and row.split_s["verify"] > 0 and row.split_s["other"] > 0
    assert sum(row.split_s.values()) == pytest.approx(1e3 * runs[1][2] / 8)
    assert "forward" not in vars(engine.target)  # its timing is the run's only


def test_the_plain_rows_split_has_a_drafting_rows_parts(monkeypatch):
    """A plain row's verify is its target passes and its other the rest of decode_s (sampling, stop checks),
    as a drafting row's (Speculative: other is acceptance, sampling, bookkeeping). It put all of decode_s in
    verify and 0 in other, so beside a drafting row its verify read the sampling as target time, and the
    drafting row's other looked like a cost plain decoding has not (Gemma 3 270M, one thread: other 0.0 vs
    0.26 ms, verify 121.6 vs 137.1 ms)."""
    from edgemtp.runtime import profile as prof

    now = [0.0]

    class FakeTarget:
        def forward(self, ids, cache, rows=None, n_logits=1):
            now[0] += 0.010  # a pass: 10 ms
            return None, None

    class FakeEngine:  # Engine._plain's clocks: decode_s from the first token's sampling to the last's
        target = FakeTarget()

        def encode(self, text):
            return list(range(300))

        def _plain(self, prompt, n, sampling, stats, stops):
            self.target.forward(prompt, None)  # the prefill, in prefill_s
            now[0] += 0.002  # sampling: 2 ms
            start = stats.prefill_s = now[0]
            for i in range(1, n):
                yield i - 1
                self.target.forward([[i]], None)
                now[0] += 0.002
                stats.decode_tokens, stats.decode_s = i, now[0] - start
            yield n - 1

    monkeypatch.setattr(prof, "perf_counter", lambda: now[0], raising=False)  # profile's clock
    row = prof.run_row(FakeEngine(), prof.RowConfig(0, 1, 16, 9, "cpu", "none"), 2, None)
    assert row.tokens_per_round == 1.0
    assert row.split_s == pytest.approx({"draft": 0, "verify": 10, "other": 2})


def test_a_row_that_fits_the_cache_runs_whatever_its_k(tiny_gemma3):
    """A generation stores its prompt and every generated token but the last; the verify window of the rounds
    near the end shrinks to what the generation has left, so no K asks for more. Profile skipped a row whose
    prompt + gen + K + 1 exceeded the capacity ("cannot run here"), though generate runs it to its last token:
    at 57 + 8 on a capacity of 64 even the plain row."""
    from edgemtp import bundle as bundle_mod
    from edgemtp.runtime import profile as prof

    bundle = bundle_mod.load(tiny_gemma3[2])
    assert [prof.skip_reason(prof.RowConfig(k, 1, 57, 8, "cpu", "lookup"), 64, bundle) for k in (0, 2, 6)] == [""] * 3
    assert "beyond the KV capacity of 64" in prof.skip_reason(prof.RowConfig(2, 1, 58, 8, "cpu", "lookup"), 64, bundle)
    out = prof.profile(tiny_gemma3[2], (57,), 8, 1, (0, 6), drafter="lookup")
    assert [r["skipped"] for r in out["rows"]] == [None, None]
    # the bundle's size: every file the manifest lists (all but the manifest itself)
    assert out["bundle_bytes"] == sum(p.stat().st_size for p in tiny_gemma3[2].iterdir() if p.name != "edgemtp.json")


def test_the_plot_draws_only_the_series_that_ran(tmp_path, monkeypatch):
    """Each prompt / batch gets a line per drafter that ran there: one that ran only elsewhere got a line and a
    legend entry too, holding only the plain point ("mtp, batch 2" where MTP ran only at batch 1)."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from edgemtp.runtime import profile_report as report

    drawn = []
    real = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, **kw: drawn.append((kw["label"], list(x))) or real(self, x, y, **kw))
    measures = {"tg_tokens_per_s": {"mean": 1.0, "std": None}, "acceptance_by_position": []}  # one run each
    rows = [{"batch": b, "prompt_tokens": 8, "draft_k": k, "drafter": d, "head": "", "adaptive": False,
             "skipped": None, **measures} for b, k, d in ((1, 0, "none"), (1, 2, "mtp"), (2, 0, "none"))]
    report.plot({"rows": rows, "ceiling": {"tg_tokens_per_s": 1.0}}, tmp_path / "p.png")
    assert drawn == [("mtp, batch 1, prompt 8", [0, 2]), ("none, batch 2, prompt 8", [0])]


def test_a_rows_json_is_the_mean_and_sample_deviation_of_its_runs():
    """Each measure is shown as mean ± the sample standard deviation over the timed runs (llama-bench's); one
    run has none (null)."""
    import math

    from edgemtp.runtime import profile as prof

    row = prof.Row(prof.RowConfig(0, 1, 8, 4, "cpu", "none"), pp_tokens_per_s=[1.0, 2.0, 6.0],
                   tg_tokens_per_s=[4.0], ttft_s=[0.5, 1.5])
    out = row.to_json()
    # mean 3; squared deviations 4 + 1 + 9 over n - 1 = 2 runs
    assert out["pp_tokens_per_s"] == pytest.approx({"mean": 3.0, "std": math.sqrt(7)})
    assert out["tg_tokens_per_s"] == {"mean": 4.0, "std": None}  # one run: no spread measured (it read 0.0)
    assert out["ttft_s"] == pytest.approx({"mean": 1.0, "std": math.sqrt(0.5)})


def test_a_rows_acceptance_adds_up_over_its_timed_runs(monkeypatch):
    """Acceptance is the accepted drafts over the drafted ones of every timed run (not the warm-up's), and per
    draft position likewise."""
    from edgemtp.runtime import profile as prof

    runs = iter([(50, 50, [25, 25], [25, 25]), (10, 6, [6, 4], [5, 1]), (20, 9, [12, 8], [7, 2])])

    class FakeSpeculative:
        def __init__(self, *a, **k):
            pass

        def generate(self, prompts, n, sampling, stop_ids=(), stats=None):
            stats.drafted, stats.accepted, stats.drafted_at, stats.accepted_at = next(runs)
            stats.prefill_tokens, stats.prefill_s, stats.decode_tokens, stats.decode_s, stats.rounds = 8, 1, 9, 1, 5

    engine = type("FakeEngine", (), {"encode": lambda self, text: list(range(300)), "target": None,
                                     "bundle": None, "drafter": lambda self, *a: None})()
    monkeypatch.setattr(prof, "Speculative", FakeSpeculative)
    row = prof.run_row(engine, prof.RowConfig(2, 1, 8, 10, "cpu", "lookup"), 2, None)
    assert row.acceptance_rate == pytest.approx(15 / 30)
    assert row.acceptance_by_position == pytest.approx([12 / 18, 3 / 12])


def test_speedups_are_tg_over_the_plain_row_of_the_same_batch_and_prompt():
    from edgemtp.runtime import profile as prof

    def row(k, batch, prompt, tg, pp=1000.0, skipped=None):
        return {"draft_k": k, "batch": batch, "prompt_tokens": prompt, "drafter": "lookup" if k else "none",
                "head": "", "adaptive": False, "skipped": skipped, "tg_tokens_per_s": {"mean": tg, "std": 0.0},
                "pp_tokens_per_s": {"mean": pp, "std": 0.0}}

    rows = [row(0, 1, 8, 20.0), row(2, 1, 8, 30.0), row(0, 1, 64, 10.0, pp=500.0), row(2, 1, 64, 5.0),
            row(0, 2, 8, 40.0, skipped="no"), row(2, 2, 8, 50.0)]  # no plain row ran at batch 2: no speedup
    assert [(s["prompt_tokens"], s["speedup"]) for s in prof.speedups({"rows": rows})] == [(8, 1.5), (64, 0.5)]


def test_peak_rss_is_in_mib_whatever_the_source():
    """/proc's VmHWM is in KiB; getrusage's ru_maxrss in KiB on Linux and in bytes on macOS."""
    import types

    from edgemtp.runtime import profile as prof

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prof, "_proc_status_kib", lambda: {"VmHWM": 3 * 1024, "VmRSS": 1024})
        assert prof.peak_rss_mb() == 3.0

    def no_proc():
        raise FileNotFoundError(2, "No such file or directory", "/proc/self/status")

    usage = types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(ru_maxrss=5 * 2**20))
    for platform, want in (("linux", 5 * 1024), ("darwin", 5.0)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(prof, "_proc_status_kib", no_proc)
            mp.setattr(prof, "resource", usage)
            mp.setattr(prof.sys, "platform", platform)
            assert prof.peak_rss_mb() == want, platform


def test_the_ceiling_is_the_measured_bandwidth_over_the_bytes_a_step_reads(tiny_gemma3, monkeypatch):
    from edgemtp import bundle as bundle_mod
    from edgemtp.runtime import bandwidth
    from edgemtp.runtime import profile as prof

    b = bundle_mod.load(tiny_gemma3[2], verify=False)
    monkeypatch.setattr(bandwidth, "measure_bandwidth", lambda threads=None: 2.5e9)
    weights = whole_bytes(tiny_gemma3[2])
    b.manifest["files"]["drafter.onnx.data"] = {"bytes": 12345}  # a drafter's weights: plain decoding reads none
    got = prof.ceiling(b, None)
    assert got.pop("by_prompt_tokens") == []
    assert got == pytest.approx({"bandwidth_gb_s": 2.5, "weight_bytes": weights, "tg_tokens_per_s": 2.5e9 / weights})


def test_the_ceiling_at_each_prompt_length_counts_the_cache_its_steps_read(tiny_gemma3, monkeypatch):
    """Generating 4 tokens after a prompt of p: the steps after the first attend to p, p + 1 and p + 2 cached
    positions, each owning layer's keys and values in fp32, a sliding layer's within its window - 1."""
    from edgemtp import bundle as bundle_mod
    from edgemtp.runtime import bandwidth
    from edgemtp.runtime import profile as prof

    b = bundle_mod.load(tiny_gemma3[2], verify=False)
    monkeypatch.setattr(bandwidth, "measure_bandwidth", lambda threads=None: 2.5e9)
    weights = whole_bytes(tiny_gemma3[2])
    slots = b.target_contract.kv
    assert {bool(s.window) for s in slots} == {True, False}  # both kinds of layer are counted
    window = min(s.window for s in slots if s.window)

    def cache(c):  # bytes one step reads from the cache with c positions cached
        return sum(2 * 4 * s.num_heads * s.head_dim * (min(c, window - 1) if s.window else c) for s in slots)

    got = prof.ceiling(b, None, (window + 5, 2), 4)["by_prompt_tokens"]
    want = [(p, weights + (cache(p) + cache(p + 1) + cache(p + 2)) / 3) for p in (2, window + 5)]
    assert [(c["prompt_tokens"], c["read_bytes"]) for c in got] == [(p, round(r)) for p, r in want]
    assert [c["tg_tokens_per_s"] for c in got] == pytest.approx([2.5e9 / r for _, r in want])
    assert got[0]["read_bytes"] < got[1]["read_bytes"]


def test_the_bandwidth_is_the_fastest_kernels_median_read(monkeypatch):
    """Each kernel's median over the repeats (the single fastest read is a burst on a shared machine), then
    the fastest kernel: bytes over its seconds."""
    from edgemtp.runtime import bandwidth

    reads = iter([[9.0, 9.0, 9.0],  # the warm-up, not counted
                  [4.0, 2.0, 8.0], [1.0, 3.0, 8.0], [4.0, 3.0, 8.0], [5.0, 9.0, 0.5], [4.0, 2.5, 8.0]])

    class FakeProbe:
        nbytes = 600

        def __init__(self, threads, mbytes):
            pass

        def times(self):
            return next(reads)

    monkeypatch.setattr(bandwidth, "BandwidthProbe", FakeProbe)
    # medians: 4.0, 3.0 and 8.0 seconds
    assert bandwidth.measure_bandwidth(repeats=5) == 600 / 3.0


def test_a_static_bundles_step_reads_its_whole_kv_cache(tiny_gemma3, tmp_path):
    """A static graph takes every layer's whole cache buffers as inputs and scores all C positions, masked
    (exporters/static.py's attention: sliding layers too), so each step reads the keys and values of the
    capacity whatever the context; the weights alone stay decode_bytes(b). It counted no KV at all."""
    import numpy as np
    import onnx

    from edgemtp import bundle as bundle_mod
    from edgemtp.exporters import export
    from edgemtp.runtime.bandwidth import decode_bytes

    b = bundle_mod.load(export(tiny_gemma3[1], tmp_path / "static", capacity=64, static_window=5))
    weights = whole_bytes(b.dir)  # less the RoPE tables it gathers rows of
    graph = onnx.load(str(b.graph("target").path), load_external_data=False).graph
    past = sum(4 * int(np.prod([d.dim_value for d in i.type.tensor_type.shape.dim])) for i in graph.input
               if i.name.startswith("past_key_values."))  # fp32 [1, Nk, C, D] each
    assert past > 0 and decode_bytes(b) == weights
    for context in (1, 5, 40):
        assert decode_bytes(b, context) == weights + past


def _measured_row(**config) -> dict:
    """A row as Row.to_json writes it, each measure a different number."""
    return {"draft_k": 2, "batch": 1, "prompt_tokens": 8, "gen_tokens": 4, "provider": "cpu", "drafter": "lookup",
            "head": "", "adaptive": False, "draft_p_min": 0.0, "skipped": None, **config,
            "pp_tokens_per_s": {"mean": 101.25, "std": 2.5}, "tg_tokens_per_s": {"mean": 31.75, "std": 1.25},
            "ttft_s": {"mean": 0.0875, "std": 0.001}, "acceptance_rate": 0.625, "tokens_per_round": 2.25,
            "acceptance_by_position": [0.75, 0.5], "split_ms_per_round": {"draft": 1.5, "verify": 7.25, "other": 0.75},
            "peak_rss_mb": 321.0}


def test_every_format_puts_each_measure_in_its_own_column():
    import csv
    import io

    from edgemtp.runtime import profile_report as report

    result = {"bundle": "b", "bundle_bytes": 2_500_000_000, "peak_rss": "row",
              "ceiling": {"bandwidth_gb_s": 12.5, "weight_bytes": 1_250_000_000, "tg_tokens_per_s": 10.0},
              "rows": [_measured_row(), {**_measured_row(draft_k=0, drafter="none"), "skipped": "why"}]}
    rows = list(csv.DictReader(io.StringIO(report.render(result, "csv", []))))
    assert {k: float(v) for k, v in rows[0].items() if k in report.CSV_MEASURES} == {
        "pp_tokens_per_s_mean": 101.25, "pp_tokens_per_s_std": 2.5, "tg_tokens_per_s_mean": 31.75,
        "tg_tokens_per_s_std": 1.25, "ttft_s_mean": 0.0875, "acceptance_rate": 0.625, "tokens_per_round": 2.25,
        "draft_ms": 1.5, "verify_ms": 7.25, "other_ms": 0.75, "peak_rss_mb": 321.0}
    assert rows[1]["skipped"] == "why" and all(rows[1][k] == "" for k in report.CSV_MEASURES)
    md = report.render(result, "md", [{"drafter": "lookup", "draft_k": 2, "batch": 1, "prompt_tokens": 8,
                                       "speedup": 1.25}])
    lines = md.splitlines()
    header, cells = (line.strip("|").split(" | ") for line in (lines[0], lines[2]))
    assert dict(zip(map(str.strip, header), map(str.strip, cells))) == {
        "draft_k": "2", "batch": "1", "prompt_tokens": "8", "gen_tokens": "4", "provider": "cpu", "drafter": "lookup",
        "head": "", "adaptive": "", "draft_p_min": "0.0",
        "pp t/s": "101.2 ± 2.5", "tg t/s": "31.8 ± 1.2", "ttft ms": "88",
        "accept": "0.62", "tok/round": "2.25", "draft ms": "1.5", "verify ms": "7.2", "other ms": "0.8",
        "peak rss MiB": "321"}  # the peak, as peak_rss_mb and the README say: "rss MB" read as the current size
    # in MiB (VmHWM / 1024): labelled MB beside the line's decimal GB, 2,010 of them read as 2.01 GB, not 2.11
    assert ("bandwidth ceiling of plain decoding: 10.0 tokens/s (1.25 GB of weights per token at 12.5 GB/s); "
            "bundle 2.50 GB") in lines
    cached = {**result["ceiling"], "by_prompt_tokens": [
        {"prompt_tokens": 128, "read_bytes": 1_262_500_000, "tg_tokens_per_s": 9.9},
        {"prompt_tokens": 2048, "read_bytes": 1_450_000_000, "tg_tokens_per_s": 8.62}]}
    assert report.ceiling_line({**result, "ceiling": cached}) == (
        "bandwidth ceiling of plain decoding: 10.0 tokens/s (1.25 GB of weights per token at 12.5 GB/s), with the "
        "KV cache read: 9.9 at prompt 128, 8.6 at prompt 2048; bundle 2.50 GB")
    assert lines[-1] == "tg speedup vs no draft: lookup k=2 (batch 1, prompt 8): 1.25x — best: lookup k=2 at 1.25x"


def test_one_repetition_shows_no_spread():
    """At --repetitions 1 there is no spread to show: the table gives the mean alone and the CSV an empty
    cell (they showed "± 0.0", a spread measured as none)."""
    import csv
    import io

    from edgemtp.runtime import profile_report as report

    one = {"mean": 31.75, "std": None}
    row = {**_measured_row(), "pp_tokens_per_s": one, "tg_tokens_per_s": one, "ttft_s": {"mean": 0.0875, "std": None}}
    result = {"bundle": "b", "bundle_bytes": 1, "peak_rss": "row", "rows": [row],
              "ceiling": {"bandwidth_gb_s": 12.5, "weight_bytes": 1, "tg_tokens_per_s": 10.0}}
    lines = report.render(result, "md", []).splitlines()
    header, cells = (line.strip("|").split(" | ") for line in (lines[0], lines[2]))
    shown = dict(zip(map(str.strip, header), map(str.strip, cells)))
    assert (shown["pp t/s"], shown["tg t/s"]) == ("31.8", "31.8")
    assert "±" not in report.render(result, "table", [])
    got = next(csv.DictReader(io.StringIO(report.render(result, "csv", []))))
    assert (got["pp_tokens_per_s_std"], got["tg_tokens_per_s_std"], got["tg_tokens_per_s_mean"]) == ("", "", "31.75")


def test_the_speedup_verdict_names_the_best_and_says_when_none_pays():
    from edgemtp.runtime import profile_report as report

    def s(k, speedup):
        return {"drafter": "mtp", "head": "full", "draft_k": k, "batch": 1, "prompt_tokens": 8, "speedup": speedup}

    assert report._speedup_text([s(2, 1.1), s(4, 1.4), s(6, 0.9)]).endswith("— best: mtp/full k=4 at 1.40x")
    assert report._speedup_text([s(2, 0.8), s(4, 1.0)]).endswith(
        "— drafting does not pay off here (break-even not reached)")


def test_the_trace_table_totals_each_ops_kernel_time(tmp_path):
    """ONNX Runtime's trace gives each kernel's duration in microseconds: the table sums them per op type."""
    from edgemtp.runtime import profile_report as report

    events = [{"cat": "Node", "name": "a_kernel_time", "dur": 3000, "args": {"op_name": "MatMul"}},
              {"cat": "Node", "name": "b_kernel_time", "dur": 1500, "args": {"op_name": "MatMul"}},
              {"cat": "Node", "name": "c_kernel_time", "dur": 500, "args": {"op_name": "Add"}},
              {"cat": "Node", "name": "c_fence_before", "dur": 9000, "args": {"op_name": "Add"}},
              {"cat": "Session", "name": "model_run", "dur": 99000, "args": {}}]
    produced = tmp_path / "ort.json"
    produced.write_text(json.dumps(events))
    session = type("Session", (), {"end_profiling": lambda self: str(produced)})()
    closed = []
    engine = type("Engine", (), {"target": type("Target", (), {"session": session})(),
                                 "close": lambda self: closed.append(True)})()
    table = report.write_trace(lambda prefix: engine, lambda e: None, tmp_path / "t.json")
    assert closed == [True]  # the engine it made is closed once the trace is read
    assert [line.split() for line in table.splitlines()[1:]] == [["MatMul", "4.5", "2", "90.0%"],
                                                                ["Add", "0.5", "1", "10.0%"]]
    assert json.loads((tmp_path / "t.json").read_text()) == events

    def fails(e):
        raise RuntimeError("the run failed")
    with pytest.raises(RuntimeError, match="the run failed"):
        report.write_trace(lambda prefix: engine, fails, tmp_path / "u.json")
    assert closed == [True, True] and not (tmp_path / "u.json").exists()  # closed on a failed run too


def test_a_batch_is_skipped_when_its_cache_and_logits_take_over_half_the_memory(tiny_gemma3, monkeypatch):
    """A row's sequences touch the KV of every position they reach (prompt + gen + K + 1) and a verify pass's
    logits (K + 1 positions, two copies), each per sequence; beyond half the machine's memory it is skipped."""
    from edgemtp import bundle as bundle_mod
    from edgemtp.runtime import profile as prof

    bundle = bundle_mod.load(tiny_gemma3[2], verify=False)
    c = prof.RowConfig(2, 3, 8, 4, "cpu", "lookup")
    # 4 KV-owning layers x 2 heads x head_dim 32, K and V in fp32; a vocabulary of 96
    need = 3 * (4 * 2 * 32 * 2 * 4 * (8 + 4 + 2 + 1) + 2 * 96 * 4 * (2 + 1))
    assert prof.row_bytes(c, bundle) == need
    monkeypatch.setattr(prof, "physical_memory", lambda: 2 * need)
    assert prof.skip_reason(c, 64, bundle) == ""
    monkeypatch.setattr(prof, "physical_memory", lambda: 2 * need - 2)
    assert prof.skip_reason(c, 64, bundle).startswith("batch 3 needs about")


def test_draft_p_min_reaches_the_mtp_and_hybrid_rows(monkeypatch):
    """--draft-p-min is the MTP drafter's: its rows carry it to their rounds; plain and lookup rows keep 0."""
    from edgemtp.runtime import profile as prof

    todo = prof.configs([0, 2], [1], [8], 4, "cpu", ["lookup", "mtp", "hybrid"], ["clustered"], adaptive=True,
                        p_min=0.2)
    assert [(c.drafter, c.adaptive, c.draft_p_min) for c in todo] == [
        ("none", False, 0.0), ("lookup", False, 0.0), ("lookup", True, 0.0), ("mtp", False, 0.2), ("mtp", True, 0.2),
        ("hybrid", False, 0.2), ("hybrid", True, 0.2)]
    seen = []

    class FakeSpeculative:
        def __init__(self, target, drafter, k, adaptive=False, p_min=0.0):
            seen.append(p_min)

        def generate(self, prompts, n, sampling, stop_ids=(), stats=None):
            stats.prefill_s = stats.decode_s = 1.0

    engine = type("FakeEngine", (), {"encode": lambda self, text: list(range(300)), "target": None,
                                     "drafter": lambda self, *args: None, "bundle": None})()
    monkeypatch.setattr(prof, "Speculative", FakeSpeculative)
    prof.run_row(engine, prof.RowConfig(2, 1, 8, 4, "cpu", "mtp", draft_p_min=0.2), 1, None)
    assert seen == [0.2, 0.2]  # the warm-up and the timed run


def test_bandwidth_probe_sessions_run_the_decode_steps_thread_count(tmp_path, monkeypatch):
    """The ceiling is measured with the threads decoding runs with (make_session's): --threads N where given,
    else one per CPU the process may use (taskset), else ONNX Runtime's default (0)."""
    import os

    import edgemtp.runtime.session as S
    from edgemtp.runtime import bandwidth

    def threads(given):
        return bandwidth._session("MatMul", {}, [bandwidth.BandwidthProbe.K, 8], given).get_session_options() \
            .intra_op_num_threads

    monkeypatch.setattr(S, "CGROUP", tmp_path / "cgroup")  # no quota
    monkeypatch.setattr(S, "CPUS", tmp_path / "cpus")  # no topology: each CPU its own core
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5, 6})
    assert [threads(n) for n in (None, 0, 1, 4)] == [3, 3, 1, 4]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [threads(n) for n in (None, 2)] == [0, 2]


def test_every_engine_profile_loads_maps_the_packed_cache(tiny_gemma3, tmp_path, monkeypatch):
    """--packed-cache DIR, as generate's: the rows' engines (plain and lookup rows', MTP rows') and --trace's all
    load the target from the packed copy under DIR, the trace's own session too; the JSON says it was given, as
    it does --fast-verify (a user compares runs with and without it on their device)."""
    from edgemtp.exporters import export
    from edgemtp.runtime import session
    from edgemtp.runtime.engine import Engine

    from .test_drafter import tiny_drafter

    tiny_drafter(tiny_gemma3[1], tmp_path / "drafter")  # MTP rows: their engine is loaded apart
    bundle = export(tiny_gemma3[1], tmp_path / "mtp", capacity=64, drafter=tmp_path / "drafter")
    load, make = Engine.load.__func__, session.make_session
    caches, traced = [], []

    def recording_load(cls, *args, **kwargs):
        caches.append(kwargs.get("packed_cache"))
        return load(cls, *args, **kwargs)

    def recording_make(path, *args, profile_prefix=None, **kwargs):
        if profile_prefix is not None:
            traced.append(Path(path))
        return make(path, *args, profile_prefix=profile_prefix, **kwargs)

    monkeypatch.setattr(Engine, "load", classmethod(recording_load))
    monkeypatch.setattr(session, "make_session", recording_make)
    cache = tmp_path / "cache"
    r = profile(bundle, "--prompt-tokens", "8", "--gen-tokens", 4, "--repetitions", 1, "--draft-k", "0,2",
                "--draft", "lookup,mtp", "--trace", tmp_path / "t.json", "--packed-cache", cache, "--format", "json")
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["packed_cache"] is True and all(not row["skipped"] for row in out["rows"])
    assert caches == [cache] * 3  # the plain and lookup rows' engine, the MTP rows', the trace's
    [copy] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert traced == [copy / "target.onnx"]
    r = profile(tiny_gemma3[2], "--prompt-tokens", "8", "--gen-tokens", 2, "--repetitions", 1, "--draft-k", "0",
                "--format", "json")
    assert json.loads(r.stdout[r.stdout.index("{"):])["packed_cache"] is False


def test_a_bad_packed_cache_is_named_before_the_run(tiny_gemma3, tmp_path, monkeypatch):
    """A file given as --packed-cache DIR, or a target on a provider other than the CPU's (the packed layouts are
    its kernels'), fails once naming the flag before anything runs: not at the first engine's load, where the
    message named the path alone, nor, where every row is skipped, only as 'no row ran' after the bandwidth probe."""
    from edgemtp.runtime import profile as prof
    from edgemtp.runtime import session
    from edgemtp.runtime.engine import Engine

    monkeypatch.setattr(prof, "run_row", lambda *a: pytest.fail("a row ran"))
    monkeypatch.setattr(prof, "ceiling", lambda *a: pytest.fail("the bandwidth probe ran"))
    monkeypatch.setattr(Engine, "load", lambda *a, **k: pytest.fail("an engine loaded"))
    monkeypatch.setattr(session.ort, "get_available_providers",
                        lambda: ["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    (tmp_path / "afile").write_text("x")
    afile = tmp_path / "afile"
    for args, message in (
            (("--packed-cache", afile), f"--packed-cache '{afile}' is a file, not a directory"),
            (("--packed-cache", afile / "under"), f"--packed-cache '{afile / 'under'}' is under {afile}, which is a "
                                                  "file, not a directory"),
            (("--packed-cache", afile, "--prompt-tokens", "60", "--gen-tokens", 6),  # every row skipped
             f"--packed-cache '{afile}' is a file, not a directory"),
            (("--packed-cache", tmp_path / "c", "--provider", "openvino"),
             f"--packed-cache '{tmp_path / 'c'}' keeps the packed weights of ONNX Runtime's CPU kernels, and the "
             "target runs on provider 'openvino' (give no packed cache there)")):
        r = CliRunner().invoke(cli, ["profile", str(tiny_gemma3[2]), "--prompt-tokens", "8", "--gen-tokens", "4",
                                     "--repetitions", "1", "--draft-k", "0", *map(str, args)])
        assert_one_line_error(r, message)
    # the Python API names its argument, as Engine.load does (one check for both: packed_cache.check_packed_cache)
    with pytest.raises(ArgumentError, match=r"^packed_cache='[^']*/c' keeps the packed weights of ONNX Runtime's "
                       r"CPU kernels, and the target runs on provider 'openvino'"):
        prof.profile(tiny_gemma3[2], (8,), 4, 1, (0,), provider="openvino", packed_cache=tmp_path / "c")
    with pytest.raises(ArgumentError, match=r"^packed_cache=3 must be a directory's path"):
        prof.profile(tiny_gemma3[2], (8,), 4, 1, (0,), packed_cache=3)
    assert not (tmp_path / "c").exists()
