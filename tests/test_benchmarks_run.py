"""Each runnable script in benchmarks/ end to end on tiny bundles, with the fewest tokens and rounds: the
scripts are run by hand for the figures in README and docs/measurements.md, and only linted otherwise, so a
runtime or CLI change that breaks one (or turns a figure into nonsense) would go unseen until the next
measurement. No figure's size is checked (timings on a shared machine), only that it is there and sane.

The tiny model has a vocabulary of 1,024 and a capacity of 1,024: the scripts feed fixed token ids up to
1,000 and prompts of a few hundred words (the test tokenizer is one token a word)."""

from __future__ import annotations

import importlib.util
import math
import re
import runpy
import shutil
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BENCH = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> bundle dir: plain, mtp (with a random MTP drafter), rows (row-major head, with the drafter),
    static (static verify window 5, with the drafter), bare_static (static, no drafter); and "drafter"."""
    from edgemtp.drafter import export as drafter_export
    from edgemtp.exporters import export

    from .reference import save_tiny
    from .test_drafter import tiny_drafter

    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24, final_logit_softcapping=30.0)
    model_dir = save_tiny(transformers.Gemma3ForCausalLM(cfg), root / "model")
    tiny_drafter(model_dir, root / "drafter")
    out = {"drafter": root / "drafter", "plain": export(model_dir, root / "plain", capacity=1024)}
    shutil.copytree(out["plain"], root / "mtp")
    drafter_export.add_to_bundle(root / "mtp", root / "drafter")
    out["mtp"] = root / "mtp"
    out["rows"] = export(model_dir, root / "rows", capacity=1024, gemv_head=False, drafter=root / "drafter")
    out["static"] = export(model_dir, root / "static", capacity=256, static_window=5, drafter=root / "drafter")
    out["bare_static"] = export(model_dir, root / "bare_static", capacity=256, static_window=5)
    return {k: Path(v) for k, v in out.items()}


def run(script: str, *args, capsys, monkeypatch) -> str:
    """stdout of benchmarks/SCRIPT run as `python SCRIPT ARGS` from benchmarks/ (some import lookup_ngram)."""
    monkeypatch.chdir(BENCH)
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    capsys.readouterr()
    runpy.run_path(str(BENCH / script), run_name="__main__")
    return capsys.readouterr().out


def figures(line: str, suffix: str = "x") -> list[float]:
    """The numbers followed by `suffix` in a line, e.g. the ratios "1.23x"."""
    return [float(v) for v in re.findall(r"(-?[\d.]+|nan|inf)" + re.escape(suffix) + r"(?![\w])", line)]


def sane(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) and v > 0 for v in values)


def table_rows(out: str) -> list[list[str]]:
    """A markdown table's body rows, cells stripped."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("|") and not line.startswith("|---")][1:]


def test_lookup_ngram_and_adaptive_k(tiny, capsys, monkeypatch):
    for script, extra in (("lookup_ngram.py", ()), ("adaptive_k.py", ("--k", "2", "--modes", "lookup,mtp,hybrid"))):
        out = run(script, tiny["mtp"], "--gen-tokens", 4, "--repetitions", 1, *extra, capsys=capsys,
                  monkeypatch=monkeypatch)
        rows = table_rows(out)
        mean = ["geometric mean"] if script == "adaptive_k.py" else []
        assert [r[0] for r in rows] == ["build.py", "README", "inspect.py", "json", "story", *mean], out
        columns = len(rows[0]) - 2  # the prompt and plain tokens/s
        assert columns == (4 if script == "lookup_ngram.py" else 6)
        for r in rows:
            assert sane(figures(" ".join(r[2:]))) and len(figures(" ".join(r[2:]))) == columns, r


def test_bench_bindings(tiny, capsys, monkeypatch):
    out = run("bench_bindings.py", tiny["mtp"], "--rounds", 1, "--new", 4, "--draft", "hybrid",
              capsys=capsys, monkeypatch=monkeypatch)
    assert "draft=hybrid 4 tokens x 1 rounds" in out
    (line,) = [s for s in out.splitlines() if s.startswith("reused / fresh")]
    assert sane(figures(line))


