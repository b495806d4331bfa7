"""fastdit.training.graphed: the training forward and backward replayed from CUDA graphs.

On CPU the graphs are emulated (a recorder that reruns the call and copies into the captured buffers), so
these tests check the static-buffer logic the CUDA path shares: gradients and accumulation equal to the
eager module's, the .grad-aliasing guard, the checks that refuse a stale backward or moved parameters, the
calls that run without graphs. The `gpu` tests run the real graphs against eager on a CUDA device.
"""
import copy

import pytest
import torch
import torch.nn as nn

from fastdit.models import reference as ref
from fastdit.training import graphed

ARCH = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            learn_sigma=True)


def _model(dropout=0.1, device="cpu", **kw):
    torch.manual_seed(0)
    m = ref.DiT(**ARCH, class_dropout_prob=dropout, **kw).to(device)
    # adaLN-Zero starts every block at zero: random weights make every gradient non-trivial
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return m.train()


def _batch(seed, n=4, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g).to(device), torch.randint(0, 1000, (n,), generator=g).to(device),
            torch.randint(0, 10, (n,), generator=g).to(device))


def _micro_steps(model, batches, seed=123):
    """Accumulate the gradients of several micro-batches from .grad = None; return (losses, grads)."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    losses = []
    for x, t, y in batches:
        out = model(x, t, y)
        loss = (out.float() ** 2).mean() + out.float()[:, :1].mean()
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack(losses), grads


def test_graphed_gradients_and_accumulation_equal_eager_emulated():
    eager, graphed_model = _model(), _model()
    g = graphed.install(graphed_model, emulate=True)
    batches = [_batch(s) for s in range(3)]
    for round_ in range(2):              # the second round replays; .grad starts unset in both
        le, ge = _micro_steps(eager, batches, seed=round_)
        lg, gg = _micro_steps(graphed_model, batches, seed=round_)
        torch.testing.assert_close(lg, le, rtol=0, atol=0)
        assert ge.keys() == gg.keys() and len(ge) == len([p for p in eager.parameters() if p.requires_grad])
        for name in ge:
            torch.testing.assert_close(gg[name], ge[name], rtol=1e-6, atol=1e-7, msg=name)
    assert g.captures == 1 and g.replays == 6 and g.eager_calls == 0


def test_grad_that_is_the_output_buffer_is_cloned_before_the_next_replay():
    """Without the guard, autograd takes the static buffer as .grad on the first micro-batch and the second
    replay overwrites it: the accumulated gradient would be twice the second micro-batch's."""
    m = _model(dropout=0.0)
    g = graphed.install(m, emulate=True)
    batches = [_batch(1), _batch(2)]
    _micro_steps(m, batches[:1])            # capture (+ one replay)
    for p in m.parameters():
        p.grad = None
    m(*batches[0]).float().square().mean().backward()
    aliased = [p for p, ptr in zip(g.params, g._grad_ptrs) if p.grad is not None and p.grad.data_ptr() == ptr]
    assert aliased, "autograd did not take the buffer: this test no longer exercises the guard"
    first = {id(p): p.grad.clone() for p in g.params}
    m(*batches[1]).float().square().mean().backward()
    eager = _model(dropout=0.0)
    for p in eager.parameters():
        p.grad = None
    eager(*batches[1]).float().square().mean().backward()
    for p, q in zip(g.params, [p for p in eager.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, first[id(p)] + q.grad, rtol=1e-5, atol=1e-7)


def test_label_dropout_draws_match_eager_emulated():
    """The warm-up's and capture's random draws are undone: the graphed run's class dropout is the eager one."""
    eager, graphed_model = _model(dropout=0.5), _model(dropout=0.5)
    graphed.install(graphed_model, emulate=True)
    x, t, y = _batch(5, n=16)
    torch.manual_seed(7)
    a = [eager(x, t, y) for _ in range(3)]
    torch.manual_seed(7)
    b = [graphed_model(x, t, y) for _ in range(3)]
    for u, v in zip(a, b):
        torch.testing.assert_close(v, u, rtol=0, atol=0)


def test_calls_that_are_not_training_calls_run_the_original_forward(capsys):
    m = _model()
    g = graphed.install(m, emulate=True)
    x, t, y = _batch(0)
    with torch.no_grad():
        m(x, t, y)
    m.eval()
    m(x, t, y)
    m.train()
    assert g.captures == 0 and g.eager_calls == 2
    m(x, t, y).sum().backward()
    assert g.captures == 1 and g.replays == 1
    x2, t2, y2 = _batch(0, n=2)                      # another batch size: eager, said once
    m(x2, t2, y2).sum().backward()
    m(x2, t2, y2).sum().backward()
    assert g.eager_calls == 4 and g.replays == 1
    assert capsys.readouterr().out.count("runs without graphs") == 1
    m(x.requires_grad_(), t, y)                       # an input that wants a gradient: said once
    m(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: said once
        m(x.detach(), t, y)
        m(x.detach(), t, y)
    assert g.eager_calls == 8 and g.replays == 1
    said = capsys.readouterr().out
    assert said.count("an input requires a gradient") == 1 and said.count("autocast is on") == 1, said

    class Variadic(nn.Module):
        def forward(self, *xs):
            return xs[0]
    with pytest.raises(ValueError, match="no fixed argument list"):
        graphed.install(Variadic())


def test_the_output_is_not_the_graph_buffer():
    m = _model(dropout=0.0)
    graphed.install(m, emulate=True)
    a = m(*_batch(0))
    kept = a.detach().clone()
    a.sum().backward()
    m(*_batch(1)).sum().backward()
    torch.testing.assert_close(a.detach(), kept, rtol=0, atol=0)


def test_a_backward_after_a_later_forward_is_refused():
    m = _model()
    graphed.install(m, emulate=True)
    first = m(*_batch(0))
    m(*_batch(1))
    with pytest.raises(RuntimeError, match="later forward"):
        first.sum().backward()


def test_moved_parameters_are_refused():
    m = _model()
    graphed.install(m, emulate=True)
    m(*_batch(0)).sum().backward()
    p = next(p for p in m.parameters() if p.requires_grad)
    p.data = p.data.clone()
    with pytest.raises(RuntimeError, match="changed storage"):
        m(*_batch(1))


def test_caller_inputs_are_never_written():
    m = _model()
    graphed.install(m, emulate=True)
    x, t, y = _batch(0)
    m(x, t, y).sum().backward()
    x2, t2, y2 = _batch(1)
    saved = x2.clone()
    m(x2, t2, y2).sum().backward()
    torch.testing.assert_close(x2, saved, rtol=0, atol=0)
    assert torch.equal(x, _batch(0)[0])


def test_install_uninstall_and_state_dict():
    m = _model()
    before = copy.deepcopy(m.state_dict())
    graphed.install(m, emulate=True)
    assert graphed.installed(m) is not None
    with pytest.raises(ValueError, match="already replaced"):
        graphed.install(m, emulate=True)
    m(*_batch(0)).sum().backward()
    assert m.state_dict().keys() == before.keys()
    graphed.uninstall(m)
    assert graphed.installed(m) is None and "forward" not in vars(m)


def test_cuda_graphs_refuse_cpu_inputs_and_a_failed_capture_says_so():
    m = _model()
    graphed.install(m)                                 # real graphs asked for, CPU tensors given
    with pytest.raises(ValueError, match="need CUDA inputs"):
        m(*_batch(0))

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x), self.lin(x)
    two = TwoOutputs()
    graphed.install(two, emulate=True)
    with pytest.raises(RuntimeError, match="capturing the forward and backward failed.*one tensor"):
        two(torch.randn(2, 4))


def test_the_cuda_branch_calls_torch_cuda_as_its_api_reads(monkeypatch):
    """The CUDA-graph branch never runs on CPU: its calls are bound against the installed torch's own
    signatures (torch.cuda.graph, Stream, current_stream, CUDAGraph.replay), with fakes that record them."""
    import contextlib
    import inspect
    calls = []
    real_graph_init = torch.cuda.graph.__init__

    class FakeStream:
        def __init__(self, *args, **kwargs):
            inspect.signature(torch.cuda.Stream.__new__).bind(torch.cuda.Stream, *args, **kwargs)
            calls.append("stream")

        def wait_stream(self, other):
            calls.append("wait")

    class FakeGraph:
        def replay(self):
            calls.append("replay")

    class FakeCapture:
        def __init__(self, *args, **kwargs):
            bound = inspect.signature(real_graph_init).bind(self, *args, **kwargs)
            assert bound.arguments["capture_error_mode"] in ("global", "thread_local", "relaxed")
            assert isinstance(bound.arguments["cuda_graph"], FakeGraph)
            calls.append(("capture", bound.arguments["pool"]))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeCapture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    g = graphed._CudaGraphs(torch.device("cpu"))
    runs = []
    g.warm_up(lambda: runs.append(1), 3)
    assert runs == [1, 1, 1]
    assert g.capture("forward", lambda: 5) == 5 and g.capture("backward", lambda: 6) == 6
    g.replay("forward")
    g.replay("backward")
    assert calls.count(("capture", "pool")) == 2 and calls.count("replay") == 2 and calls.count("wait") == 2


SYNC_PROBE = r"""
import collections, json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
os.environ["FASTDIT_ATTENTION_TRITON"] = "1"
sys.path.insert(0, os.environ["FASTDIT_ROOT"])
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from benchmarks.host_overhead import stub_kernels
stub_kernels()            # the host path only: each Triton launch a no-op, so only PyTorch's own ops dispatch
from fastdit.models.build import build_dit
# ops that read a device value on the host (a sync: illegal in a capture) or make a tensor from host data
SYNC = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default", "aten.equal.default",
        "aten.masked_select.default", "aten.lift_fresh.default", "aten.lift_fresh_copy.default"}


class Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNC or "unique" in str(func):
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


arch = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
            learn_sigma=True, class_dropout_prob=0.1)
out = {}
for name, impl, kw in [("reference", "reference", {}), ("fast", "fast", dict(attention="sdpa_packed")),
                       ("fast+folds", "fast", dict(attention="sdpa_packed", mlp="fold", bias_fold=True)),
                       ("fast+recompute", "fast", dict(attention="sdpa_packed", mlp="recompute")),
                       ("fast/triton", "fast", dict(attention="triton"))]:
    torch.manual_seed(0)
    m = build_dit(impl, **arch, **kw).train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randint(0, 10, (2,))
    params = [p for p in m.parameters() if p.requires_grad]

    def step():
        o = m(x, t, y)
        torch.autograd.grad(o, params, torch.zeros_like(o), allow_unused=True)
    step()                # first calls may probe and cache; the capture follows warm-up calls too
    seen = Seen()
    with seen:
        step()
    out[name] = dict(seen.ops)
sanity = Seen()
with sanity:
    a = torch.randn(3)
    bool(a.sum() > 0)
out["sanity"] = dict(sanity.ops)
print(json.dumps(out))
"""


def test_the_captured_forward_and_backward_make_no_host_sync():
    """A capture fails on any op that reads a device value on the host (.item(), bool(tensor), nonzero) or
    copies host data in: none may run in the model's training forward + backward, for each model variant a
    user can graph (the fused ops' host path with their launches made no-ops, on CPU)."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SYNC_PROBE], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, FASTDIT_ROOT=root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen.pop("sanity") == {"aten._local_scalar_dense.default": 1}     # the probe sees a sync
    assert seen == {k: {} for k in ("reference", "fast", "fast+folds", "fast+recompute", "fast/triton")}


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_cuda_graphs_match_eager_on_cuda(impl):
    """Real graphs: losses and accumulated gradients over three micro-batches with label dropout equal the
    eager module's (fp32; the same kernels run, so only atomics could make them differ)."""
    from fastdit.models.build import build_dit
    dev = torch.device("cuda")

    def make():
        torch.manual_seed(0)
        m = build_dit(impl, **ARCH, class_dropout_prob=0.3).to(dev)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
        return m.train()
    eager, g_model = make(), make()
    g = graphed.install(g_model)
    batches = [_batch(s, n=8, device=dev) for s in range(3)]
    for round_ in range(2):
        le, ge = _micro_steps(eager, batches, seed=round_)
        lg, gg = _micro_steps(g_model, batches, seed=round_)
        torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-6)
        for name in ge:
            torch.testing.assert_close(gg[name], ge[name], rtol=1e-4, atol=1e-6, msg=name)
    assert g.captures == 1 and g.replays == 6 and g.eager_calls == 0


