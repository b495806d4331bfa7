"""`make gpu-check` (benchmarks/gpu_check.py): the CPU rehearsal of every stage, deadlines, bad input."""
import importlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
gc = importlib.import_module("benchmarks.gpu_check")


def test_smoke_runs_every_stage_on_cpu(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == list(gc.STAGES)
    for s in summary["stages"]:
        assert s["status"] == "ok", s
        assert s["result"] and "no result" not in s["result"], s
    st = {s["name"]: s for s in summary["stages"]}
    assert st["tests"]["detail"]["passed"] >= 2 and st["tests"]["detail"]["failures"] == 0
    assert st["train"]["detail"]["img_per_s_median"] > 0
    assert all(v["img_per_s"] > 0 for v in st["throughput"]["detail"].values())
    assert set(st["throughput_mb32"]["detail"]) == {"fused", "fused+direct-dispatch"}
    assert all(v["img_per_s"] > 0 for v in st["throughput_mb32"]["detail"].values())
    assert st["attention"]["detail"]["fastest_packed"]
    assert {"qkv bshd", "gelu", "gelu+g"} <= set(st["column_sums"]["detail"]["summary"])   # folded bias gradients
    assert set(st["attn_sweep"]["detail"]["fastest"]) == {"fwd", "dq", "dkdv", "dq+bias"}   # the Triton attention's tilings
    assert st["attn_sweep"]["detail"]["complete"] is True
    assert {"fwd", "bwd", "derived_step_change_ms"} <= set(st["mlp_gemm"]["detail"]["summary"])   # GELU-epilogue GEMMs
    assert set(st["profile"]["detail"]["phases_ms"]) >= {"forward", "backward", "optimizer"}
    assert (out / "step_profile" / "profile.json").is_file()
    assert {"step_change_ms", "category_change_ms", "kernel_change_ms"} <= set(st["bias_profile"]["detail"])
    assert (out / "bias_profile_diff.json").is_file() and (out / "step_profile_bias_fold" / "profile.json").is_file()
    for name in ("env.json", "parity.json", "throughput.json", "throughput_compile.json", "kernels.json",
                 "kernels.png", "column_sums.json", "attention.json", "attention_sweep.json", "mlp_gemm.json", "train_metrics.jsonl", "README.md",
                 "log.txt"):
        assert (out / name).is_file(), name
    # the summary table is the last thing printed
    assert proc.stdout.rstrip().splitlines()[-1].startswith("gpu_tests")
    assert "smoke" in (out / "README.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_says_so_in_one_line():
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == gc.EXIT_BAD_INPUT
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--smoke" in lines[0], proc.stderr


def test_real_stages_are_built_without_a_gpu(tmp_path):
    """The GPU-mode commands (what `make gpu-check` runs on a GPU), built here without running them."""
    stages = gc.build_stages(gc.parse_args([]), str(tmp_path), 128, sys.executable, dict(os.environ))
    by = {s.name: [" ".join(c) for c in s.commands] for s in stages}
    assert list(by) == list(gc.STAGES)
    # what decides a default first (the rows, train.py against row deepspeed, micro-batch 32), then the
    # correctness a flip also needs: a short budget cuts the tests, which report what finished
    assert list(by)[:6] == ["env", "throughput", "train", "throughput_mb32", "parity", "tests"]
    assert "tests/test_kernels.py tests/test_models_dit.py tests/test_models_attention.py" in by["tests"][0]
    assert "tests/test_kernels_qkv_grads.py" in by["tests"][0]
    assert "--model DiT-XL/2" in by["parity"][0]
    assert "--batch 128" in by["throughput"][0] and "fused+compile" not in by["throughput"][0]
    assert "fused/math" not in by["throughput"][0] and "fused/xformers" in by["throughput"][0]
    assert "deepspeed" in by["throughput"][0] and "--rows deepspeed+compile,fused+compile,compile" in by["compile"][0]
    assert "--dims 1152 --tokens-per-sample 256" in by["kernels"][0]
    assert "benchmarks/attention.py --batch 128" in by["attention"][0]
    assert "benchmarks/column_sums.py --batch 128 --layouts bshd contiguous --sweep" in by["column_sums"][0]
    assert "--no-rows --sweep-triton" in by["attn_sweep"][0] and "--batch 128" in by["attn_sweep"][0]
    assert "tests/test_kernels_flash_attention.py" in by["tests"][0] and "fused/triton" in by["throughput"][0]
    assert "benchmarks/mlp_gemm.py --batch 128 --passes bwd fwd --deadline-s 60" in by["mlp_gemm"][0]
    assert "tests/test_kernels_gemm_gelu.py" in by["tests"][0] and "fused+mlp-epilogue" in by["throughput"][0]
    assert "configs/xl2_zero2.json" in by["train"][0] and "train_micro_batch_size_per_gpu=128" in by["train"][0]
    assert "-m gpu" in by["gpu_tests"][0] and "--ignore=tests/test_models_dit.py" in by["gpu_tests"][0]
    assert "benchmarks/step_profile.py --config configs/xl2_zero2.json" in by["profile"][0]
    assert "train.fused_optimizer_step=true" in by["profile"][0] and "train_batch_size=128" in by["profile"][0]
    assert "--trace-steps 2" in by["profile"][0]  # the idle gaps by phase need a step after the first
    mb32 = by["throughput_mb32"][0]   # the shipped configs' micro-batch
    assert "--batch 32" in mb32 and \
        "--rows fused,fused+graphs,deepspeed,deepspeed+graphs,fused+direct-dispatch,eager/sdpa,deepspeed+candidates" in mb32
    fold, bias = by["bias_profile"]   # the same profile without and with bias_fold, both with mlp="fold"
    assert "configs/xl2_zero2.json" in fold and "model.mlp=fold" in fold and "bias_fold" not in fold
    same = bias.replace(" --set model.bias_fold=true", "").replace("step_profile_bias_fold", "step_profile_fold")
    assert same == fold
    assert "deepspeed+fused-step" in by["throughput"][0] and "fused+mlp-fold" in by["throughput"][0]
    tp = by["throughput"][0].split("--rows ")[1].split()[0].split(",")
    assert tp[:3] == ["fused", "deepspeed", "deepspeed/ds-step"]   # most wanted first: the loop as shipped
    assert "fused+bias-fold" in tp and "eager" in tp and len(tp) == len(set(tp))
    for path in gc.GPU_TEST_FILES:  # the files the GPU stages name exist
        assert os.path.isfile(os.path.join(ROOT, path.split("::")[0])), path
    rows = next(s for s in gc.build_stages(gc.parse_args(["--rows", "fused,deepspeed"]), str(tmp_path), 64,
                                           sys.executable, dict(os.environ)) if s.name == "throughput").commands[0]
    assert rows[rows.index("--rows") + 1] == "fused,deepspeed" and rows[rows.index("--batch") + 1] == "64"


def test_unknown_rows_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        gc.main(["--smoke", "--rows", "fused,turbo"])
    assert e.value.code == gc.EXIT_BAD_INPUT and "turbo" in capsys.readouterr().err


def _missing_needed(monkeypatch):
    monkeypatch.setattr(gc, "NEEDED", {"fastdit_surely_not_a_module": "not-a-wheel"})


def test_missing_wheel_folder_is_named(monkeypatch, tmp_path, capsys):
    _missing_needed(monkeypatch)
    with pytest.raises(SystemExit) as e:
        gc.install_wheels(str(tmp_path / "nowheels"), dict(os.environ), print)
    assert e.value.code == gc.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "nowheels" in err and "does not exist" in err


def test_a_wheel_that_does_not_install_is_named(monkeypatch, tmp_path, capsys):
    _missing_needed(monkeypatch)
    monkeypatch.setattr(gc, "SITE", str(tmp_path / "site"))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "broken-0.1-py3-none-any.whl").write_bytes(b"not a zip file")
    with pytest.raises(SystemExit) as e:
        gc.install_wheels(str(tmp_path / "w"), dict(os.environ), print)
    assert e.value.code == gc.EXIT_BAD_INPUT
    assert "broken-0.1-py3-none-any.whl" in capsys.readouterr().err


def test_already_importable_needs_no_wheels(tmp_path):
    notes = gc.install_wheels(str(tmp_path / "absent"), dict(os.environ), print)  # deepspeed is installed here
    assert "already importable" in notes[0]


def _stage(name, seconds, cap, floor):
    code = f"import time; time.sleep({seconds}); print('slept')"
    return gc.Stage(name, [[sys.executable, "-c", code]], cap, floor, lambda s: "done")


def test_deadline_times_out_a_slow_stage_and_keeps_time_for_the_next(tmp_path):
    log = gc.Log(str(tmp_path / "log.txt"))
    slow, quick = _stage("slow", 30, cap=20, floor=1), _stage("quick", 0, cap=20, floor=2)
    t0 = time.time()
    gc.run_stages([slow, quick], t0 + gc.FINISH_S + 6, dict(os.environ), log)
    assert slow.status == "timeout" and slow.returncodes == [124] and slow.wall < 6
    assert quick.status == "ok" and quick.result == "done"
    assert time.time() - t0 < 10  # FINISH_S of the budget stays for the summaries


def test_stage_skipped_when_budget_is_spent_and_failed_when_output_missing(tmp_path):
    log = gc.Log(str(tmp_path / "log.txt"))
    first = _stage("first", 0, cap=5, floor=1)
    first.summarize = lambda s: json.load(open(tmp_path / "missing.json"))
    late = _stage("late", 0, cap=5, floor=100)
    gc.run_stages([first, late], time.time() + gc.FINISH_S + 5, dict(os.environ), log)
    assert first.status == "failed" and "no result" in first.result
    assert late.status == "skipped" and "left of the budget" in late.result


@pytest.mark.parametrize("name,slug", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA A100-SXM4-80GB", "a100sxm480gb"), (None, "gpu")])
def test_gpu_slug(name, slug):
    assert gc.gpu_slug(name) == slug


def test_default_batch_scales_with_memory():
    assert gc.default_batch(79.2) == 128  # H100 80GB: the batch of the committed baseline
    assert gc.default_batch(139.8) == 128
    assert gc.default_batch(40.0) == 64
    assert gc.default_batch(8.0) == 16


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
                   '<testcase classname="a" name="ok"/><testcase classname="a" name="bad"><failure/></testcase>'
                   '<testcase classname="a" name="s"><skipped/></testcase><testcase classname="a" name="ok2"/>'
                   '</testsuite></testsuites>')
    c = gc.junit_counts([str(xml), str(tmp_path / "absent.xml")])
    assert (c["passed"], c["failures"], c["skipped"], c["failed_tests"]) == (2, 1, 1, ["a::bad"])


def test_verbose_counts_read_both_pytest_formats():
    lines = ["[gw0] [ 10%] PASSED tests/test_a.py::test_one[cpu-fp32]",
             "tests/test_b.py::test_two PASSED                                   [ 20%]",
             "[gw1] [ 30%] FAILED tests/test_a.py::test_bad",
             "[gw1] [ 40%] SKIPPED tests/test_a.py::test_skip",
             "tests/test_b.py::test_err ERROR",
             "FAILED tests/test_a.py::test_bad - AssertionError: 1 != 2",   # the short summary repeats it
             "collected 9 items"]
    c = gc.verbose_counts(lines)
    assert (c["tests"], c["passed"], c["failures"], c["errors"], c["skipped"]) == (5, 2, 1, 1, 1)
    assert c["failed_tests"] == ["tests/test_a.py::test_bad", "tests/test_b.py::test_err"]


def test_a_test_stage_cut_by_its_limit_still_counts_the_tests_that_finished(tmp_path):
    """pytest killed before it writes its XML: the summary counts the -v lines it printed, and says so."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_slow.py").write_text(
        "import time\n"
        "def test_quick():\n    pass\n"
        "def test_fails():\n    assert False\n"
        "def test_hangs():\n    time.sleep(60)\n")
    xml = str(tmp_path / "r.xml")
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=",
           "--rootdir", str(tmp_path), str(tmp_path / "tests" / "test_slow.py"), "--junitxml", xml]
    st = gc.Stage("tests", [cmd], 8, 1, lambda s: gc.summarize_tests([xml], s))
    log = gc.Log(str(tmp_path / "log.txt"))
    gc.run_stages([st], time.time() + gc.FINISH_S + 10, dict(os.environ), log)
    assert st.status == "timeout" and not os.path.exists(xml)
    assert st.detail["from_log"] is True and (st.detail["passed"], st.detail["failures"]) == (1, 1), st.output
    assert st.result.startswith("1 passed, 1 failed, 0 skipped") and "from the log" in st.result


def test_predictions_file_names_known_rows():
    """benchmarks/predictions.json: every prediction names rows throughput.py has, and a range lo <= hi."""
    from benchmarks.throughput import ALL_ROWS
    with open(gc.PREDICTIONS) as f:
        rows = json.load(f)["rows"]
    assert rows
    for p in rows:
        assert p["row"] in ALL_ROWS and p["baseline"] in ALL_ROWS and p["row"] != p["baseline"], p
        lo, hi = p["delta_ms"]
        assert lo <= hi and p["written"] and p["what"], p
        assert lo <= p.get("central_ms", lo) <= hi, p


def test_prediction_verdicts():
    """Measured change of ms per step against the baseline in the same run, against the predicted range."""
    preds = [dict(row="a", baseline="b", delta_ms=[-4.0, -2.0]), dict(row="c", baseline="b", delta_ms=[-4.0, -2.0]),
             dict(row="d", baseline="b", delta_ms=[-4.0, -2.0]), dict(row="e", baseline="b", delta_ms=[-1.0, 1.0]),
             dict(row="f", baseline="b", delta_ms=[-1.0, 1.0])]
    figures = dict(b=dict(ms_per_step=200.0), a=dict(ms_per_step=197.0), c=dict(ms_per_step=190.0),
                   d=dict(ms_per_step=200.0 - 2.0 + gc.NOISE_MS - 0.1), e=dict(status="error"))
    v = {x["row"]: x for x in gc.prediction_verdicts(figures, preds)}
    assert v["a"]["verdict"] == "held" and v["a"]["measured_ms"] == -3.0
    assert v["c"]["verdict"] == "faster than predicted" and v["c"]["measured_ms"] == -10.0
    assert v["d"]["verdict"] == "held"                                  # within the noise allowance
    assert v["e"]["verdict"] == v["f"]["verdict"] == "not measured"     # an errored row, a missing row
    figures["d"]["ms_per_step"] = 200.0 - 2.0 + gc.NOISE_MS + 0.1
    assert gc.prediction_verdicts(figures, preds[2:3])[0]["verdict"] == "slower than predicted"
    lines = gc.format_verdicts(list(v.values()))
    assert len(lines) == 6 and "faster than predicted" in lines[2] and "-10.0" in lines[2]


def test_stage_verdicts_read_both_throughput_stages(tmp_path):
    """The verdicts come from the rows of the throughput and compile stages (each stage's detail: row -> figures)."""
    pred = tmp_path / "p.json"
    pred.write_text(json.dumps(dict(rows=[dict(row="x", baseline="y", delta_ms=[-3.0, -1.0]),
                                          dict(row="z", baseline="y", delta_ms=[-3.0, -1.0])])))
    thr = gc.Stage("throughput", [], 1, 1)
    thr.detail = dict(y=dict(ms_per_step=100.0), x=dict(ms_per_step=98.0))
    comp = gc.Stage("compile", [], 1, 1)
    comp.detail = dict(z=dict(ms_per_step=110.0))
    other = gc.Stage("kernels", [], 1, 1)
    other.detail = dict(z=dict(ms_per_step=99.0))                 # not a throughput stage: ignored
    v = gc.stage_verdicts([thr, comp, other], str(pred))
    assert [(x["row"], x["measured_ms"], x["verdict"]) for x in v] == [("x", -2.0, "held"),
                                                                        ("z", 10.0, "slower than predicted")]
    # a prediction for the micro-batch-32 stage is judged on that stage's rows only (the same row names)
    pred.write_text(json.dumps(dict(rows=[dict(row="x", baseline="y", delta_ms=[-3.0, -1.0], stage="throughput_mb32"),
                                          dict(row="x", baseline="y", delta_ms=[-3.0, -1.0])])))
    mb32 = gc.Stage("throughput_mb32", [], 1, 1)
    mb32.detail = dict(y=dict(ms_per_step=60.0), x=dict(ms_per_step=50.0))
    v = gc.stage_verdicts([thr, comp, mb32], str(pred))
    assert [(x["measured_ms"], x["verdict"], x.get("stage")) for x in v] == [
        (-10.0, "faster than predicted", "throughput_mb32"), (-2.0, "held", None)]
    assert "x @mb32" in gc.format_verdicts(v)[1]
    assert gc.stage_verdicts([thr], str(pred))[0]["verdict"] == "not measured"   # the stage did not run


def test_issue_target_lines():
    """The issues' whole-step targets read off the batch-128 throughput and compile rows, and again with the
    candidate rows in place of `deepspeed` / `fused`; a target whose rows did not both run is left out."""
    thr = gc.Stage("throughput", [], 1, 1)
    thr.detail = {"fused": dict(img_per_s=590.0), "deepspeed": dict(img_per_s=570.0),
                  "deepspeed+candidates": dict(img_per_s=604.0), "fused+candidates": dict(img_per_s=612.0),
                  "fused+graphs": dict(status="error", error="capture")}
    comp = gc.Stage("compile", [], 1, 1)
    comp.detail = {"compile": dict(img_per_s=520.0)}
    lines = gc.issue_target_lines([thr, comp])
    got = [(ln.split(":")[0], " ".join(ln.split(":", 1)[1].split()[:3]).split(" target")[0], ln.rstrip().split("  ")[-1])
           for ln in lines]
    assert [(issue, what.split()[0], verdict) for issue, what, verdict in got] == [
        ("issue 10", "deepspeed", "not met"),                       # 570 img/s < 600
        ("issue 10", "deepspeed", "met"),                           # 570 / 590 = 0.966 >= 0.95
        ("issue 11", "fused", "not met"),                           # 590 < 700
        ("issue 11", "fused", "not met"),                           # 590 / 520 = 1.135 < 1.3
        ("issue 10", "deepspeed+candidates", "(candidate rows)"),
        ("issue 10", "deepspeed+candidates", "(candidate rows)"),
        ("issue 11", "fused+candidates", "(candidate rows)"),
        ("issue 11", "fused+candidates", "(candidate rows)"),
    ]
    assert "570.0 img/s" in lines[0] and "0.966x" in lines[1] and "/ fused " in lines[1]
    assert "1.135x" in lines[3] and "/ compile" in lines[3]
    assert "604.0 img/s" in lines[4] and lines[4].endswith("met  (candidate rows)") and "not met" not in lines[4]
    assert "0.987x" in lines[5] and "/ fused+candidates" in lines[5] and "not met" not in lines[5]
    assert "612.0 img/s" in lines[6] and "not met" in lines[6]
    assert "1.177x" in lines[7] and "not met" in lines[7]
    assert not any("fused+compile" in ln for ln in lines)            # its row did not run
    assert gc.issue_target_lines([gc.Stage("kernels", [], 1, 1)]) == []


def test_profile_diff_names_what_grew():
    def prof(step, phases, cats, top):
        return dict(step=dict(median_ms=step), phases=dict(median_ms=phases),
                    trace=dict(by_category_ms=cats, top=[dict(name=n, ms_per_step=ms) for n, ms in top]))
    a = prof(218.0, dict(forward=60.0, backward=150.0), dict(gemm=120.0, fastdit=19.0),
             [("gemm_a", 26.0), ("stack", 0.5), ("reduce_bias", 9.0)])
    b = prof(237.0, dict(forward=61.0, backward=168.0), dict(gemm=120.0, fastdit=35.0, reduce=1.0),
             [("gemm_a", 26.1), ("stack", 16.5), ("modln_bwd", 1.0)])
    d = gc.profile_diff(a, b, top=3)
    assert d["step_change_ms"] == 19.0 and d["phase_change_ms"] == dict(forward=1.0, backward=18.0)
    assert d["category_change_ms"] == dict(fastdit=16.0, gemm=0.0, reduce=1.0)
    assert [k["name"] for k in d["kernel_change_ms"]] == ["stack", "reduce_bias", "modln_bwd"]
    assert d["kernel_change_ms"][1] == dict(name="reduce_bias", change_ms=-9.0, base_ms=9.0, other_ms=0.0)


def test_summaries_of_a_cut_benchmark_say_so(tmp_path):
    """kernels.py and column_sums.py write their rows as they go; a stage cut by its deadline then summarises the
    rows it has and says it was cut."""
    rows = [dict(op="gated_residual", impl="fused", **{"pass": p}, copy_share=s) for p, s in (("fwd", 0.9), ("bwd", 0.7))]
    for complete in (True, False):
        (tmp_path / "kernels.json").write_text(json.dumps(dict(meta=dict(copy_gbps=3000.0, complete=complete),
                                                               rows=rows)))
        (tmp_path / "column_sums.json").write_text(json.dumps(dict(
            meta=dict(complete=complete), summary={"gelu": dict(ms=dict(unfused=0.5, step=0.4))})))
        st = gc.Stage("kernels", [], 1, 1, None)
        k = gc.summarize_kernels(str(tmp_path), st)
        c = gc.summarize_column_sums(str(tmp_path), gc.Stage("column_sums", [], 1, 1, None))
        assert k.startswith("fused fwd/bwd % of copy: gated_residual 90/70") and c.startswith("ms unfused/step/once: "
                                                                                             "gelu 0.500/0.400/-")
        assert ("(cut:" in k) is (not complete) and ("(cut:" in c) is (not complete)