def test_bench_bundles_with_and_without_a_drafter(tiny, capsys, monkeypatch):
    """Two layouts of one model (the docstring's own example: the default against --no-gemv-head) need not
    carry an MTP drafter: the generation rows that draft by MTP are left out, not a crash."""
    out = run("bench_bundles.py", tiny["mtp"], tiny["rows"], "--repetitions", 1, "--gen-tokens", 4,
              capsys=capsys, monkeypatch=monkeypatch)
    labels = [s[:28].strip() for s in out.splitlines()]
    assert labels[:2] == ["prefill, 128 tokens", "drafter step (64 recent)"]
    assert {"mtp K=4, code", "mtp adaptive, prose", "auto K=4, code"} <= set(labels)
    assert all(sane(figures(s.split("NEW/OLD")[1], "")) for s in out.splitlines()), out
    out = run("bench_bundles.py", tiny["plain"], tiny["rows"], "--repetitions", 1, "--gen-tokens", 4,
              capsys=capsys, monkeypatch=monkeypatch)
    labels = [s[:28].strip() for s in out.splitlines()]
    assert labels == ["prefill, 128 tokens", "plain, code", "plain, prose", "auto K=4, code", "auto K=4, prose"]


def test_bench_decode_and_speeds(tiny, capsys, monkeypatch, tmp_path):
    out = run("bench_decode.py", tiny["plain"], "--contexts", "128,600", "--rounds", 1, "--pairs", 2,
              "--also", tiny["rows"], "--packed-cache", tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert "threads=2 prompt=128 tokens, 1 rounds" in out
    assert len(re.findall(r"median of 2 pairs", out)) == 3
    for label in ("rows", f"{tiny['plain'].name}, packed cache"):
        (line,) = [s for s in out.splitlines() if s.startswith(f"{label}: decode steps")]
        assert sane(figures(line.split("(")[0]))
    assert re.search(r"context   600: decode step +[\d.]+ ms  \([\d.]+x the first context\)", out)
    out = run("bench_speeds.py", tiny["plain"], tiny["rows"], "--runs", 1, "--contexts", 128,
              capsys=capsys, monkeypatch=monkeypatch)
    ratios = [figures(s.split("tokens/s")[1]) for s in out.splitlines() if "the first" in s]
    assert ratios[0] == [1.0] and sane(ratios[1])


def test_bench_packed(tiny, capsys, monkeypatch):
    out = run("bench_packed.py", tiny["plain"], "--pairs", 2, "--new", 6, capsys=capsys, monkeypatch=monkeypatch)
    loads = [s for s in out.splitlines() if " load " in s]
    assert [s[:20].strip() for s in loads] == ["default load", "packed cache, first", "packed cache, again"]
    assert all(len(figures(s.replace(",", ""), " MB")) == 3 and sane(figures(s.replace(",", ""), " MB"))
               and sane(figures(s, " s")) for s in loads)
    assert re.search(r"packed cache on disk: [\d.]+ GB", out)
    (line,) = [s for s in out.splitlines() if s.startswith("decode step:")]
    assert sane(figures(line.split("as fast")[0])) and "median of 2 pairs" in line
    assert "same tokens: True" in out
    assert not list(tiny["plain"].parent.glob(".bench-packed-*"))  # its cache removed at the end


def test_bench_kernels(tiny, capsys, monkeypatch):
    out = run("bench_kernels.py", tiny["plain"], "--pairs", 1, capsys=capsys, monkeypatch=monkeypatch)
    shares = [figures(s, "%")[0] for s in out.splitlines() if "reads the body at" in s]
    assert len(shares) == 2 * 5 + 2 - 1 and sane(shares)  # 5 kernels at both thread counts (numpy once), 2 bodies


def test_bench_memory(tiny, capsys, monkeypatch):
    out = run("bench_memory.py", tiny["mtp"], "--rounds", 1, "--tokens", 4, capsys=capsys, monkeypatch=monkeypatch)
    assert {"peak RSS, MB", "anonymous after, MB", "RSS after, MB", "Engine.load, ms"} <= \
        {s[21:].split("  ")[0] for s in out.splitlines()[1:]}


def test_bench_prefix_reuse(tiny, capsys, monkeypatch):
    out = run("bench_prefix_reuse.py", tiny["mtp"], "--turns", 2, "--gen-tokens", 4,
              capsys=capsys, monkeypatch=monkeypatch)
    rows = [s.split() for s in out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["1", "2"] and all(r[-1] == "True" for r in rows), out
    assert int(rows[1][2]) < int(rows[1][1]) == int(rows[1][3]), out  # the second turn runs only its new part
    assert sane([float(r[-2].rstrip("x")) for r in rows]), out


def test_bench_quant(tiny, capsys, monkeypatch, tmp_path):
    out = run("bench_quant.py", tiny["plain"], "--quants", "int8", "--tokens", 64, "--domains", "code",
              "--keep", tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    rows = {r[0]: r for r in table_rows(out)}
    assert set(rows) == {"fp32", "int8"} and rows["fp32"][2] == "1.000" and rows["fp32"][4] == "1.00x"
    assert 0 < float(rows["int8"][2]) < 1 and sane(figures(rows["int8"][4]))
    assert "code (64 tokens" in out


def test_bench_quant_names_a_variant_without_calibration(tiny, capsys, monkeypatch, tmp_path):
    out = run("bench_quant.py", tiny["plain"], "--quants", "", "--variant", 'plain8=int8:{"calibration": null}',
              "--tokens", 64, "--domains", "code", "--no-speed", "--keep", tmp_path, capsys=capsys,
              monkeypatch=monkeypatch)
    assert "quantized plain8 (int8 {'calibration': None})" in out, out  # not "{}", which reads as the default


def test_bench_sampling(tiny, capsys, monkeypatch):
    out = run("bench_sampling.py", tiny["mtp"], "--gen-tokens", 4, "--repetitions", 1, "--repetition-penalty",
              1.1, "--draft-p-min", "0,0.2", capsys=capsys, monkeypatch=monkeypatch)
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["plain", "lookup K=4", "hybrid K=4", "MTP K=4", "hybrid K=4 p_min 0.2",
                                    "MTP K=4 p_min 0.2"]
    assert rows[0][2] == "1.00x" and all(sane(figures(" ".join(r[1:]))) for r in rows)


def test_bench_static(tiny, capsys, monkeypatch):
    out = run("bench_static.py", tiny["plain"], tiny["static"], "--gen-tokens", 6, capsys=capsys,
              monkeypatch=monkeypatch)
    lines = out.splitlines()
    assert lines[0].startswith("static verify window W = 5,") and lines[0].endswith("6 new tokens")
    assert len(lines) == 1 + 7 and all(s.split()[-3] == "True" for s in lines[1:])  # same tokens as plain
    assert all(sane(figures(s.split("(")[1])) for s in lines[1:])


def test_bench_static_without_a_drafter_skips_the_modes_that_need_one(tiny, capsys, monkeypatch):
    out = run("bench_static.py", tiny["plain"], tiny["bare_static"], "--gen-tokens", 4, "--runs",
              "plain,mtp:2,hybrid:2,lookup:2", capsys=capsys, monkeypatch=monkeypatch)
    lines = out.splitlines()[1:]
    assert [s.split()[0] for s in lines] == ["plain", "mtp:2", "hybrid:2", "lookup:2"]
    assert [s.split()[1] for s in lines][1:3] == ["skipped:", "skipped:"]
    assert lines[3].split()[-3] == "True"


def test_bench_stream_text(tiny, capsys, monkeypatch):
    out = run("bench_stream_text.py", tiny["plain"] / "tokenizer.json", "--lengths", "60,120", "--repetitions", 1,
              capsys=capsys, monkeypatch=monkeypatch)
    assert [s.split()[0] for s in out.splitlines()[1:]] == ["60", "120"]


def test_bench_stream_text_refuses_a_length_shorter_than_what_it_times(tiny, capsys, monkeypatch):
    """Each length's last 50 tokens are timed: a shorter length timed nothing and printed a ratio of
    thousands (a decode of nearly the whole text against no work at all)."""
    with pytest.raises(SystemExit, match="--lengths: 10 is fewer than the 50 tokens"):
        run("bench_stream_text.py", tiny["plain"] / "tokenizer.json", "--lengths", "10", "--repetitions", 1,
            capsys=capsys, monkeypatch=monkeypatch)


def test_drafter_acceptance(tiny, capsys, monkeypatch, tmp_path):
    import json

    bundle = tmp_path / "mtp"  # it writes its drafter graphs into the bundle directory
    shutil.copytree(tiny["mtp"], bundle)
    out = run("drafter_acceptance.py", bundle, "--drafter", tiny["drafter"], "--domains", "code", "--prompts", 1,
              "--prompt-len", 16, "--new", 8, "--k", 2, "--chunk", 1, "--speculative", 1, "--hybrid", 2,
              "--json", tmp_path / "a.json", capsys=capsys, monkeypatch=monkeypatch)
    got = json.loads((tmp_path / "a.json").read_text())
    assert "prose" not in got and not any(line.startswith("prose") for line in out.splitlines())  # none asked
    code = got["code"]
    for name in ("prompt_lookup", "mtp_full", "mtp_full_hybrid2"):
        assert code[name]["rounds"] > 0 and 1 <= code[name]["tokens_per_round"] <= 3
    # the runtime, on the same prompt, makes the tokens the replay scored and more (its last rounds' drafts
    # are cut at the end: the replay scores only full drafts)
    assert code["mtp_full"]["speculative_check"]["runtime"]["rounds"] >= code["mtp_full"]["rounds"]


def test_drafter_acceptance_pairs_heads_on_one_prompt_without_a_nan(tiny, capsys, monkeypatch, tmp_path):
    import json

    bundle = tmp_path / "mtp"
    shutil.copytree(tiny["mtp"], bundle)
    run("drafter_acceptance.py", bundle, "--drafter", tiny["drafter"], "--heads", "full,bundle", "--domains", "code",
        "--prompts", 1, "--prompt-len", 16, "--new", 8, "--k", 2, "--json", tmp_path / "a.json", capsys=capsys,
        monkeypatch=monkeypatch)
    text = (tmp_path / "a.json").read_text()
    assert "NaN" not in text  # not JSON: one prompt has no standard error
    assert json.loads(text)["paired"]["bundle - full"]["code"]["se"] is None


def test_drafter_acceptance_names_a_missing_corpus(tiny, capsys, monkeypatch, tmp_path):
    from edgemtp.drafter import data

    if data.DOCS_ROOT.is_dir():
        pytest.skip("the docs corpus is installed here")
    with pytest.raises(SystemExit, match=r"--domains: .*_sources: missing \(install the reST sources"):
        run("drafter_acceptance.py", tiny["mtp"], "--drafter", tiny["drafter"], "--domains", "docs",
            "--prompts", 1, capsys=capsys, monkeypatch=monkeypatch)


def test_no_attention_and_perf_table(tiny, capsys, monkeypatch, tmp_path):
    out = run("no_attention.py", tiny["plain"], tmp_path / "noatt", capsys=capsys, monkeypatch=monkeypatch)
    assert out.strip().endswith("2 attention nodes removed")
    from edgemtp import bundle as bundle_mod

    bundle_mod.load(tmp_path / "noatt")  # its manifest's hash is the new graph's
    out = run("perf_table.py", tiny["mtp"], "--draft-k", "0,2", "--batch", "1,2", "--gen-tokens", 4,
              "--repetitions", 1, "--draft", "auto,mtp", "--head", "full", "--domains", "code",
              "--prompt-tokens", 16, capsys=capsys, monkeypatch=monkeypatch)
    rows = table_rows(out)
    settings = (("none", "0"), ("hybrid (full head)", "2"), ("mtp (full head)", "2"))
    assert [(r[1], r[2], r[3]) for r in rows] == [(b, d, k) for b in "12" for d, k in settings]
    assert all(sane(figures(r[5])) for r in rows) and "bandwidth ceiling of plain decoding" in out


def test_perf_table_without_k_0_prints_no_ratio(tiny, capsys, monkeypatch):
    out = run("perf_table.py", tiny["mtp"], "--draft-k", "2", "--batch", "1", "--gen-tokens", 4, "--repetitions", 1,
              "--draft", "mtp", "--head", "full", "--domains", "code", "--prompt-tokens", 16, capsys=capsys,
              monkeypatch=monkeypatch)
    rows = table_rows(out)
    assert [(r[2], r[3], r[5]) for r in rows] == [("mtp (full head)", "2", "-")], out  # not "nanx": no K = 0 row


@pytest.mark.parametrize("script, args, message", [
    ("vs_llamacpp.py", ("{plain}",), "llama-cpp-python is not installed: pip install llama-cpp-python"),
    ("vs_ortgenai.py", ("{plain}", "{plain}"), "no genai_config.json (build it with onnxruntime_genai"),
    # a cache directory head_data.py has not made: as on a machine it never ran on
    ("head_int8_agreement.py", ("--cache", "{missing}"), "no cached hidden states for code/heldout"),
    ("head_recall.py", ("--cache", "{missing}"), "no cached hidden states for code/calib"),
])
def test_what_needs_another_package_or_data_says_so(tiny, capsys, monkeypatch, tmp_path, script, args, message):
    if script == "vs_llamacpp.py" and importlib.util.find_spec("llama_cpp"):
        pytest.skip("llama-cpp-python is installed")
    if script == "vs_ortgenai.py" and not importlib.util.find_spec("onnxruntime_genai"):  # not a test dependency
        message = "onnxruntime-genai is not installed: pip install onnxruntime-genai"
    with pytest.raises(SystemExit) as e:
        run(script, *(a.format(missing=tmp_path / "headcal", **tiny) for a in args), capsys=capsys,
            monkeypatch=monkeypatch)
    assert message in str(e.value.code)


@pytest.mark.parametrize("script, args", [
    ("bench_prefix_reuse.py", ("{plain}", "--draft", "mtp")),  # no MTP drafter in the bundle
    ("bench_sampling.py", ("{plain}", "--gen-tokens", "0")),
    ("bench_speeds.py", ("{missing}",)),
    ("bench_stream_text.py", ("{missing}",)),
])
def test_a_user_mistake_is_one_line_not_a_traceback(tiny, capsys, monkeypatch, tmp_path, script, args):
    """As the CLI: the library's message for a bad bundle or flag, on one line, and exit status 2."""
    with pytest.raises(SystemExit) as e:
        run(script, *(a.format(missing=tmp_path / "nothing", **tiny) for a in args), capsys=capsys,
            monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_every_script_runs_its_main_through_script_main():
    scripts = sorted(f.name for f in BENCH.glob("*.py") if "script_main(" not in f.read_text())
    assert not scripts, f"these scripts' main does not run through errors.script_main: {scripts}"


@pytest.mark.slow
def test_bench_head_and_decode_on_the_real_model(gemma3_270m_bundle, capsys, monkeypatch):
    out = run("bench_decode.py", gemma3_270m_bundle, "--contexts", 128, "--rounds", 1, "--pairs", 2, capsys=capsys,
              monkeypatch=monkeypatch)
    assert "decode step = " in out
    out = run("bench_head.py", "--rounds", 1, "--shapes", "270m", capsys=capsys, monkeypatch=monkeypatch)
    assert sane([float(s.split("ms")[1].split("x")[0]) for s in out.splitlines() if " ms " in s])


def test_window_copies(tiny_gemma3, capsys, monkeypatch):
    """On the tiny Gemma 3 with 2 sliding KV heads: both kinds of step at each context, the same logits."""
    out = run("window_copies.py", "--bundle", tiny_gemma3[2], "--contexts", "16,40", "--pairs", 1, capsys=capsys,
              monkeypatch=monkeypatch)
    lines = out.strip().splitlines()
    assert "2 of 4 KV-owning layers slide with several KV heads (window 8)" in lines[0], out
    assert [line.split(":")[0] for line in lines[1:]] == ["context     16", "context     40"], out
    assert all(sane(figures(line)) and "(logits 0.0e+00 apart)" in line for line in lines[1:]), out


def test_window_copies_refuses_a_bundle_whose_cache_makes_none(tiny_gemma3, tmp_path, capsys, monkeypatch):
    """Window 8 at a capacity of 20: 1.5 windows are over half of it, so the cache makes no copies
    (kv_cache.shadow_plan) and both kinds of step bind the whole buffers. The script timed them anyway and
    printed their ratio as the copies' (about 1.00x, "with the window's copies"); now it says why it cannot."""
    from edgemtp.exporters import export

    bundle = export(tiny_gemma3[1], tmp_path / "bundle", capacity=20)
    with pytest.raises(SystemExit) as e:
        run("window_copies.py", "--bundle", bundle, "--contexts", "16", "--pairs", 1, capsys=capsys,
            monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "makes no window copies at a capacity of 20" in err, err


def test_window_copies_refuses_a_bundle_with_one_kv_head(tiny, capsys, monkeypatch):
    """The tiny model's sliding layer has one KV head: its one-row passes read the window in place, no copies
    (as Gemma 3 270M's). The script timed window views against the whole buffers and printed the ratio as the
    copies' under "0 of 2 KV-owning layers slide with several KV heads"."""
    with pytest.raises(SystemExit) as e:
        run("window_copies.py", "--bundle", tiny["plain"], "--contexts", "16", "--pairs", 1, capsys=capsys,
            monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no sliding layer with several KV heads" in err, err


def test_head_recall_s_table_names_each_row_in_full_under_its_column(capsys, monkeypatch):
    """A --head file's path was cut to its last 40 characters (two heads could read alike) and pushed its row's
    cells past the columns, whose k= headings drifted a character right of their cells per column."""
    monkeypatch.syspath_prepend(str(BENCH))
    import head_recall
    from edgemtp.calibration.head_report import TOP_KS

    def fig(context):
        return {"k": {k: {"recall": 0.9123, "mass": 0.876, **({"recall_context": 0.95} if context else {})}
                      for k in TOP_KS}}

    long = "/home/someone/.cache/edgemtp/drafters/gemma3-270m-old/head.safetensors"
    head_recall.print_table({"swapped": {"code": fig(True), "cpu_s": 3.0}, long: {"code": fig(False)}})
    lines = capsys.readouterr().out.strip("\n").splitlines()
    assert [line.split()[0] for line in lines] == ["method", "swapped", "+", long]
    n = len(TOP_KS) + 1  # the data column, then one a k

    def spans(line):
        return [m.span() for m in re.finditer(r"\S+", line)][-n:]

    heading, cells, context, cells_2 = spans(lines[0].removesuffix("(recall@1 / mass)")), *map(spans, lines[1:])
    assert [start for start, _ in heading[:1] + cells[:1] + context[:1] + cells_2[:1]] == [heading[0][0]] * 4
    assert [end for _, end in heading[1:]] == [end for _, end in cells[1:]] == [end for _, end in cells_2[1:]]
    assert [start for start, _ in context[1:]] == [start for start, _ in cells[1:]]