# ------------------------------------------------------------------------------------------------ DeepSpeed
ZERO_SCRIPT = r'''
from fastdit.training import graphed, zero_checks, zero_step
from fastdit.training.ema import ShardedEMA


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.drop = torch.nn.Dropout(0.25)                # a random draw inside the graphed forward

    def forward(self, x):
        return self.b(self.drop(torch.nn.functional.gelu(self.a(x))))


def run(stage, ga, graphs, fused):
    torch.manual_seed(0)
    net = Net()
    cfg = {"train_batch_size": 4 * world * ga, "train_micro_batch_size_per_gpu": 4,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.05, "torch_adam": True}},
           "bf16": {"enabled": True}, "gradient_clipping": 0.0,
           # the shipped configs' ZeRO settings, with buckets small enough to fill several times per backward
           "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                                 "reduce_bucket_size": 100, "allgather_bucket_size": 100},
           "steps_per_print": 10**9}
    engine, opt, _, _ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=cfg)
    ema = ShardedEMA(engine.module, 0.9, one_pass=True, flat=fused)
    if fused:
        zero_checks.install(opt)
        why = zero_step.install(opt, ema)
        assert why is None, why
    g = graphed.install(engine.module, emulate=True) if graphs else None
    losses = []
    for step in range(4):
        for micro in range(ga):
            torch.manual_seed(100 + 10 * step + 3 * micro + rank)
            loss = engine(torch.randn(4, 8, dtype=torch.bfloat16)).float().square().mean()
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        f = getattr(opt, "fastdit_fused_step", None)
        if engine.was_step_applied() and (f is None or not f.ema_updated):
            ema.update()
    return dict(losses=losses, bf16=[p.detach().float().reshape(-1).tolist() for p in engine.module.parameters()],
                master=opt.single_partition_of_fp32_groups[0].tolist(),
                ema={k: v.reshape(-1).tolist() for k, v in ema.full_state_dict().items()},
                replays=g.replays if g else None, captures=g.captures if g else None)


out = {}
for stage, ga, fused in ((1, 2, False), (2, 1, False), (2, 2, True)):
    out[f"{stage}/{ga}/{fused}"] = {"eager": run(stage, ga, False, fused), "graphed": run(stage, ga, True, fused)}
with open(f"result_{rank}.json", "w") as f:
    json.dump(out, f)
'''


@pytest.mark.slow
def test_deepspeed_zero1_zero2_train_the_same_with_the_graphed_forward(tmp_path):
    """Two CPU ranks (gloo), bf16, ZeRO-1 and -2, with gradient accumulation and the fused optimizer step: the
    emulated graphs give DeepSpeed's hooks the same gradients, so weights, masters and EMA are bit for bit those
    of the eager engine (a dropout inside the forward checks the random draws)."""
    import json

    from _helpers import run_two_ranks
    proc = run_two_ranks("import json\n" + ZERO_SCRIPT, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"result_{rank}.json").read_text())
        for case, runs in res.items():
            eager, g = runs["eager"], runs["graphed"]
            ga = int(case.split("/")[1])
            assert g["captures"] == 1 and g["replays"] == 4 * ga, case
            for key in ("losses", "bf16", "master", "ema"):
                assert g[key] == eager[key], (case, key)


@pytest.mark.gpu
def test_graphed_rows_train_as_their_eager_rows_on_cuda(tmp_path):
    """Real graphs in the harness's step and in the DeepSpeed engine's (ZeRO-2 as configs/xl2_zero2.json, one
    rank, NCCL; its own process): fp32, the same losses as the eager rows over 7 steps (to cuDNN attention's
    nondeterministic backward), one capture and every step replayed."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "g.json"
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--model", "DiT-S/2", "--batch", "8",
                           "--precision", "fp32", "--rows", "fused,fused+graphs,deepspeed,deepspeed+graphs",
                           "--warmup", "2", "--steps", "2", "--repeats", "2", "--json", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    for r in rows.values():
        assert r["status"] == "ok", (r["name"], r["error"])
    for graphed_row, eager_row in (("fused+graphs", "fused"), ("deepspeed+graphs", "deepspeed")):
        g, e = rows[graphed_row], rows[eager_row]
        assert g["cuda_graph"] == "cuda" and g["graphs"] == dict(captures=1, replays=7, eager_calls=0), g
        for key in ("loss_first", "loss_last"):
            assert g[key] == pytest.approx(e[key], rel=1e-3), (graphed_row, key)


def test_a_failed_capture_raises_its_cause_and_puts_the_stream_back():
    """On CUDA, an op that cannot be captured invalidates the capture, and ending it then raises too (before
    torch.cuda.graph's exit restores the stream): the cause is what must reach the user, on the caller's stream."""
    events = []

    class Ctx:   # what torch.cuda.graph does at a failed capture: its exit raises
        def __enter__(self):
            events.append("begin")

        def __exit__(self, *exc):
            events.append("end")
            if "fail" in events:
                raise RuntimeError("operation not permitted when stream is capturing (invalidated)")

    def failing():
        events.append("fail")
        raise ValueError("a host sync inside the captured forward")

    with pytest.raises(ValueError, match="host sync"):
        graphed.capture_in(Ctx(), failing, lambda: events.append("stream restored"))
    assert events == ["begin", "fail", "end", "stream restored"]
    events.clear()
    assert graphed.capture_in(Ctx(), lambda: 7, lambda: events.append("stream restored")) == 7
    assert events == ["begin", "end"]
